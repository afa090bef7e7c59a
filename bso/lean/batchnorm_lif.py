"""The lean mode's BatchNorm + LIF (+ average pool) step: the plain graph's values and gradients,
bit for bit, with less saved for backward.

In a plain conv block (:class:`bso.models.parts.SpikingConvBlock`) autograd keeps, per neuron, the
BatchNorm input, the LIF's charge ``h`` and, before an average pool, the spikes (avg_pool2d's backward
takes its input, though it reads only the shape): up to three float32 tensors.
:func:`batchnorm_lif_step` keeps the BatchNorm input and the spikes as bits (:mod:`bso.bits`), and
rebuilds the charge in backward from the neuron's own state (see :class:`_BatchNormLIF`).
:mod:`bso.lean.blocks` puts it (and, optionally, the conv before it) into the blocks.
"""

from __future__ import annotations

import torch
from spikingjelly.activation_based import functional as sj_functional
from spikingjelly.activation_based import surrogate
from torch import nn
from torch.nn import functional as F

from bso import backend, compat
from bso.bits import pack_bits, unpack_bits
from bso.models.parts import as_pair
from bso.neurons import LIFNode, times_threshold


class _BatchNormLIF(torch.autograd.Function):
    """BatchNorm (training, this time step's batch statistics), one LIF step and, optionally, an
    average pool of the spikes, saving less.

    The plain graph keeps the BatchNorm input, the LIF's charge ``h`` and, before an average pool, the
    spikes as float32 (avg_pool2d's backward takes its input, though it reads only the shape): up to
    three float32 tensors per neuron. This keeps the BatchNorm input and the spikes as bits (1/32 of
    it), and rebuilds ``h = v[t] + V_th s[t]`` from the neuron's own state ``v[t] = h - V_th s[t]``
    (which the neuron holds until the next time step anyway): exact for V_th = 1 and |h| < 2^24.
    Backward runs the pool's own backward kernel on the spikes' shape alone, differentiates the LIF
    step at ``h`` as spikingjelly does (:func:`lif_input_gradient`) and re-runs the same BatchNorm
    (without touching the running statistics) to differentiate it: the gradients are those of the
    plain graph, bit for bit. Online training only: no gradient flows into v[t-1] (it is
    detached)."""

    @staticmethod
    def forward(ctx, z, weight, bias, bn, neuron, pool):
        out, spike_bits, ctx.fired = batchnorm_lif_forward(z, bn, neuron, pool)
        ctx.save_for_backward(z, weight, bias, spike_bits)
        ctx.bn, ctx.neuron, ctx.pool = bn, neuron, pool
        return out

    @staticmethod
    def backward(ctx, grad_out):
        z, weight, bias, spike_bits = ctx.saved_tensors
        grads = batchnorm_lif_backward(
            grad_out, z, weight, bias, spike_bits, ctx.bn, ctx.neuron, ctx.pool, ctx.fired
        )
        return (*grads, None, None, None)


def batchnorm_lif_forward(z, bn, neuron, pool):
    """The BatchNorm + LIF step's forward (no graph): ``pool(neuron(bn(z)))``, the spikes as bits, and what
    :func:`batchnorm_lif_backward` reads back besides them: v[t] (held by the neuron until the next
    time step; not a copy) and the spikes' shape and layout."""
    y, batch_stats = batchnorm_train_forward(z, bn)  # updates the running statistics
    with torch.enable_grad():  # the neuron computes its trace only when grad is enabled
        spike = neuron(y)  # y and v[t-1] need no grad: no graph is built
    del y
    fired = (neuron.v, spike.shape, memory_format_of(spike), batch_stats)
    return (spike if pool is None else pool(spike)), pack_bits(spike), fired


