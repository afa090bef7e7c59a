"""Export a trained spiking VGG or ResNet to NIR, the Neuromorphic Intermediate Representation
(docs/metrics.md).

The graph is written node by node with the ``nir`` package, in the shapes of the NIR spec, and only
with the nodes that NIR's common consumers (snnTorch, Norse, Sinabs, spikingjelly) all map:
``Input -> (Conv2d -> LIF) x blocks -> Conv2d (the classifier) -> Output``; a residual addition
is two edges into one node (NIR sums a node's inputs).

* **BatchNorm** is folded into the conv before it with the inference statistics
  (:func:`fold_batchnorm`).
* **Average pools** become part of the next conv: ``conv_K(avgpool_k(s))`` is one conv with kernel
  ``k K`` (each weight repeated over a k x k block, divided by k^2), stride ``k x stride`` and
  padding ``k x padding`` (exact where the pool's input size is a multiple of k). snnTorch has no
  SumPool2d, Norse no AvgPool2d: neither pool is in the file.
* **The classifier** (global average pool, then the linear layer) is a Conv2d whose kernel covers the
  whole last feature map, weights ``W / (h w)``; its output has shape (classes, 1, 1). No Flatten
  (snnTorch takes NIR's ``start_dim`` without the batch offset).
* **LIF**: bso's step ``u[t] = u[t-1] - (u[t-1] - v_r) / tau + I[t]`` (tau in steps; v_r = 0 for the
  soft reset) is NIR's ``tau_NIR dv/dt = (v_leak - v) + r I`` by forward Euler with ``dt`` seconds per
  step, for ``v = u / tau``: ``tau_NIR = tau dt``, ``r = 1``, ``v_leak = v_reset = v_r / tau``,
  ``v_threshold = V_th / tau``. (``r = 1`` because Norse ignores ``r``; snnTorch rescales to the same
  network.) ``dt`` (1e-4 s by default, snnTorch's fixed step) is in the graph's metadata.

What NIR cannot say is in the metadata, and what a consumer then runs is measured by
``scripts/check_nir.py``:

* **reset**: a neuron with ``model.neuron.v_reset=null`` (the paper's) subtracts the threshold; NIR's
  LIF resets to ``v_reset``. Such a model is written with ``v_reset = 0`` and
  ``metadata["reset"] = "subtract"``; a consumer that applies NIR's reset runs a different network.
  A model trained with ``model.neuron.v_reset=<number>`` is NIR's neuron exactly.
* **threshold**: bso fires at ``v >= V_th``, NIR's text says ``v > v_th``: equal but at exact ties.
* **time**: bso feeds the same image at every step and predicts the argmax of the output summed over
  ``metadata["T"]`` steps (``metadata["encoding"]``, ``["readout"]``).

What NIR has no node for fails with :class:`NIRExportError` naming the layer: max pooling, AGMM's
gate, grouped, dilated or non-zero-padded convs, a pool whose input size is not a multiple of its
kernel.
"""

from __future__ import annotations

from pathlib import Path

import nir
import numpy as np
import torch
from torch import nn

from bso.export.nir_support import NIRExportError, check_exportable, pair, unsupported
from bso.layers import BINARY_AT_INFERENCE, SynapticConv2d
from bso.models.resnet import BiRealResNet18, SpikingResNet19
from bso.models.vgg import SpikingVGG
from bso.neurons import LIFNode

DT = 1e-4  # seconds per time step: snnTorch's fixed step, spikingjelly's default


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
        a = _batchnorm_scale(bn)
        beta = bn.bias.double() if bn.bias is not None else 0.0
        w, b = w * a.view(-1, 1, 1, 1), a * (b - bn.running_mean.double()) + beta
    return w.to(dtype), b.to(dtype)


def _batchnorm_scale(bn: nn.BatchNorm2d) -> torch.Tensor:
    """a = gamma / sqrt(running_var + eps), float64."""
    if bn.running_mean is None:
        raise NIRExportError("BatchNorm without running statistics cannot be folded for inference")
    a = bn.running_var.double().add(bn.eps).rsqrt()
    return a * bn.weight.double() if bn.weight is not None else a


def _conv_output(size: tuple[int, int], kernel: int, stride: tuple, padding: tuple):
    return tuple(
        (n + 2 * p - kernel) // s + 1 for n, s, p in zip(size, stride, padding, strict=True)
    )


