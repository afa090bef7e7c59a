"""What a spiking network costs at inference: per-layer firing rates, synaptic operations (SOPs)
and an energy estimate, counted by forward hooks during an evaluation pass (docs/metrics.md).

* **Firing rate** of a spiking layer (every spikingjelly neuron, i.e. every :class:`bso.neurons.LIFNode`):
  spikes / (neurons x time steps x samples), in [0, 1].
* **SOPs** of a synaptic layer whose input is spikes (binary convs and, in a full-precision SNN,
  every conv after the first): the accumulates the spikes cause, ``sum over input spikes of their
  fan-out`` (the outputs each spike reaches: ``C_out x k x k`` inside the image for a conv,
  ``out_features`` for a linear layer). An average pool between two layers (VGG's ``AP2``) makes
  the input a count of spikes / n; each of those spikes is counted (the pool folded into the next
  layer, whose weights it scales by 1/n): ``SOPs = sum over inputs of n * value * fan-out``.
* **MACs** of a synaptic layer whose input is real-valued (the full-precision first conv on the
  image, the classifier on the global average of the spikes, a ResNet's real-valued shortcut):
  every input times its fan-out, dense (``output elements x fan-in``).
* **Energy**: ``SOPs x E_AC + MACs x E_MAC``; by default E_AC = 0.9 pJ and E_MAC = 4.6 pJ, the
  45 nm 32-bit floating-point add and multiply+add of Horowitz (ISSCC 2014), the convention of the
  SNN literature (spikingjelly's ``SimpleEnergyCostConfig.fp32()`` preset, whose numbers are used
  here). Configurable (``metrics.energy.ac_pj`` / ``mac_pj``); memory traffic is not modelled.

All counts are per sample, summed over the T time steps of one inference. Whether a layer's input
is spikes is read from the model where it says so (:attr:`SpikingConvBlock.input_levels`: 1 for
spikes, n for averages of n spikes, None for real values) and otherwise from the values: a layer
that receives any entry other than 0 and 1 during the evaluation is counted in MACs.

Counting rides on an existing evaluation (:func:`bso.engine.evaluate`): :class:`SNNCounter` adds
hooks for its duration and removes them after; no model copy, no second pass. Works on packed
(lean mode) models too: it reads shapes, never the weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from spikingjelly.activation_based import neuron as sj_neuron
from spikingjelly.activation_based.op_counter import SimpleEnergyCostConfig
from torch import nn
from torch.nn.grad import conv2d_input

from bso.distributed import all_reduce_sum

_FP32 = SimpleEnergyCostConfig.fp32()  # Horowitz 2014, 45 nm, 32-bit float: MAC 4.6 pJ, AC 0.9 pJ


@dataclass(frozen=True)
class EnergyModel:
    """Energy per operation in picojoules (default: Horowitz 2014, 45 nm, 32-bit float)."""

    ac_pj: float = _FP32.e_ac_pj
    mac_pj: float = _FP32.e_mac_pj
    source: str = "Horowitz, ISSCC 2014: 45 nm, 32-bit float add (AC) / multiply-add (MAC)"

    def __post_init__(self):
        for name in ("ac_pj", "mac_pj"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(
                    f"metrics.energy.{name} must be a number >= 0 (picojoules per operation), "
                    f"got {value!r}"
                )

    @classmethod
    def from_config(cls, energy: Mapping | None) -> EnergyModel:
        energy = dict(energy or {})
        unknown = sorted(set(energy) - {"ac_pj", "mac_pj"})
        if unknown:
            raise ValueError(
                f"unknown metrics.energy keys {unknown}; metrics.energy takes ac_pj and mac_pj"
            )
        return cls(**{k: float(v) for k, v in energy.items()})


def _input_levels(model: nn.Module) -> dict[nn.Module, int | None]:
    """{synaptic layer: what its input holds} where a block says so (1: spikes, n: averages of n
    spikes, None: real values)."""
    levels = {}
    for module in model.modules():
        conv = getattr(module, "conv", None)
        if isinstance(conv, nn.Conv2d) and hasattr(module, "input_levels"):
            levels[conv] = module.input_levels
    return levels


def _is_spikes(x: torch.Tensor) -> bool:
    return bool(((x == 0) | (x == 1)).all())


_COVERAGE: dict = {}


def coverage(conv: nn.Conv2d, height: int, width: int, device) -> torch.Tensor:
    """[H, W] float64: how many of ``conv``'s output positions each input position reaches (its
    spatial fan-out: k x k inside the image, fewer at the borders, for stride 1 'same' padding),
    the input gradient of the summed output of an all-ones 1-channel kernel (cached per shape)."""
    key = (conv.kernel_size, conv.stride, conv.padding, conv.dilation, height, width, str(device))
    if key not in _COVERAGE:
        ones = torch.ones(1, 1, *conv.kernel_size, dtype=torch.float64, device=device)
        out = F.conv2d(
            torch.zeros(1, 1, height, width, dtype=torch.float64, device=device),
            ones,
            None,
            conv.stride,
            conv.padding,
            conv.dilation,
        )
        _COVERAGE[key] = conv2d_input(
            (1, 1, height, width),
            ones,
            torch.ones_like(out),
            conv.stride,
            conv.padding,
            conv.dilation,
        )[0, 0]
    return _COVERAGE[key]


def conv_fanout_sum(counts: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """sum over input entries of ``counts x`` the number of outputs that entry reaches (its fan-out)
    as one float64 scalar: ``(C_out / groups) x sum over positions of counts x coverage``."""
    per_position = counts.sum(dim=(0, 1), dtype=torch.float64)  # [H, W]
    cover = coverage(conv, *per_position.shape, counts.device)
    return (per_position * cover).sum() * (conv.out_channels // conv.groups)


def spike_ops(module: nn.Module, x: torch.Tensor, levels: int) -> torch.Tensor:
    """The accumulates of one call of a conv or linear layer whose input ``x`` holds spikes
    (``levels`` 1) or averages of ``levels`` spikes: sum over spikes of their fan-out (float64)."""
    counts = x if levels == 1 else x * levels
    if isinstance(module, nn.Conv2d):
        return conv_fanout_sum(counts, module)
    return counts.double().sum() * module.out_features


def dense_macs(module: nn.Module, out: torch.Tensor) -> int:
    """The multiply-accumulates of one dense call: output elements x fan-in."""
    return out.numel() * _fan_in(module)


def _fan_in(module: nn.Module) -> int:
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return module.in_channels // module.groups * kh * kw
    return module.in_features


class SNNCounter:
    """Counts spikes and synaptic operations of ``model`` while it runs, by forward hooks.

    ``with SNNCounter(model, T) as counter: evaluate(model, ...)`` then ``counter.record()``: the
    metrics keyed ``firing_rate/<layer>``, ``sops/<layer>``, ``macs/<layer>``, ``sops/total``,
    ``macs/total``, ``energy/{ac,mac,total}_uj`` (per sample) and ``spikes/per_sample``. ``T`` is the
    number of forward calls per sample (time steps). Under torchrun the counts are summed over ranks."""

    def __init__(self, model: nn.Module, T: int, energy: EnergyModel | None = None):
        self.model, self.T, self.energy = model, int(T), energy or EnergyModel()
        self.neurons = {
            m: name for name, m in model.named_modules() if isinstance(m, sj_neuron.BaseNode)
        }
        self.synapses = {
            m: name for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))
        }
        self.levels = _input_levels(model)
        self.handles: list = []
        self.reset()

    def reset(self) -> None:
        self.steps = 0  # forward calls x batch size = samples x T
        self.spikes = {name: 0.0 for name in self.neurons.values()}
        self.neuron_steps = {name: 0 for name in self.neurons.values()}
        self.sops = {name: 0.0 for name in self.synapses.values()}
        self.macs = {name: 0 for name in self.synapses.values()}
        self.real_input: set[str] = set()  # layers that received real values
        self._pending: list = []  # device scalars, summed once at the end (no sync per step)

    # hooks ------------------------------------------------------------------------------------
    def _on_model(self, module, args):
        self.steps += args[0].shape[0]

    def _on_neuron(self, module, args, out):
        name = self.neurons[module]
        self._pending.append(("spikes", name, out.detach().sum(dtype=torch.float64)))
        self.neuron_steps[name] += out.numel()

    def _on_synapse(self, module, args, out):
        """Both counts of every call; a layer that ever receives real values (a block that says so,
        or any entry other than 0 and 1) is counted in MACs, any other in SOPs (:meth:`record`)."""
        name, x = self.synapses[module], args[0].detach()
        levels = self.levels.get(module, "values")
        if levels == "values":
            levels = 1 if _is_spikes(x) else None
        if levels is None:
            self.real_input.add(name)
        else:
            self._pending.append(("sops", name, spike_ops(module, x, levels)))
        self.macs[name] += dense_macs(module, out)

    def __enter__(self) -> SNNCounter:
        if not self.neurons:
            raise ValueError(f"{type(self.model).__name__} has no spiking neurons to count")
        self.reset()
        self.handles.append(self.model.register_forward_pre_hook(self._on_model))
        self.handles += [m.register_forward_hook(self._on_neuron) for m in self.neurons]
        self.handles += [m.register_forward_hook(self._on_synapse) for m in self.synapses]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        for what, name, value in self._pending:
            table = self.spikes if what == "spikes" else self.sops
            table[name] += float(value)
        self._pending.clear()

    # results ----------------------------------------------------------------------------------
    def totals(self) -> dict:
        """The raw sums over every rank: samples, and per layer spikes, neuron-steps, operations."""
        spike_names, op_names = list(self.spikes), list(self.sops)
        real = [float(n in self.real_input) for n in op_names]
        flat = torch.tensor(
            [self.steps]
            + [self.spikes[n] for n in spike_names]
            + [self.neuron_steps[n] for n in spike_names]
            + [self.sops[n] for n in op_names]
            + [self.macs[n] for n in op_names]
            + real,
            dtype=torch.float64,
        )
        flat = all_reduce_sum(flat).tolist()
        k, m = len(spike_names), len(op_names)
        parts = [flat[1 + i * k : 1 + (i + 1) * k] for i in range(2)]
        ops = [flat[1 + 2 * k + i * m : 1 + 2 * k + (i + 1) * m] for i in range(3)]
        return {
            "samples": flat[0] / self.T,
            "spikes": dict(zip(spike_names, parts[0], strict=True)),
            "neuron_steps": dict(zip(spike_names, parts[1], strict=True)),
            "sops": dict(zip(op_names, ops[0], strict=True)),
            "macs": dict(zip(op_names, ops[1], strict=True)),
            "real_input": {n for n, r in zip(op_names, ops[2], strict=True) if r},
        }

    def record(self) -> dict:
        """Per-sample metrics under stable keys (see the class docstring); {} if nothing ran."""
        t = self.totals()
        samples = t["samples"]
        if not samples:
            return {}
        record = {}
        for name, spikes in t["spikes"].items():
            record[f"firing_rate/{name}"] = spikes / max(t["neuron_steps"][name], 1)
        record["firing_rate/all"] = sum(t["spikes"].values()) / max(
            sum(t["neuron_steps"].values()), 1
        )
        record["spikes/per_sample"] = sum(t["spikes"].values()) / samples
        totals = {"sop": 0.0, "mac": 0.0}
        for name, macs in t["macs"].items():
            if not macs:  # never called
                continue
            kind = "mac" if name in t["real_input"] else "sop"
            ops = (macs if kind == "mac" else t["sops"][name]) / samples
            record[f"{kind}s/{name}"] = ops
            totals[kind] += ops
        record["sops/total"] = totals["sop"]
        record["macs/total"] = totals["mac"]
        record["energy/ac_uj"] = totals["sop"] * self.energy.ac_pj * 1e-6
        record["energy/mac_uj"] = totals["mac"] * self.energy.mac_pj * 1e-6
        record["energy/total_uj"] = record["energy/ac_uj"] + record["energy/mac_uj"]
        return record


class NoCounter:
    """``metrics.snn=false``: counts nothing."""

    def __enter__(self) -> NoCounter:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def record(self) -> dict:
        return {}


def counter_for(cfg, model: nn.Module, T: int) -> SNNCounter | NoCounter:
    """The counter a run's config asks for (``metrics.snn``, ``metrics.energy``; on by default)."""
    metrics = cfg.get("metrics") or {}
    unknown = sorted(set(metrics) - {"snn", "energy"})
    if unknown:
        raise ValueError(f"unknown metrics keys {unknown}; metrics takes snn and energy")
    if not metrics.get("snn", True):
        return NoCounter()
    return SNNCounter(model, T, EnergyModel.from_config(metrics.get("energy")))


@torch.no_grad()
def measure(
    model: nn.Module,
    loader,
    T: int,
    device,
    energy: EnergyModel | None = None,
    mse_weight: float = 0.0,
) -> dict:
    """Evaluate ``model`` on ``loader`` (test loss, accuracy) and count its firing rates, SOPs and
    energy in the same pass: one record, as a training epoch logs them (``test/...`` keys for the
    accuracy)."""
    from bso.engine import evaluate

    with SNNCounter(model, T, energy) as counter:
        metrics = evaluate(model, loader, T, device, mse_weight)
    return {**{f"test/{k}": v for k, v in metrics.items()}, **counter.record()}
