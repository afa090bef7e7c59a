"""The ``fused`` backend (:mod:`bso.backend`): element-wise chains as one compiled loop each.

Per neuron and time step, online training runs a chain of element-wise operations: the LIF step
(charge, spike, soft reset), the presynaptic trace (paper Eq. 9; the released NDOT ratio alone is
six operations) and, in backward, the surrogate gradient. Run one torch operation at a time, each is
a pass over memory; here the same Python code (:func:`bso.neurons.charge`,
:func:`bso.neurons.trace_step`, the sigmoid surrogate's backward) is compiled by ``torch.compile``
(Inductor: C++ loops on the CPU, Triton on CUDA), so a step reads and writes each neuron once.

The compiled loops hold only +, -, *, / and comparisons, which Inductor fuses without reordering:
the values are the eager operations' bit for bit (tests/test_compiled.py on hand-built tensors; the
golden tests replay the released code's full-width VGG-11 run under this backend). The sigmoid
stays torch's kernel: an exponential computed in a vectorised loop body and in its scalar tail can
differ in the last bit, and which elements fall in a tail differs between the two. What is compiled:

* the online step of the release's neuron -- charge, spike, reset, trace -- in one loop; saved for
  backward, as by the eager graph, one float per neuron (here the sigmoid's scaled input
  ``alpha (h - V_th)``); backward: torch's sigmoid, then the products
  ``((dL/ds * (1 - sg)) * sg) * alpha`` in one loop;
* the lean mode (:mod:`bso.lean.batchnorm_lif`): the same forward loop (nothing saved), and in backward the
  charge ``h = v + V_th s`` rebuilt and scaled in one loop;
* the blocks' 2-D average pools of the spikes and the trace (:class:`FusedAvgPool2d`).

The backend is for online training (BPTT neurons have no trace and a graph through time:
:func:`bso.backend.check` refuses it). Compiling costs seconds on the first batches (cached on disk
by Inductor); on the CPU it needs a C++ compiler. Under ``fast.autocast`` the compiled loops
compute bf16 inputs in float32 and round once, so they do not match the eager bf16 operations bit
for bit.
"""

from __future__ import annotations

import os
import shutil
import sys
from functools import partial

import torch
import torch.nn.functional as F
from spikingjelly.activation_based import surrogate
from torch import nn

from bso.compat import raise_recompile_limit
from bso.neurons import LIFNode, charge, times_threshold, trace_step
from bso.replace import replace_module, take_over


def release_online_values(x, v_prev, trace, p_prev, tau, v_threshold, decay, rule):
    """The online LIF step of :meth:`bso.neurons.LIFNode.release_step` and its trace, as values:
    (the surrogate's input h - V_th, s[t], v[t], a_hat[t], p[t])."""
    h = charge(x, v_prev, tau)
    surrogate_input = h - v_threshold
    spike = surrogate.heaviside(surrogate_input)
    v = h - times_threshold(spike, v_threshold)
    trace, p = trace_step(rule, spike, trace, v, v_prev, p_prev, decay, v_threshold)
    return surrogate_input, spike, v, trace, p


def release_online_step(x, v_prev, trace, p_prev, tau, v_threshold, decay, rule, alpha):
    """:func:`release_online_values` with the sigmoid surrogate's scaled input alpha (h - V_th),
    which its backward reads, first."""
    surrogate_input, *values = release_online_values(
        x, v_prev, trace, p_prev, tau, v_threshold, decay, rule
    )
    return surrogate_input * alpha, *values


def release_online_forward(x, v_prev, trace, p_prev, tau, v_threshold, decay, rule):
    """:func:`release_online_values` without a graph: (s[t], v[t], a_hat[t], p[t]), nothing kept
    for backward (the lean mode rebuilds it from the state)."""
    return release_online_values(x, v_prev, trace, p_prev, tau, v_threshold, decay, rule)[1:]


def scaled_surrogate_input(v, spike, v_threshold, alpha):
    """alpha (h - V_th) at the charge rebuilt from the state, h = v + V_th s (the lean mode)."""
    return (v + times_threshold(spike, v_threshold) - v_threshold) * alpha


