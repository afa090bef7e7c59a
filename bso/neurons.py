"""Leaky integrate-and-fire neuron of the paper's networks, on spikingjelly's LIF.

    u[t] = lambda * (u[t-1] - V_th * s[t-1]) + I[t],   s[t] = H(u[t] - V_th)

with lambda = 1 - 1/tau, soft reset (subtract V_th) and an undecayed input. spikingjelly stores the
post-reset potential ``v[t] = u[t] - V_th * s[t]``, so one of its steps is exactly this update.

For online training the neuron adds two things, both switched on by the online engine
(:func:`configure_neurons`):

* ``detach_state``: the potential carried from t-1 is detached, so no graph spans time steps;
* ``trace_rule``: a presynaptic trace ``a_hat[t] = mu[t] * a_hat[t-1] + s[t]``, kept without gradient,
  that the next synaptic layer uses for its weight gradient (see :mod:`bso.layers`):

  - ``"ottt"``: ``mu[t] = lambda`` (constant);
  - ``"ndot"`` (the released code, which produced the paper's numbers): with ``v[t]`` the potential
    after the soft reset, ``p[t] = v[t] - V_th s[t]`` (so ``V_th s`` is subtracted a second time) and
    ``mu[t] = clamp(p[t] / p[t-1], -lambda, lambda)``, ``lambda`` where ``p[t-1] = 0`` or the ratio
    is not finite;
  - ``"ndot_paper"`` (the paper's formula): ``mu[t] = (u[t] - V_th s[t]) / (u[t-1] - V_th s[t-1])
    = v[t] / v[t-1]`` clamped to ``[-lambda, lambda]``, ``lambda`` where the denominator is 0.

Every rule starts with ``a_hat[1] = s[1]``.

How a step runs is the neuron's ``backend`` (:mod:`bso.backend`, which picks the implementation):
``"release"`` runs the step as plain torch operations with spikingjelly's sigmoid surrogate
function, whose backward is the released code's ``((dL/ds * (1 - sg)) * sg) * alpha`` with
``sg = sigmoid(alpha * (h - V_th))``; ``"fast"`` runs spikingjelly's LIF step (its CUDA /
Triton kernels, its CPU composite), whose backward rounds the surrogate's product as
``dL/ds * ((1 - sg) * sg * alpha)``; ``"fused"`` runs the release's step and trace as compiled
loops (:mod:`bso.compiled`). The forward values are the same; the release order is what makes a
BSO / T-BSO run bit for bit the release's (docs/parity.md).
"""

from __future__ import annotations

import torch
from spikingjelly.activation_based import functional as sj_functional
from spikingjelly.activation_based import neuron as sj_neuron
from spikingjelly.activation_based import surrogate
from torch import nn

from bso import backend as backends

TRACE_RULES = ("ndot", "ndot_paper", "ottt")


