"""Export a trained spiking VGG to NIR, the Neuromorphic Intermediate Representation (docs/metrics.md).

The network is first rewritten as a plain ``nn.Sequential`` of what NIR has nodes for -- torch
``Conv2d`` with each BatchNorm folded in (inference statistics), spikingjelly ``LIFNode``,
``AvgPool2d`` (also the global average pool), ``Flatten``, ``Linear`` -- and that is handed to
spikingjelly's exporter (:func:`spikingjelly.activation_based.nir_exchange.export_to_nir`), which
maps the layers to NIR nodes and infers their shapes.

How bso's neuron maps onto NIR's LIF (``tau dv/dt = (v_leak - v) + R I``, spike when v > v_th,
then ``v <- v_reset``), one bso time step being ``dt`` seconds (spikingjelly's 1e-4 by default):
``tau_NIR = tau x dt`` (tau = 2 steps: lambda = 1 - 1/tau = 0.5), ``r = tau`` (the input is not
decayed: a forward-Euler step is ``v <- lambda v + I``), ``v_leak = 0``, ``v_threshold = V_th``.

Where NIR 1.0 cannot say what bso computes (each recorded in the graph's and nodes' metadata):

* **reset**: bso subtracts the threshold (soft reset, ``u - V_th s``); NIR's LIF resets to
  ``v_reset``. The nodes carry ``v_reset = 0`` and ``metadata["reset"] = "subtract"``: a target
  that applies NIR's hard reset runs a different network (tests/test_nir_export.py measures how
  much); one that honours the metadata runs bso's.
* **threshold**: bso (spikingjelly) fires at ``v >= V_th``, NIR's text says ``v > v_th``
  (``metadata["fires_at"] = ">="``); equal only at exact ties.
* **time**: bso feeds the same image at every step (direct encoding) and predicts the argmax of the
  output summed over T steps; NIR graphs are per step, so ``metadata["readout"]`` says so and
  ``metadata["T"]`` gives T.

What NIR 1.0 has no node for fails with :class:`NIRExportError` naming the layer: max pooling,
AGMM's gate, residual blocks (BiRealResNet18, SpikingResNet19), grouped or non-zero-padded convs.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from pathlib import Path

import nir
import numpy as np
import torch
from spikingjelly.activation_based import neuron as sj_neuron
from spikingjelly.activation_based.nir_exchange import export_to_nir
from torch import nn

from bso.layers import SynapticConv2d, SynapticLinear
from bso.models.parts import SpikingConvBlock
from bso.models.resnet import BiRealBlock, SpikingBasicBlock
from bso.models.vgg import SpikingVGG
from bso.neurons import LIFNode

DT = 1e-4  # seconds per time step: spikingjelly's default, the convention of NIR simulators


class NIRExportError(ValueError):
    """A layer that NIR (or this exporter) cannot express."""


def _fail(name: str, module: nn.Module, why: str) -> NIRExportError:
    return NIRExportError(
        f"cannot export layer '{name}' ({type(module).__name__}) to NIR: {why}. Exportable: "
        "SpikingVGG (model.layers with <n>C<k> convs and AP<k> average pools, BatchNorm or none, "
        "no AGMM gate)"
    )


def check_exportable(model: nn.Module) -> None:
    """Raise :class:`NIRExportError` naming the first layer NIR cannot express."""
    if not isinstance(model, SpikingVGG):
        first = next(iter(model.named_children()), ("", model))
        for name, module in model.named_modules():
            if isinstance(module, (BiRealBlock, SpikingBasicBlock)):
                first = (name, module)
                break
        raise _fail(
            first[0] or type(model).__name__,
            first[1],
            "residual blocks (two paths joined by an addition, a real-valued shortcut) are not "
            f"mapped yet; {type(model).__name__} is not a chain of conv -> LIF layers",
        )
    for i, block in enumerate(model.blocks):
        _check_block(f"blocks.{i}", block)


def _check_block(name: str, block: SpikingConvBlock) -> None:
    conv = block.conv
    if conv.groups != 1 or conv.padding_mode != "zeros":
        raise _fail(f"{name}.conv", conv, "NIR exchange supports ungrouped, zero-padded convs")
    if not isinstance(block.bn, (nn.BatchNorm2d, nn.Identity)):
        raise _fail(f"{name}.bn", block.bn, "only BatchNorm2d (folded into the conv) or none")
    if not isinstance(block.gate, nn.Identity):
        raise _fail(
            f"{name}.gate",
            block.gate,
            "AGMM's gate scales by a statistic of the whole feature map, which NIR has no node for",
        )
    neuron = block.neuron
    if not isinstance(neuron, LIFNode) or neuron.decay_input or neuron.v_reset is not None:
        raise _fail(f"{name}.neuron", neuron, "expected bso's LIF (soft reset, undecayed input)")
    if isinstance(block.pool, nn.MaxPool2d):
        raise _fail(
            f"{name}.pool", block.pool, "NIR 1.0 has no max pooling (AvgPool2d, SumPool2d only)"
        )
    if not isinstance(block.pool, (nn.Identity, nn.AvgPool2d)):
        raise _fail(f"{name}.pool", block.pool, "only average pooling")


@torch.no_grad()
def fold_batchnorm(
    conv: SynapticConv2d, bn: nn.Module, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of ``bn(conv(x))`` as one conv, with the BatchNorm's inference statistics:
    ``a = gamma / sqrt(var + eps)``, ``W' = a W``, ``b' = a (b - mean) + beta`` (in float64, then
    ``dtype``, by default the BatchNorm's). ``conv``'s weight is read as the forward pass uses it
    (+-1 for binary weights, packed or not; sign(latent); standardised)."""
    w = conv.effective_weight().detach().double()
    if dtype is None:
        dtype = bn.weight.dtype if getattr(bn, "weight", None) is not None else torch.float32
    b = conv.bias.detach().double() if conv.bias is not None else w.new_zeros(w.shape[0])
    if isinstance(bn, nn.BatchNorm2d):
        if bn.running_mean is None:
            raise NIRExportError(
                "BatchNorm without running statistics cannot be folded for inference"
            )
        a = bn.running_var.double().add(bn.eps).rsqrt()
        if bn.weight is not None:
            a = a * bn.weight.double()
        beta = bn.bias.double() if bn.bias is not None else 0.0
        w, b = w * a.view(-1, 1, 1, 1), a * (b - bn.running_mean.double()) + beta
    return w.to(dtype), b.to(dtype)