def sigmoid_surrogate_product(grad_spike, sg, alpha):
    """dL/dh = ((dL/ds * (1 - sg)) * sg) * alpha, as spikingjelly's ``sigmoid_backward`` rounds it."""
    return grad_spike * (1.0 - sg) * sg * alpha


def sigmoid_surrogate_backward(grad_spike, scaled_input, alpha):
    """spikingjelly's ``sigmoid_backward`` at ``scaled_input = alpha x``, its products fused. The
    sigmoid itself stays torch's kernel: Inductor's loops hold only +, -, *, / and comparisons,
    which round alike in any vector width, while an exponential in a vectorised loop body and in
    its scalar tail can differ in the last bit."""
    return compiled(sigmoid_surrogate_product)(grad_spike, torch.sigmoid(scaled_input), alpha)


_COMPILED: dict = {}
# compiled variants per function: its constants (tau, alpha, trace rule ...) and whether a trace
# exists yet; shapes do not count (the tensors are flattened, sizes are dynamic). Past this many,
# torch.compile runs the function as it is (the same values, unfused) instead of compiling it again.
RECOMPILE_LIMIT = 64


def compiled(function, flatten: bool = True):
    """``function`` compiled by ``torch.compile`` (made once per function), called through
    :func:`_flat_call` when ``flatten`` (element-wise code). Raises torch's recompile limit
    (default 8) to :data:`RECOMPILE_LIMIT` for the process (:func:`bso.compat.raise_recompile_limit`):
    a sweep over thresholds or time constants in one process compiles a variant per value."""
    if function not in _COMPILED:
        raise_recompile_limit(RECOMPILE_LIMIT)
        run = torch.compile(function, dynamic=True)
        _COMPILED[function] = partial(_flat_call, run) if flatten else run
    return _COMPILED[function]


def _flat_call(run, *args):
    """``run(*args)`` on 1-D views when the tensors (0-d ones aside) share one contiguous shape --
    element-wise code does not care, and every layer and batch size then runs the same compiled
    loop --, its 1-D outputs viewed back in that shape."""
    tensors = [a for a in args if isinstance(a, torch.Tensor) and a.dim() > 0]
    shapes = {a.shape for a in tensors}
    if len(shapes) != 1 or not all(a.is_contiguous() for a in tensors):
        return run(*args)
    (shape,) = shapes
    out = run(*(a.view(-1) if isinstance(a, torch.Tensor) and a.dim() > 0 else a for a in args))
    if isinstance(out, tuple):
        return tuple(
            o.view(shape) if isinstance(o, torch.Tensor) and o.dim() == 1 else o for o in out
        )
    return out.view(shape)


class _ReleaseOnlineStep(torch.autograd.Function):
    """The fused online step; backward is the sigmoid surrogate's on its saved (scaled) input."""

    @staticmethod
    def forward(ctx, x, v_prev, trace, p_prev, neuron):
        scaled, spike, v, trace, p = compiled(release_online_step)(
            x, v_prev, trace, p_prev, *step_constants(neuron)
        )
        ctx.save_for_backward(scaled)
        ctx.alpha = neuron.surrogate_function.alpha
        ctx.mark_non_differentiable(v, trace, *([p] if p is not None else []))
        ctx.set_materialize_grads(False)  # no zero-filled gradients for v, trace and p
        return spike, v, trace, p

    @staticmethod
    def backward(ctx, grad_spike, *unused):
        (scaled,) = ctx.saved_tensors
        if grad_spike is None:  # the spikes reached no loss
            return None, None, None, None, None
        return sigmoid_surrogate_backward(grad_spike, scaled, ctx.alpha), None, None, None, None


def step_constants(neuron: LIFNode) -> tuple:
    alpha = neuron.surrogate_function.alpha
    return neuron.tau, neuron.v_threshold, neuron.decay, neuron.trace_rule, alpha


