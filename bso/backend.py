"""How the LIF step, the lean BatchNorm + LIF backward and the binary optimizer's arithmetic run:
one choice, ``backend`` (configs/train.yaml; ``backend=`` of :class:`bso.neurons.LIFNode`,
:class:`bso.optim.BSO` / :class:`bso.optim.TBSO`, :func:`bso.convert`, :func:`apply`).

=======  ========================================================================================
backend  what runs
=======  ========================================================================================
release  The released code's float32 order everywhere (the default): the LIF step as eager torch
         operations with spikingjelly's sigmoid surrogate, whose backward rounds as the release's
         ``((dL/ds * (1 - sg)) * sg) * alpha``, and BSO / T-BSO in the release's order. A run is
         bit for bit the release's (docs/parity.md).
fast     spikingjelly's LIF step (its fused CUDA / Triton kernels, its CPU composite; backward
         ``dL/ds * ((1 - sg) * sg * alpha)``) and BSO / T-BSO in fewer passes over memory: the same
         method, other roundings.
fused    The release's values bit for bit, with the online LIF step, its trace, its surrogate
         backward and the average pools as compiled loops (:mod:`bso.compiled`, torch.compile).
         BSO / T-BSO run in the release's order (nothing of the optimizer is compiled). Online
         training only; on the CPU it needs a C++ compiler.
=======  ========================================================================================

Which implementation a module runs is decided here, once per module kind:

* the LIF step (:class:`bso.neurons.LIFNode`): :func:`neuron_step`;
* the lean mode's LIF input gradient from the neuron's state (:mod:`bso.lean.batchnorm_lif`):
  :func:`lean_input_gradient`;
* an average pool's input gradient in the lean mode: :func:`pool_input_gradient`;
* BSO / T-BSO's momentum, second moment and flip test (:mod:`bso.optim.binary`):
  :func:`optimizer_arithmetic`.

The release's step computes the paper's neuron only (soft reset, undecayed input:
:func:`is_release_neuron`); another neuron runs spikingjelly's step under every backend. The fused
step covers an online neuron with the sigmoid surrogate (:func:`why_not_fused`) while autograd is
on; elsewhere (BPTT, evaluation) a ``fused`` neuron runs the release's eager step, whose values
these are.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

BACKENDS = {
    "release": "the released code's float32 order, bit for bit (eager LIF step, release rounding)",
    "fast": "spikingjelly's LIF kernels and BSO / T-BSO in fewer passes (other roundings)",
    "fused": "the release's values, the online LIF step and the pools as compiled loops",
}
DEFAULT = "release"
# the binary optimizer's order under each backend: fused compiles no optimizer code
OPTIMIZER_ORDER = {"release": "release", "fast": "fast", "fused": "release"}


def check(name: str, model: nn.Module | None = None, device: torch.device | None = None) -> str:
    """Refuse, in one line, a backend that is unknown or cannot run ``model`` (when given, its
    neurons configured by the engine) on ``device`` (default: where its parameters are):
    ``fused`` needs an online neuron it covers (not BPTT) and, on the CPU, a C++ compiler.
    Returns ``name``."""
    if name not in BACKENDS:
        choices = "; ".join(f"{key}: {doc}" for key, doc in BACKENDS.items())
        raise ValueError(f"unknown backend {name!r}; choose one of {list(BACKENDS)} ({choices})")
    if name != "fused" or model is None:
        return name
    from bso.neurons import LIFNode

    neurons = [m for m in model.modules() if isinstance(m, LIFNode)]
    if not any(why_not_fused(n) is None for n in neurons):
        reason = why_not_fused(neurons[0]) if neurons else "it has no bso.neurons.LIFNode"
        raise ValueError(
            "backend=fused compiles the online LIF step and its trace, but no neuron of this "
            f"model can run it: {reason}. Use backend=release (engine=bptt: always)"
        )
    devices = {p.device.type for p in model.parameters()} if device is None else {device.type}
    if "cpu" in devices:
        from bso.compiled import check_compiler

        check_compiler()
    return name


def is_release_neuron(neuron: nn.Module) -> bool:
    """Whether the release's eager step computes ``neuron``: soft reset and an undecayed input."""
    return neuron.v_reset is None and not neuron.decay_input


