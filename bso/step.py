"""One time step of online training, for a user's own loop: :func:`online_step`.

    for x, y in loader:
        for t in range(T):
            out = bso.online_step(model, optimizer, x, y, t=t, T=T)   # forward, loss, backward, flip

It is the time step :class:`bso.engine.OnlineEngine` runs with ``update=per_step``
(:func:`bso.engine.common.time_step`; paper section 2 and Algorithm 1): the graph of step t is freed
by its backward, so training memory does not grow with T.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from bso.engine.common import PAPER_MSE_WEIGHT, instantaneous_loss, time_step
from bso.neurons import LIFNode, reset_neurons
from bso.optim.binary import TBSO
from bso.optim.router import OptimizerRouter


@dataclass
class StepOutput:
    """What :func:`online_step` returns, detached: the model's output at step t, the loss L[t] and
    the number of sign flips of each binary weight (``optimizer.binary_names`` names them)."""

    output: torch.Tensor
    loss: torch.Tensor
    flips: torch.Tensor


def online_step(
    model: nn.Module,
    optimizer: OptimizerRouter,
    x: torch.Tensor,
    target: torch.Tensor,
    t: int,
    T: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    mse_weight: float | None = None,
) -> StepOutput:
    """Time step ``t`` (0-based, ``0 <= t < T``) of online training on one batch.

    At ``t == 0`` the neurons' state (membrane potential, trace) is reset: a new batch begins. Then
    ``output = model(x)`` (``x`` is the input at this step: the same static image at every t, or
    frame t of an event stream), ``loss = loss_fn(output, target)`` -- by default the paper's
    ``L[t] = ((1 - l) CE + l MSE) / T`` with ``l = mse_weight`` (default 0.05) --,
    ``loss.backward()`` (the binary layers' weight gradient comes from the presynaptic trace,
    ``G[t] = delta[t] a_hat[t]^T``) and ``optimizer.step(t)``: BSO / T-BSO flip the +-1 weights
    (T-BSO with its second moment of step t), the full-precision optimizer steps the rest. In the
    lean mode (:func:`bso.make_lean`) the flips happen inside ``backward``. The engine's time step,
    :func:`bso.engine.common.time_step`, does all but the reset.

    ``model`` is a converted model (:func:`bso.convert` with a trace) and ``optimizer`` a
    :class:`bso.CaseOptimizer` built on it.
    """
    _check(model, optimizer, t, T)
    if t == 0:
        reset_neurons(model)
    if loss_fn is None:
        mse_weight = PAPER_MSE_WEIGHT if mse_weight is None else mse_weight
        loss_fn = partial(instantaneous_loss, mse_weight=mse_weight, T=T)
    elif mse_weight is not None:
        raise ValueError("online_step takes loss_fn= or mse_weight= (the paper's loss), not both")
    return StepOutput(*time_step(model, optimizer, x, target, t, loss_fn))


def reset(model: nn.Module) -> None:
    """Clear every neuron's membrane potential and trace before a new sample (spikingjelly's
    ``functional.reset_net``); :func:`online_step` does it itself at ``t == 0``."""
    reset_neurons(model)


def _check(model: nn.Module, optimizer, t: int, T: int) -> None:
    if int(T) < 1:
        raise ValueError(f"T (time steps per sample) must be >= 1, got {T}")
    if not 0 <= int(t) < int(T):
        raise IndexError(f"time step t={t} is outside [0, T) = [0, {T})")
    if not isinstance(optimizer, OptimizerRouter):
        raise TypeError(
            f"online_step needs a bso.CaseOptimizer (BSO / T-BSO for the +-1 weights plus a "
            f"full-precision optimizer for the rest), got {type(optimizer).__name__}"
        )
    neurons = [m for m in model.modules() if isinstance(m, LIFNode)]
    if not neurons:
        raise ValueError(
            f"{type(model).__name__} has no spiking neurons, so it has no time steps to train "
            "online: train it in your own loop (loss.backward(); optimizer.step()), or convert a "
            "spiking network (spikingjelly LIFNode) with bso.convert"
        )
    offline = [n for n in neurons if n.trace_rule is None or not n.detach_state]
    if offline:
        raise ValueError(
            f"{type(model).__name__}'s neurons are set up for BPTT (no presynaptic trace): convert "
            "the model with a trace for online training, bso.convert(model, trace='ndot')"
        )
    binary = optimizer.binary
    if isinstance(binary, TBSO) and binary.num_steps != int(T):
        raise ValueError(
            f"the T-BSO optimizer keeps num_steps={binary.num_steps} second moments per layer, but "
            f"online_step was given T={T}: build it with bso.TBSO(params, num_steps={T})"
        )