def _torch_name(name: str) -> str:
    return re.sub(r"\W", "_", name)


def plain_network(model: SpikingVGG, input_shape, soft_reset: bool = True) -> nn.Sequential:
    """``model`` as an ``nn.Sequential`` of torch and spikingjelly layers (BatchNorm folded) that
    computes the same per-step output. ``soft_reset=False`` gives the neurons NIR's hard reset to 0
    (what spikingjelly's exporter accepts)."""
    check_exportable(model)
    dtype = model.classifier.weight.dtype
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    for i, block in enumerate(model.blocks):
        conv = block.conv
        w, b = fold_batchnorm(conv, block.bn, dtype)
        plain = nn.Conv2d(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            bias=True,
            dtype=w.dtype,
        )
        plain.weight.data.copy_(w)
        plain.bias.data.copy_(b)
        layers[f"blocks_{i}_conv"] = plain
        neuron = block.neuron
        layers[f"blocks_{i}_neuron"] = sj_neuron.LIFNode(
            tau=neuron.tau,
            decay_input=False,
            v_threshold=neuron.v_threshold,
            v_reset=None if soft_reset else 0.0,
        )
        if isinstance(block.pool, nn.AvgPool2d):
            pool = block.pool
            layers[f"blocks_{i}_pool"] = nn.AvgPool2d(
                pool.kernel_size,
                pool.stride,
                pool.padding,
                pool.ceil_mode,
                pool.count_include_pad,
                pool.divisor_override,
            )
    with torch.no_grad():  # the spatial size before the global average pool
        probe = nn.Sequential(
            *[m for m in layers.values() if not isinstance(m, sj_neuron.BaseNode)]
        )
        h, w_ = probe(torch.zeros(1, *input_shape, dtype=dtype)).shape[-2:]
    layers["global_pool"] = nn.AvgPool2d((h, w_))
    layers["flatten"] = nn.Flatten()
    fc: SynapticLinear = model.classifier
    linear = nn.Linear(fc.in_features, fc.out_features, bias=fc.bias is not None, dtype=dtype)
    linear.weight.data.copy_(fc.effective_weight().detach())
    if fc.bias is not None:
        linear.bias.data.copy_(fc.bias.detach())
    layers["classifier"] = linear
    return nn.Sequential(layers).eval()