def fused_step(neuron: LIFNode, x, v_prev, trace, p_prev):
    """(s[t], v[t], a_hat[t], p[t]) of an online neuron (:func:`bso.backend.why_not_fused` is
    None), fused. Only s[t] carries a gradient (to x); v[t] is detached, as the next step detaches
    it anyway."""
    v_prev = v_prev.detach()
    if not (torch.is_grad_enabled() and x.requires_grad):  # no graph (the lean mode's forward)
        constants = step_constants(neuron)[:-1]  # no surrogate: nothing is differentiated
        return compiled(release_online_forward)(x, v_prev, trace, p_prev, *constants)
    return _ReleaseOnlineStep.apply(x, v_prev, trace, p_prev, neuron)


def lif_input_gradient_from_state(neuron: LIFNode, grad_spike, v, spike):
    """The lean mode's dL/dI[t] (:func:`bso.lean.batchnorm_lif.lif_input_gradient`) at the charge
    h = v + V_th s, as one compiled loop."""
    alpha = neuron.surrogate_function.alpha
    scaled = compiled(scaled_surrogate_input)(v, spike, neuron.v_threshold, alpha)
    return sigmoid_surrogate_backward(grad_spike, scaled, alpha)


def average_pool(x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
    return F.avg_pool2d(
        x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override
    )


def average_pool_backward(
    grad, like, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor
):
    """avg_pool2d's input gradient; ``like`` stands in for the input (only its shape is read)."""
    return torch.ops.aten.avg_pool2d_backward(
        grad, like, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor
    )


def average_pool_input_gradient(*args):
    """:func:`average_pool_backward`, compiled (the lean mode's pools under the fused backend)."""
    return compiled(average_pool_backward, flatten=False)(*args)


class FusedAvgPool2d(nn.AvgPool2d):
    """:class:`torch.nn.AvgPool2d` run by ``torch.compile`` (forward and, under autograd, backward):
    Inductor's loop sums each window in the order torch's kernel does and divides the same way, so the
    values are torch's bit for bit (tests/test_compiled.py), faster on the CPU, whose kernel does not
    vectorise. The blocks pool the spikes and the trace with it at every step. :func:`fuse_pools` puts it
    in place of plain ``nn.AvgPool2d`` modules without ``ceil_mode``, whose edge windows' gradients
    round differently."""

    backend = "fused"  # bso.backend.pool_input_gradient: the lean mode's backward compiled too

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return compiled(average_pool, flatten=False)(
            x,
            self.kernel_size,
            self.stride,
            self.padding,
            self.ceil_mode,
            self.count_include_pad,
            self.divisor_override,
        )


def fuse_pools(model: nn.Module) -> None:
    """Put a :class:`FusedAvgPool2d` with its arguments in place of each plain ``nn.AvgPool2d``
    of ``model`` without ``ceil_mode`` (the parent's attribute set to the new module; a pool used
    in several places stays one module). :func:`bso.backend.apply` calls it for backend fused."""
    pools = {id(m): m for m in model.modules() if type(m) is nn.AvgPool2d and not m.ceil_mode}
    for pool in pools.values():  # see FusedAvgPool2d for ceil_mode
        replace_module(model, pool, take_over(FusedAvgPool2d, pool, "backend=fused"))


def cpp_compiler(cxx: str | None = None) -> str:
    """The C++ compiler torch.compile builds CPU code with: ``cxx``, else the ``CXX`` environment
    variable (which Inductor reads too), else Inductor's default (``g++``; ``clang++`` on macOS)."""
    return cxx or os.environ.get("CXX") or ("clang++" if sys.platform == "darwin" else "g++")


def check_compiler(cxx: str | None = None) -> None:
    """torch.compile on the CPU builds C++: refuse early, in one line, where the compiler
    (:func:`cpp_compiler`) is not found."""
    name = cpp_compiler(cxx)
    if shutil.which(name) is None:
        raise RuntimeError(
            "backend=fused compiles the element-wise steps with torch.compile, which needs a C++ "
            f"compiler ({name}) on the CPU; none was found on PATH. Install one (e.g. apt install "
            "g++), name it in the CXX environment variable, or use backend=release"
        )