def batchnorm_train_forward(z: torch.Tensor, bn: nn.BatchNorm2d):
    """``bn(z)`` in training mode, as :class:`torch.nn.BatchNorm2d` runs it (the momentum, the
    batch counter and the running statistics alike; the kernel ``F.batch_norm`` picks on this
    device, found by :func:`bso.compat.batch_norm_kernels`), plus what its backward reads: the batch mean and
    inverse std (C values each), cuDNN's reserve space and which kernel ran. Backward then runs that
    kernel's own backward (:func:`batchnorm_lif_backward`) without recomputing the statistics.
    Where torch lacks those kernels by name (:func:`bso.compat.batch_norm_kernels`), ``F.batch_norm``
    runs, nothing is kept, and backward re-runs it (:func:`_batch_norm_rerun_backward`)."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:  # cumulative moving average
            factor = 1.0 / float(bn.num_batches_tracked)
    kernels = compat.batch_norm_kernels()
    if kernels is None:
        args = (bn.running_mean, bn.running_var, bn.weight, bn.bias, True, factor, bn.eps)
        return F.batch_norm(z, *args), None
    y, mean, invstd, reserve, impl = kernels[0](
        z,
        bn.weight,
        bn.bias,
        bn.running_mean,
        bn.running_var,
        True,
        factor,
        bn.eps,
        torch.backends.cudnn.enabled,
    )
    return y, (mean, invstd, reserve, impl)


def batchnorm_lif_backward(grad_out, z, weight, bias, spike_bits, bn, neuron, pool, fired):
    """dL/dz, dL/dgamma, dL/dbeta of :func:`batchnorm_lif_forward`, bit for bit the plain graph's."""
    v, shape, memory_format, batch_stats = fired
    grad_spike = grad_out
    if pool is not None:  # in the spikes' layout, as the plain kernel gives it (input's)
        grad_spike = _avg_pool2d_backward(grad_out, pool, shape)
        grad_spike = grad_spike.contiguous(memory_format=memory_format)
    # the spikes are handed over unnamed, so that the gradient frees them once read
    grad_h = backend.lean_input_gradient(neuron)(
        neuron,
        grad_spike,
        v,
        unpack_bits(spike_bits, shape, v.dtype).contiguous(memory_format=memory_format),
    )
    if batch_stats is None:  # no saved statistics (see batchnorm_train_forward)
        return _batch_norm_rerun_backward(grad_h, z, weight, bias, bn.eps)
    # the backward autograd runs for the forward's BatchNorm kernel, from its saved statistics
    mean, invstd, reserve, impl = batch_stats
    grads = compat.batch_norm_kernels()[1](
        impl,
        z,
        grad_h,
        weight,
        bn.running_mean,
        bn.running_var,
        mean,
        invstd,
        True,
        bn.eps,
        [True, weight is not None, bias is not None],
        reserve,
    )
    return tuple(g if g is not None and g.numel() else None for g in grads)


def _batch_norm_rerun_backward(grad_y, z, weight, bias, eps):
    """dL/dz, dL/dgamma, dL/dbeta of training-mode BatchNorm, by re-running it (without running
    statistics, so nothing is updated twice) and differentiating that: the same kernels as the
    plain graph's, so the same values."""
    with torch.enable_grad():
        inputs = [t.detach().requires_grad_() if t is not None else None for t in (z, weight, bias)]
        y = F.batch_norm(inputs[0], None, None, inputs[1], inputs[2], True, 0.0, eps)
        wanted = [t for t in inputs if t is not None]
        grads = iter(torch.autograd.grad(y, wanted, grad_y))
    return tuple(next(grads) if t is not None else None for t in inputs)


def lif_input_gradient(neuron: LIFNode, grad_spike, v: torch.Tensor, spike: torch.Tensor):
    """dL/dI[t] of one online LIF step from dL/ds[t] and the neuron's state after it, v[t] and
    s[t], exactly as the neuron's backend differentiates its step (online: no gradient reaches
    v[t-1] or leaves v[t]); the implementation is :func:`bso.backend.lean_input_gradient`'s."""
    return backend.lean_input_gradient(neuron)(neuron, grad_spike, v, spike)


def charge_of(neuron: LIFNode, v: torch.Tensor, spike: torch.Tensor) -> torch.Tensor:
    """h[t] = v[t] + V_th s[t], exactly (in the forward's layout); s * 1 = s for V_th = 1."""
    return v + times_threshold(spike, neuron.v_threshold)


def release_input_gradient(neuron: LIFNode, grad_spike, v, spike):
    """:func:`lif_input_gradient` of the release's step (:meth:`LIFNode.release_step`), which
    differentiates through its surrogate function alone: that function is differentiated at
    ``h - V_th``."""
    charge = charge_of(neuron, v, spike)
    del spike  # the caller hands it over: freed before the gradient is computed
    function = neuron.surrogate_function
    if isinstance(function, surrogate.Sigmoid) and function.spiking:
        # what autograd calls for this function's backward, without its forward (heaviside)
        grads = surrogate.sigmoid_backward(grad_spike, charge - neuron.v_threshold, function.alpha)
        return grads[0]
    with torch.enable_grad():
        x = (charge - neuron.v_threshold).detach().requires_grad_()
        (grad_h,) = torch.autograd.grad(function(x), x, grad_spike)
    return grad_h