def to_nir(
    model: nn.Module,
    input_shape,
    path: str | Path | None = None,
    *,
    T: int | None = None,
    dt: float = DT,
    binary_weights: bool = False,
) -> nir.NIRGraph:
    """The NIR graph of a trained :class:`bso.models.SpikingVGG` (one time step; see the module
    docstring for what maps how); written to ``path`` (HDF5) when given. ``input_shape``: one
    sample's (channels, height, width); ``T``: the time steps it was trained with (metadata).

    ``binary_weights=True`` keeps the binary convs' weights exactly +-1 (:func:`fold_into_threshold`:
    BatchNorm's scale goes into per-channel thresholds instead), for targets with 1-bit synapses
    and per-neuron thresholds."""
    input_shape = tuple(int(s) for s in input_shape)
    if len(input_shape) != 3:
        raise ValueError(f"input_shape must be (channels, height, width), got {input_shape}")
    plain = plain_network(model, input_shape, soft_reset=False)  # spikingjelly exports hard resets
    dtype = next(plain.parameters()).dtype
    graph = export_to_nir(plain, torch.zeros(1, *input_shape, dtype=dtype), dt=dt)
    neurons = {n: m for n, m in model.named_modules() if isinstance(m, LIFNode)}
    for name, node in graph.nodes.items():
        if isinstance(node, nir.LIF):
            source = name.replace("blocks_", "blocks.").replace("_neuron", ".neuron")
            node.metadata.update(
                {
                    "reset": "subtract",
                    "fires_at": ">=",
                    "bso_layer": source,
                    "tau_steps": float(neurons[source].tau),
                }
            )
        elif isinstance(node, nir.Conv2d) and name.endswith("_conv"):
            node.metadata["bso_layer"] = name.replace("blocks_", "blocks.").replace(
                "_conv", ".conv"
            )
    graph.metadata.update(
        {
            "producer": "bso",
            "model": type(model).__name__,
            "dt": dt,
            "T": -1 if T is None else int(T),
            "encoding": "direct: the same input at every time step",
            "readout": "argmax of the classifier output summed over the T time steps",
            "reset": "subtract V_th on a spike (soft reset); the LIF nodes' v_reset is not used",
            "batchnorm": "folded into the preceding conv with the inference statistics",
        }
    )
    if binary_weights:
        fold_into_threshold(model, graph)
    if path is not None:
        nir.write(str(path), graph)
    return graph


@torch.no_grad()
def fold_into_threshold(model: SpikingVGG, graph: nir.NIRGraph) -> None:
    """In ``graph`` (as :func:`to_nir` wrote it), give every binary conv its +-1 weights back: with
    BatchNorm's scale ``a`` per output channel, ``a W x + b' >= V_th`` is ``sign(a) W x + b'/|a| >=
    V_th/|a|``, and the membrane potential scaled by 1/|a| leaks and resets (either reset) the same
    way. So the conv node holds ``sign(a) W`` (exactly +-1) and bias ``b'/|a|``, and the LIF node
    ``v_threshold = V_th / |a|`` per channel. A channel with ``a = 0`` cannot be scaled: refused."""
    from bso.layers import BINARY_AT_INFERENCE

    for i, block in enumerate(model.blocks):
        conv = block.conv
        if conv.weights not in BINARY_AT_INFERENCE or not isinstance(block.bn, nn.BatchNorm2d):
            continue
        bn = block.bn
        a = bn.running_var.double().add(bn.eps).rsqrt()
        if bn.weight is not None:
            a = a * bn.weight.double()
        if torch.any(a == 0):
            channel = int(torch.nonzero(a == 0)[0])
            raise _fail(
                f"blocks.{i}.bn",
                bn,
                f"channel {channel} has a zero scale (gamma = 0); "
                "its threshold cannot absorb it (export with binary_weights=False)",
            )
        _, bias = fold_batchnorm(conv, bn, torch.float64)
        node, lif = graph.nodes[f"blocks_{i}_conv"], graph.nodes[f"blocks_{i}_neuron"]
        signs = conv.effective_weight().detach().double() * a.sign().view(-1, 1, 1, 1)
        node.weight = signs.numpy().astype(node.weight.dtype)
        node.bias = (bias / a.abs()).numpy().astype(node.bias.dtype)
        threshold = (block.neuron.v_threshold / a.abs()).numpy()
        lif.v_threshold = np.broadcast_to(
            threshold.reshape(-1, *([1] * (lif.v_threshold.ndim - 1))), lif.v_threshold.shape
        ).astype(lif.v_threshold.dtype)
        lif.metadata["threshold"] = "per channel: V_th / |BatchNorm scale| (binary_weights)"
    graph.metadata["batchnorm"] = (
        "binary convs: BatchNorm's scale a folded into per-channel thresholds V_th/|a|, its sign "
        "into the +-1 weights, the shift into the bias (b'/|a|); the first conv: folded into it"
    )