class LIFNode(sj_neuron.LIFNode):
    """Single-step LIF neuron (tau 2, V_th 1, soft reset, sigmoid surrogate alpha 4) with an
    optional presynaptic trace for online training.

    ``v_reset`` follows spikingjelly: ``None`` (the paper's neuron) subtracts V_th after a spike; a
    number sets the potential to it (hard reset, ``v[t] = v_reset`` where ``s[t] = 1``, NIR's LIF)
    and the potential leaks towards it, ``h[t] = v[t-1] - (v[t-1] - v_reset) / tau + I[t]``. The
    trace rules read the potential as stored, either way."""

    def __init__(
        self,
        tau: float = 2.0,
        v_threshold: float = 1.0,
        surrogate_alpha: float = 4.0,
        detach_reset: bool = False,
        backend: str = backends.DEFAULT,
        v_reset: float | None = None,
    ):
        if v_reset is not None and not isinstance(v_reset, int | float):
            raise ValueError(
                f"LIF v_reset must be null (subtract the threshold after a spike, the paper's "
                f"neuron) or a number (reset to it), got {v_reset!r} (model.neuron.v_reset)"
            )
        backends.check(backend)
        super().__init__(
            tau=float(tau),
            decay_input=False,
            v_threshold=float(v_threshold),
            v_reset=None if v_reset is None else float(v_reset),  # None: subtract V_th
            surrogate_function=surrogate.Sigmoid(alpha=float(surrogate_alpha)),
            detach_reset=detach_reset,
            step_mode="s",
        )
        self.backend = backend  # bso.backend: release | fast | fused
        self.detach_state = False
        self.trace_rule: str | None = None
        self.register_memory("trace", None)
        self.register_memory("trace_potential", None)  # p[t-1] of the released NDOT rule

    @property
    def decay(self) -> float:
        """lambda = 1 - 1/tau."""
        return 1.0 - 1.0 / self.tau

    def single_step_functional_forward(self, inputs, states, **kwargs):
        spike, v, trace, p = backends.neuron_step(self)(self, inputs[0], *states)
        return (spike,), (v, trace, p)  # states: v_prev = u[t-1] - V_th s[t-1], trace, p[t-1]

    def release_online_step(self, x, v_prev, trace, p_prev):
        """(s[t], v[t], a_hat[t], p[t]) by :meth:`release_step` (backend "release")."""
        return self.eager_step(self.release_step, x, v_prev, trace, p_prev)

    def spikingjelly_online_step(self, x, v_prev, trace, p_prev):
        """(s[t], v[t], a_hat[t], p[t]) by :meth:`spikingjelly_step` (backend "fast")."""
        return self.eager_step(self.spikingjelly_step, x, v_prev, trace, p_prev)

    def eager_step(self, step, x, v_prev, trace, p_prev):
        """``step(x, v[t-1]) -> (s[t], v[t])`` with the state detached for online training and
        the trace kept while autograd is on."""
        if self.detach_state:
            v_prev = v_prev.detach()
        spike, v = step(x, v_prev)
        if self.trace_rule is not None and torch.is_grad_enabled():
            trace, p_prev = self.presynaptic_trace(spike, trace, v, v_prev, p_prev)
        return spike, v, trace, p_prev

    def spikingjelly_step(self, x: torch.Tensor, v_prev: torch.Tensor):
        """One LIF step by spikingjelly (its CUDA / Triton kernels, its CPU composite)."""
        return sj_functional.lif_step(
            x,
            v_prev,
            self.tau,
            self.decay_input,
            self.v_threshold,
            self.v_reset,
            self.surrogate_function,
            self.detach_reset,
        )

    def release_step(self, x: torch.Tensor, v_prev: torch.Tensor):
        """One LIF step (soft reset, undecayed input) as torch operations: the values of
        spikingjelly's step, and the surrogate backward of its sigmoid function, which rounds as the
        released code does (backend "release"). A neuron with a hard reset or a decayed input is
        not the release's neuron: it runs spikingjelly's step under every backend."""
        h = charge(x, v_prev, self.tau)
        spike = self.surrogate_function(h - self.v_threshold)
        reset = spike.detach() if self.detach_reset else spike
        return spike, h - times_threshold(reset, self.v_threshold)

    @torch.no_grad()
    def presynaptic_trace(self, spike, trace, v, v_prev, p_prev=None):
        """a_hat[t] = mu[t] * a_hat[t-1] + s[t] (paper Eq. 9); a_hat[1] = s[1].
        Returns the trace and, for the released NDOT rule, p[t] for the next step."""
        return trace_step(
            self.trace_rule,
            spike.detach(),
            trace,
            v.detach(),
            v_prev.detach(),
            p_prev,
            self.decay,
            self.v_threshold,
        )

    def extra_repr(self) -> str:
        return (
            super().extra_repr()
            + f", detach_state={self.detach_state}, trace={self.trace_rule}, backend={self.backend}"
        )


def charge(x: torch.Tensor, v_prev: torch.Tensor, tau: float) -> torch.Tensor:
    """h[t] = lambda * v[t-1] + I[t], rounded as spikingjelly computes it: v - (v - 0) / tau + x."""
    return v_prev - v_prev / tau + x


def times_threshold(x: torch.Tensor, v_threshold: float) -> torch.Tensor:
    """V_th * x; x itself for V_th = 1 (the same values, and gradients, without the pass)."""
    return x if v_threshold == 1.0 else x * v_threshold


def trace_step(rule, spike, trace, v, v_prev, p_prev, decay: float, v_threshold: float):
    """(a_hat[t], p[t]) of trace rule ``rule`` (see the module docstring) from this step's spikes
    ``s[t]`` and potential ``v[t]``, the previous trace and potential; p[t] is None but for "ndot".
    No autograd; the eager neuron and its compiled step (:mod:`bso.compiled`) both run this code."""
    if rule == "ndot":  # released code: p[t] = v[t] - V_th s[t]
        p = v - times_threshold(spike, v_threshold)
        if trace is None:
            return spike.clone(), p
        return bounded_ratio(p, p_prev, decay).mul_(trace).add_(spike), p  # mu * a_hat + s
    if trace is None:
        return spike.clone(), None
    if rule == "ottt":
        return decay * trace + spike, None
    return bounded_ratio(v, v_prev, decay).mul_(trace).add_(spike), None


def bounded_ratio(numerator, denominator, bound: float):
    """clamp(numerator / denominator, -bound, bound); bound where the ratio is not finite.
    (In place on the ratio: the values of the out-of-place ops, in fewer passes.)"""
    ratio = numerator / denominator
    ratio.masked_fill_(torch.isfinite(ratio).logical_not_(), bound)
    return ratio.clamp_(-bound, bound)


def configure_neurons(model: nn.Module, detach_state: bool, trace_rule: str | None) -> None:
    """Set how every LIF neuron of ``model`` treats time: detached state and which trace.

    Online training: ``detach_state=True, trace_rule="ndot"|"ottt"``.
    BPTT: ``detach_state=False, trace_rule=None``.
    """
    if trace_rule is not None and trace_rule not in TRACE_RULES:
        raise ValueError(f"unknown trace rule {trace_rule!r}; choose one of {TRACE_RULES}")
    neurons = [m for m in model.modules() if isinstance(m, LIFNode)]
    if not neurons:
        raise ValueError(f"{type(model).__name__} has no bso.neurons.LIFNode to configure")
    for neuron in neurons:
        neuron.detach_state = detach_state
        neuron.trace_rule = trace_rule


def reset_neurons(model: nn.Module) -> None:
    """Clear membrane potentials and traces before a new sample (spikingjelly's reset_net)."""
    sj_functional.reset_net(model)