def spikingjelly_input_gradient(neuron: LIFNode, grad_spike, v, spike):
    """:func:`lif_input_gradient` of spikingjelly's step (backend "fast").

    On the CPU, spikingjelly runs the LIF step as a composite of torch ops whose input gradient is
    its surrogate's alone, ``dL/ds * sg(h - V_th)``: computed here by its own function, without
    re-running the step. Elsewhere (its CUDA kernels), or for a surrogate or dtype that the CPU
    shortcut does not cover, the step is re-run on ``h`` (with v = 0, so its charge is ``h``
    exactly) and differentiated through spikingjelly."""
    charge = charge_of(neuron, v, spike)
    del spike  # the caller hands it over: freed before the gradient is computed
    cpu_float = charge.device.type == "cpu" and charge.dtype == grad_spike.dtype == torch.float32
    found = compat.spikingjelly_cpu_surrogate() if cpu_float else None
    spec = found[1](neuron.surrogate_function) if found else None
    if spec is not None:
        surrogate_id, alpha = spec
        grad_spike = grad_spike.contiguous()  # as the composite's select/stack backward hands it on
        return grad_spike * found[0](charge - neuron.v_threshold, alpha, surrogate_id)
    with torch.enable_grad():
        h = charge.detach().requires_grad_()
        s, _ = sj_functional.lif_step(
            h,
            torch.zeros_like(h),
            neuron.tau,
            neuron.decay_input,
            neuron.v_threshold,
            neuron.v_reset,
            neuron.surrogate_function,
            neuron.detach_reset,
        )
        (grad_h,) = torch.autograd.grad(s, h, grad_spike)
    return grad_h


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """channels_last for an NHWC 4-D tensor, else contiguous_format."""
    nhwc = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if nhwc else torch.contiguous_format


def _avg_pool2d_backward(grad: torch.Tensor, pool: nn.AvgPool2d, shape) -> torch.Tensor:
    """avg_pool2d's own backward kernel (the plain graph's, so the same bits), given only the input's
    shape: it reads no input value, so a zero-stride stand-in replaces the saved spikes. The kernel
    is :func:`bso.backend.pool_input_gradient`'s (compiled for the fused backend's pools, as their
    autograd backward is)."""
    stride = pool.stride if pool.stride is not None else pool.kernel_size
    args = (
        grad,
        grad.new_zeros(()).expand(shape),
        as_pair(pool.kernel_size),
        as_pair(stride),
        as_pair(pool.padding),
        pool.ceil_mode,
        pool.count_include_pad,
        pool.divisor_override,
    )
    return backend.pool_input_gradient(pool)(*args)


def batchnorm_lif_step(
    z: torch.Tensor, bn: nn.BatchNorm2d, neuron: LIFNode, pool: nn.Module | None = None
) -> torch.Tensor:
    """``pool(neuron(bn(z)))`` with less saved for backward (see :class:`_BatchNormLIF`); the lean
    mode's BatchNorm + LIF (+ the block's pool) for online training. An average pool runs inside the
    step; any other pool (max pooling keeps its indices) runs after it."""
    if not (torch.is_grad_enabled() and bn.training):  # backward re-runs training-mode BatchNorm
        spike = neuron(bn(z))
        return spike if pool is None else pool(spike)
    inner, after = split_pool(pool)
    out = _BatchNormLIF.apply(z, bn.weight, bn.bias, bn, neuron, inner)
    return out if after is None else after(out)


def split_pool(pool: nn.Module | None) -> tuple[nn.Module | None, nn.Module | None]:
    """(the pool the BatchNorm + LIF step runs inside itself, the pool to run after it), None for
    none: an average pool runs inside, any other pool (max pooling keeps its indices) runs after."""
    if pool is None or isinstance(pool, nn.Identity):
        return None, None
    if isinstance(pool, nn.AvgPool2d):
        return pool, None
    return None, pool


def can_fuse_batchnorm_lif(bn: nn.Module, neuron: nn.Module) -> bool:
    """Where :func:`batchnorm_lif_step` is exact: a BatchNorm2d with batch statistics in training,
    and an online LIF with V_th = 1, soft reset, undecayed input and a detached state."""
    return (
        isinstance(bn, nn.BatchNorm2d)
        and bn.track_running_stats
        and isinstance(neuron, LIFNode)
        and neuron.v_threshold == 1.0
        and backend.is_release_neuron(neuron)  # soft reset, undecayed input
        and neuron.detach_state
    )