def read_nir(path: str | Path) -> nir.NIRGraph:
    """Read an NIR file (``nir.read``) with an error that names the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"NIR file {path} not found")
    return nir.read(str(path))


def simulate(
    graph: nir.NIRGraph | str | Path,
    x: torch.Tensor,
    T: int,
    *,
    soft_reset: bool = True,
    dt: float = DT,
    dtype=torch.float32,
):
    """Run an NIR graph with spikingjelly's importer (``import_from_nir``) for ``T`` steps on the
    same input ``x`` and return (the output summed over the steps, every spiking layer's spikes per
    step). ``soft_reset=True`` switches the imported neurons to subtracting the threshold, as the
    graph's metadata says bso does; ``False`` runs NIR's hard reset as written."""
    from spikingjelly.activation_based.nir_exchange import import_from_nir

    graph = read_nir(graph) if isinstance(graph, (str, Path)) else graph
    module = import_from_nir(graph, dt=dt, dtype=dtype)
    spikes: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name, sub in module.named_modules():
        if isinstance(sub, sj_neuron.BaseNode):  # inside the importer's stateful wrapper
            if soft_reset:
                sub.v_reset = None
            layer = name.removesuffix(".module")
            spikes[layer] = []
            handles.append(
                module.get_submodule(layer).register_forward_hook(
                    lambda m, a, out, key=layer: spikes[key].append(out[0].detach().clone())
                )
            )
    state, summed = None, 0.0
    try:
        with torch.no_grad():
            for _ in range(T):
                out, state = module(x.to(dtype), state)
                summed = summed + out
    finally:
        for h in handles:
            h.remove()
    return summed, spikes


def graph_arrays(graph: nir.NIRGraph) -> dict[str, dict[str, np.ndarray]]:
    """Every node's array parameters (for comparing two graphs)."""
    return {
        name: {k: v for k, v in vars(node).items() if isinstance(v, np.ndarray)}
        for name, node in graph.nodes.items()
    }


@torch.no_grad()
def run_bso(model: nn.Module, x: torch.Tensor, T: int, hard_reset: bool = False):
    """(``model``'s output summed over ``T`` steps on input ``x``, each LIF layer's spikes per step),
    as bso evaluates it; ``hard_reset=True`` gives the neurons NIR's reset to 0 for the duration."""
    from bso.neurons import reset_neurons

    neurons = {n: m for n, m in model.named_modules() if isinstance(m, LIFNode)}
    spikes: dict[str, list[torch.Tensor]] = {n: [] for n in neurons}
    handles = [
        m.register_forward_hook(lambda m, a, out, key=n: spikes[key].append(out.detach().clone()))
        for n, m in neurons.items()
    ]
    saved = {n: m.v_reset for n, m in neurons.items()}
    was_training = model.training
    model.eval()
    try:
        if hard_reset:
            for m in neurons.values():
                m.v_reset = 0.0
        reset_neurons(model)
        summed = 0.0
        for _ in range(T):
            summed = summed + model(x)
    finally:
        for n, m in neurons.items():
            m.v_reset = saved[n]
        for h in handles:
            h.remove()
        reset_neurons(model)
        model.train(was_training)
    return summed, spikes


def compare(model: nn.Module, graph: nir.NIRGraph | str | Path, x: torch.Tensor, T: int) -> dict:
    """Run ``model`` (bso) and the NIR graph (spikingjelly's importer) on the batch ``x`` for ``T``
    steps, both with bso's soft reset and both with NIR's hard reset, and say how far apart they
    are: per reset, the largest |logit difference|, the fraction of spikes that differ and of
    predictions that agree; and how often bso's predictions survive a target that applies NIR's
    hard reset as written (``bso_vs_hard_reset_agreement``)."""
    dtype = model.classifier.weight.dtype
    x = x.to(dtype)
    result = {}
    outputs = {}
    for reset in ("soft", "hard"):
        ours, our_spikes = run_bso(model, x, T, hard_reset=reset == "hard")
        theirs, their_spikes = simulate(graph, x, T, soft_reset=reset == "soft", dtype=dtype)
        ours_all = torch.cat([torch.stack(v).flatten() for v in our_spikes.values()])
        theirs_all = torch.cat([torch.stack(v).flatten() for v in their_spikes.values()])
        outputs[reset] = (ours, theirs)
        result[reset] = {
            "max_abs_logit_diff": float((ours - theirs).abs().max()),
            "spike_mismatch": float((ours_all != theirs_all).double().mean()),
            "prediction_agreement": float((ours.argmax(-1) == theirs.argmax(-1)).double().mean()),
            "spiking_layers": len(their_spikes),
        }
    bso_soft, nir_hard = outputs["soft"][0], outputs["hard"][1]
    result["bso_vs_hard_reset_agreement"] = float(
        (bso_soft.argmax(-1) == nir_hard.argmax(-1)).double().mean()
    )
    return result