def why_not_fused(neuron: nn.Module) -> str | None:
    """None where the compiled step (:func:`bso.compiled.fused_step`) runs exactly ``neuron``'s
    release step; else the reason."""
    from spikingjelly.activation_based import surrogate

    if neuron.trace_rule is None or not neuron.detach_state:
        return "it is not an online neuron (BPTT: no trace, a graph through time)"
    if not is_release_neuron(neuron):
        return "it has a hard reset or a decayed input (not the paper's LIF)"
    function = neuron.surrogate_function
    if not (isinstance(function, surrogate.Sigmoid) and function.spiking):
        return f"its surrogate is {type(function).__name__}, not the sigmoid"
    return None


def _implementation(neuron: nn.Module, compiled_step: bool) -> str:
    """The implementation ``neuron`` runs: its backend, narrowed to what covers the neuron
    (``compiled_step``: whether the compiled loops would run it now)."""
    if not is_release_neuron(neuron):
        return "fast"  # the release's step (and so the fused one) is the paper's neuron only
    if neuron.backend == "fused" and not (compiled_step and why_not_fused(neuron) is None):
        return "release"  # the fused loops' values, eagerly
    return neuron.backend


def neuron_step(neuron: nn.Module):
    """The function that runs one step of LIF ``neuron``:
    ``step(neuron, x, v[t-1], a_hat[t-1], p[t-1]) -> (s[t], v[t], a_hat[t], p[t])``. The fused
    step runs while autograd is on (online training; the lean mode's forward included)."""
    return _table("neuron step")[_implementation(neuron, torch.is_grad_enabled())]


def lean_input_gradient(neuron: nn.Module):
    """The function that gives the lean mode's dL/dI[t] of online LIF ``neuron`` from its state
    (:mod:`bso.lean.batchnorm_lif`): ``gradient(neuron, dL/ds[t], v[t], s[t]) -> dL/dI[t]``, bit
    for bit the plain graph's under the same backend."""
    return _table("lean input gradient")[_implementation(neuron, True)]


def pool_input_gradient(pool: nn.Module):
    """avg_pool2d's input-gradient kernel for average pool ``pool`` (the lean mode runs it
    itself): compiled for a pool of the fused backend (:class:`bso.compiled.FusedAvgPool2d`),
    torch's otherwise. Called as ``kernel(grad, like, kernel_size, stride, padding, ceil_mode,
    count_include_pad, divisor_override)``."""
    return _table("pool input gradient")[getattr(pool, "backend", DEFAULT)]


def optimizer_arithmetic(name: str):
    """The arithmetic BSO / T-BSO run under backend ``name``: a class of static methods
    (``momentum_``, ``second_moment``, ``bso_flip``, ``tbso_flip``, :mod:`bso.optim.binary`)."""
    from bso.optim import binary

    return {"release": binary.ReleaseOrder, "fast": binary.FastOrder}[OPTIMIZER_ORDER[name]]


def apply(model: nn.Module, name: str, device: torch.device | None = None) -> nn.Module:
    """Run ``model`` under backend ``name`` (checked by :func:`check` for ``device``, default:
    where its parameters are), in place; returns
    ``model``. Sets its LIF neurons' backend; ``fused`` (after the engine configured the neurons)
    also puts compiled average pools in place of its plain ones (:func:`bso.compiled.fuse_pools`)."""
    from bso.neurons import LIFNode

    check(name, model, device)
    if name == "fused":
        from bso.compiled import fuse_pools

        fuse_pools(model)
    for neuron in (m for m in model.modules() if isinstance(m, LIFNode)):
        neuron.backend = name
    return model


@functools.cache
def _table(kind: str) -> dict:
    """Backend -> implementation for each module kind (imported on first use: bso.compiled's
    loops are compiled only when one runs)."""
    from bso import compiled
    from bso.lean import batchnorm_lif as lean
    from bso.neurons import LIFNode

    return {
        "neuron step": {
            "release": LIFNode.release_online_step,
            "fast": LIFNode.spikingjelly_online_step,
            "fused": compiled.fused_step,
        },
        "lean input gradient": {
            "release": lean.release_input_gradient,
            "fast": lean.spikingjelly_input_gradient,
            "fused": compiled.lif_input_gradient_from_state,
        },
        "pool input gradient": {
            "release": torch.ops.aten.avg_pool2d_backward,
            "fast": torch.ops.aten.avg_pool2d_backward,
            "fused": compiled.average_pool_input_gradient,
        },
    }[kind]
