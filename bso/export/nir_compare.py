"""An NIR graph run beside the bso model it was exported from (:mod:`bso.export.nir`): the graph
through spikingjelly's NIR importer (:func:`simulate`), the model as bso evaluates it
(:func:`run_bso`), and how far apart they are (:func:`compare`; ``scripts/export_nir.py --check``,
``scripts/check_nir.py``)."""

from __future__ import annotations

from pathlib import Path

import nir
import torch
from spikingjelly.activation_based import neuron as sj_neuron
from torch import nn

from bso.export.nir import DT, read_nir
from bso.neurons import LIFNode


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
    step; the output flattened to (batch, classes)). ``soft_reset=True`` switches the imported
    neurons to subtracting the threshold (what the metadata says a soft-reset model does); ``False``
    runs NIR's reset as written."""
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
    return summed.flatten(1), spikes


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
    steps and say how far apart they are: the largest |logit difference|, the fraction of spikes
    that differ and of predictions that agree. A model with the soft reset is compared twice, both
    sides with bso's soft reset and both with NIR's hard reset, plus how often its predictions
    survive a target that applies NIR's hard reset as written (``bso_vs_hard_reset_agreement``);
    a model with a hard reset (``v_reset`` a number) once, as trained (``"hard"``)."""
    dtype = model.classifier.weight.dtype
    x = x.to(dtype)
    soft = all(m.v_reset is None for m in model.modules() if isinstance(m, LIFNode))
    result = {}
    outputs = {}
    for reset in ("soft", "hard") if soft else ("hard",):
        ours, our_spikes = run_bso(model, x, T, hard_reset=soft and reset == "hard")
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
    if soft:
        bso_soft, nir_hard = outputs["soft"][0], outputs["hard"][1]
        result["bso_vs_hard_reset_agreement"] = float(
            (bso_soft.argmax(-1) == nir_hard.argmax(-1)).double().mean()
        )
    return result