@torch.no_grad()
def _conv_arrays(
    name: str, conv: SynapticConv2d, bn: nn.Module, pool: int, binary_weights: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(weight, bias, state scale per output channel) of ``bn(conv(avgpool_pool(x)))`` as one conv:
    BatchNorm folded, the average pool (kernel ``pool``, 1 for none) folded in by repeating the
    kernel's weights over pool x pool blocks, divided by pool^2. With ``binary_weights`` a binary
    conv keeps +-1 weights: BatchNorm's scale a and the pool's 1/k^2 go into the neuron's state,
    scaled by ``k^2 / |a|`` (threshold and bias with it)."""
    weight, bias = fold_batchnorm(conv, bn, torch.float64)
    scale = torch.ones_like(bias)
    if binary_weights and conv.weights in BINARY_AT_INFERENCE and isinstance(bn, nn.BatchNorm2d):
        a = _batchnorm_scale(bn)
        if torch.any(a == 0):
            raise unsupported(
                name.replace("conv", "bn"),
                bn,
                f"channel {int(torch.nonzero(a == 0)[0])} has a zero scale (gamma = 0); its "
                "threshold cannot absorb it (export with binary_weights=False)",
            )
        scale = pool * pool / a.abs()
        weight = conv.effective_weight().detach().double() * a.sign().view(-1, 1, 1, 1)
        bias = bias * scale
    else:
        weight = weight / (pool * pool)
    if pool > 1:
        weight = weight.repeat_interleave(pool, dim=2).repeat_interleave(pool, dim=3)
    return weight.numpy(), bias.numpy(), scale.numpy()


def _lif(neuron: LIFNode, shape: tuple, scale: np.ndarray, dt: float, dtype, name: str) -> nir.LIF:
    """NIR's LIF for ``neuron`` (module docstring), state scaled per channel by ``scale / tau``."""
    tau = float(neuron.tau)
    per_channel = (np.asarray(scale, np.float64) / tau).reshape(-1, 1, 1)
    v_reset = 0.0 if neuron.v_reset is None else float(neuron.v_reset)

    def full(value):
        return np.ascontiguousarray(np.broadcast_to(np.asarray(value, np.float64), shape), dtype)

    return nir.LIF(
        tau=full(tau * dt),
        r=full(1.0),
        v_leak=full(v_reset * per_channel),
        v_threshold=full(neuron.v_threshold * per_channel),
        v_reset=full(v_reset * per_channel),
        metadata={
            "bso_layer": name,
            "reset": "subtract" if neuron.v_reset is None else "to v_reset",
            "fires_at": ">=",
            "tau_steps": tau,
            "state": "v = u / tau_steps (x the per-channel scale of binary_weights)",
        },
    )


class _GraphBuilder:
    """NIR nodes and edges, added layer by layer. A tensor is the list of the nodes whose outputs
    sum to it (NIR adds the inputs of a node): a residual addition is two edges into one node."""

    def __init__(self, input_shape: tuple, dtype, dt: float, binary_weights: bool):
        self.nodes: dict[str, nir.NIRNode] = {"input": nir.Input({"input": np.array(input_shape)})}
        self.edges: list[tuple[str, str]] = []
        self.dtype, self.dt, self.binary_weights = dtype, dt, binary_weights

    def conv(self, name, conv, bn, inputs: list[str], size: tuple, pool: int = 1):
        """Add ``bn(conv(avgpool(inputs)))`` as node ``name``; (node, output size, state scale)."""
        if any(n % pool for n in size):
            raise unsupported(
                name,
                conv,
                f"the average pool before it gets a {size[0]}x{size[1]} input, not a multiple of "
                f"its kernel {pool}, so it cannot be folded into this conv",
            )
        weight, bias, scale = _conv_arrays(name, conv, bn, pool, self.binary_weights)
        stride = tuple(pool * s for s in pair(conv.stride))
        padding = tuple(pool * p for p in pair(conv.padding))
        key = _node_name(name)
        self.nodes[key] = nir.Conv2d(
            input_shape=tuple(int(n) for n in size),
            weight=weight.astype(self.dtype),
            stride=stride,
            padding=padding,
            dilation=(1, 1),
            groups=1,
            bias=bias.astype(self.dtype),
        )
        self.edges += [(source, key) for source in inputs]
        return key, _conv_output(size, weight.shape[-1], stride, padding), scale

    def lif(self, name, neuron: LIFNode, inputs: list[str], shape: tuple, scale) -> str:
        key = _node_name(name)
        self.nodes[key] = _lif(neuron, shape, scale, self.dt, self.dtype, name)
        self.edges += [(source, key) for source in inputs]
        return key

    def classifier(self, fc, inputs: list[str], size: tuple, pool: int = 1) -> None:
        """The global average pool (after an average pool ``pool``) and ``fc`` as one conv over the
        whole feature map (weights / (h w)), then the output node."""
        if any(n % pool for n in size):
            raise unsupported(
                "classifier", fc, f"the last pool's input {size} is not a multiple of it"
            )
        weight = fc.effective_weight().detach().double()
        kernel = weight.view(*weight.shape, 1, 1).expand(*weight.shape, *size) / (size[0] * size[1])
        bias = fc.bias.detach().double() if fc.bias is not None else weight.new_zeros(len(weight))
        self.nodes["classifier"] = nir.Conv2d(
            input_shape=tuple(int(n) for n in size),
            weight=kernel.numpy().astype(self.dtype),
            stride=(1, 1),
            padding=(0, 0),
            dilation=(1, 1),
            groups=1,
            bias=bias.numpy().astype(self.dtype),
        )
        self.nodes["output"] = nir.Output({"output": np.array([fc.out_features, 1, 1])})
        self.edges += [(source, "classifier") for source in inputs]
        self.edges.append(("classifier", "output"))


def _node_name(name: str) -> str:
    return name.replace(".", "_")


def _vgg(model: SpikingVGG, graph: _GraphBuilder, size: tuple) -> None:
    x, pool = ["input"], 1
    for i, block in enumerate(model.blocks):
        conv, size, scale = graph.conv(f"blocks.{i}.conv", block.conv, block.bn, x, size, pool)
        shape = (block.conv.out_channels, *size)
        x = [graph.lif(f"blocks.{i}.neuron", block.neuron, [conv], shape, scale)]
        pool = pair(block.pool.kernel_size)[0] if isinstance(block.pool, nn.AvgPool2d) else 1
    graph.classifier(model.classifier, x, size, pool)


def _resnet19(model: SpikingResNet19, graph: _GraphBuilder, size: tuple) -> None:
    stem = model.stem
    conv, size, scale = graph.conv("stem.conv", stem.conv, stem.bn, ["input"], size)
    x = [graph.lif("stem.neuron", stem.neuron, [conv], (stem.conv.out_channels, *size), scale)]
    for i, block in enumerate(model.blocks):
        name = f"blocks.{i}"
        conv1, out, scale = graph.conv(f"{name}.conv1", block.conv1, block.bn1, x, size)
        shape = (block.conv1.out_channels, *out)
        h = graph.lif(f"{name}.neuron1", block.neuron1, [conv1], shape, scale)
        conv2, _, _ = graph.conv(f"{name}.conv2", block.conv2, block.bn2, [h], out)
        shortcut = x
        if block.down_conv is not None:
            down, _, _ = graph.conv(f"{name}.down_conv", block.down_conv, block.down_bn, x, size)
            shortcut = [down]
        x, size = [graph.lif(f"{name}.neuron2", block.neuron2, [conv2, *shortcut], shape, 1.0)], out
    graph.classifier(model.classifier, x, size)


def _bireal(model: BiRealResNet18, graph: _GraphBuilder, size: tuple) -> None:
    conv, size, _ = graph.conv("stem.0", model.stem[0], model.stem[1], ["input"], size)
    x, channels = [conv], model.stem[0].out_channels  # real values: the nodes that sum to them
    for i, block in enumerate(model.blocks):
        name = f"blocks.{i}"
        spikes = graph.lif(f"{name}.neuron", block.neuron, x, (channels, *size), 1.0)
        out, new_size, _ = graph.conv(f"{name}.conv", block.conv, block.bn, [spikes], size)
        if isinstance(block.shortcut, nn.Identity):
            x = [out, *x]
        else:
            pool = block.shortcut[0]
            k = pair(pool.kernel_size)[0] if isinstance(pool, nn.AvgPool2d) else 1
            down, _, _ = graph.conv(
                f"{name}.shortcut.1", block.shortcut[1], block.shortcut[2], x, size, k
            )
            x = [out, down]
        size, channels = new_size, block.conv.out_channels
    graph.classifier(model.classifier, x, size)


def to_nir(
    model: nn.Module,
    input_shape,
    path: str | Path | None = None,
    *,
    T: int | None = None,
    dt: float = DT,
    binary_weights: bool = False,
) -> nir.NIRGraph:
    """The NIR graph of a trained :class:`bso.models.SpikingVGG`, :class:`SpikingResNet19` or
    :class:`BiRealResNet18` (one time step; see the module docstring for what maps how); written
    to ``path`` (HDF5) when given. ``input_shape``: one sample's (channels, height, width); ``T``:
    the time steps it was trained with (metadata).

    ``binary_weights=True`` keeps the binary convs' weights exactly +-1 (BatchNorm's scale and the
    pools' 1/k^2 go into per-channel thresholds instead), for targets with 1-bit synapses and
    per-neuron thresholds; VGG only (a residual addition needs one scale on both paths)."""
    input_shape = tuple(int(s) for s in input_shape)
    if len(input_shape) != 3:
        raise ValueError(f"input_shape must be (channels, height, width), got {input_shape}")
    check_exportable(model)
    if binary_weights and not isinstance(model, SpikingVGG):
        raise unsupported(
            type(model).__name__,
            model,
            "binary_weights=True moves each channel's BatchNorm scale into its neurons' state, "
            "which a residual addition (two paths into one neuron) cannot take",
        )
    dtype = np.dtype(str(model.classifier.weight.dtype).removeprefix("torch."))
    graph = _GraphBuilder(input_shape, dtype, dt, binary_weights)
    build = {SpikingVGG: _vgg, SpikingResNet19: _resnet19, BiRealResNet18: _bireal}
    build[type(model)](model, graph, input_shape[1:])
    neurons = [m for m in model.modules() if isinstance(m, LIFNode)]
    soft = [n.v_reset is None for n in neurons]
    result = nir.NIRGraph(
        nodes=graph.nodes,
        edges=graph.edges,
        metadata={
            "producer": "bso",
            "model": type(model).__name__,
            "dt": float(dt),
            "time_step": f"{dt:g} s per step: snnTorch's fixed step; norse.torch.from_nir(graph, "
            f"dt={dt:g})",
            "T": -1 if T is None else int(T),
            "encoding": "direct: the same input at every time step",
            "readout": "argmax of the output summed over the T time steps",
            "reset": (
                "subtract V_th on a spike (soft reset); the LIF nodes' v_reset is not what bso runs"
                if all(soft)
                else "to v_reset (hard reset, NIR's LIF)"
                if not any(soft)
                else "mixed: see each LIF node's metadata"
            ),
            "batchnorm": "folded into the preceding conv with the inference statistics"
            + ("; binary convs: its scale into per-channel thresholds" if binary_weights else ""),
            "pools": "average pools folded into the next conv (kernel repeated, / k^2)",
            "classifier": "global average pool and linear layer as one conv, weights / (h w)",
            "additions": "a residual addition is two edges into one node (NIR sums the inputs)",
            "initial_state": "each LIF starts at v = v_leak (= v_reset; 0 for the soft reset)",
        },
    )
    if path is not None:
        write_nir(path, result)
    return result


def write_nir(path: str | Path, graph: nir.NIRGraph) -> None:
    """``nir.write``, leaving out each LIF node's ``v_reset`` where it is 0: NIR's default, which
    nir >= 1.0.5 reads back as 0, and a field that nir <= 1.0.4 (Sinabs' pin) cannot read."""
    import h5py

    nir.write(str(path), graph)
    with h5py.File(path, "r+") as f:
        for name, node in graph.nodes.items():
            if isinstance(node, nir.LIF) and not np.any(node.v_reset):
                del f["node"]["nodes"][name]["v_reset"]


def read_nir(path: str | Path) -> nir.NIRGraph:
    """Read an NIR file (``nir.read``) with an error that names the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"NIR file {path} not found")
    return nir.read(str(path))
