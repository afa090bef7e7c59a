"""The lean mode's conv blocks: conv -> BatchNorm -> LIF (-> average pool) with less saved for
backward, the same values and gradients, bit for bit.

:meth:`LeanSpikingConvBlock.from_module` builds the lean block of a
:class:`bso.models.parts.SpikingConvBlock` (no AGMM gate; an online LIF with V_th = 1), a new module
holding the old one's conv, BatchNorm, neuron and pool: BatchNorm + LIF (+ the block's average pool)
run as one step (:func:`bso.lean.batchnorm_lif.batchnorm_lif_step`). With ``recompute_conv``
the conv joins that step and its output is recomputed in backward from its saved input
(:class:`_ConvBatchNormLIF`): the first conv (the image, which its weight gradient keeps anyway), and
with ``engine.recompute_binary_convs`` every packed binary conv whose input is known to be spikes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.grad import conv2d_input, conv2d_weight

from bso.bits import pack_bits, unpack_bits, unpack_signs
from bso.lean.batchnorm_lif import (
    batchnorm_lif_backward,
    batchnorm_lif_forward,
    batchnorm_lif_step,
    can_fuse_batchnorm_lif,
    memory_format_of,
    split_pool,
)
from bso.lean.layers import LEAN, PackedWeights, lean_class, update_in_backward
from bso.models.parts import SpikingConvBlock, trace_of
from bso.replace import take_over


class LeanSpikingConvBlock(SpikingConvBlock):
    """A :class:`bso.models.parts.SpikingConvBlock` whose BatchNorm + LIF (+ pool) run as one step
    that saves less for backward; with ``recompute_conv`` the conv joins it."""

    recompute_conv = False

    @classmethod
    def from_module(
        cls, block: SpikingConvBlock, recompute_binary_convs: bool = False
    ) -> LeanSpikingConvBlock:
        """The lean block of ``block`` (:func:`can_fuse`; its conv packed already where binary): a new
        module of the lean class that takes over its submodules, hooks and attributes; ``block`` is
        left empty (:func:`bso.replace.take_over`)."""
        if not can_fuse(block):
            raise ValueError(
                f"{type(block).__name__} has an AGMM gate or a LIF the fused step cannot take"
            )
        if isinstance(block, LeanSpikingConvBlock):
            raise ValueError(f"this {type(block).__name__} is a lean block already")
        lean = take_over(lean_class(type(block), LEAN_BLOCKS), block, LEAN)
        lean.recompute_conv = can_recompute_conv(lean, recompute_binary_convs)
        return lean

    def forward(self, x, trace=None):
        if self.recompute_conv:
            spikes = conv_batchnorm_lif_step(self, x, trace)
        else:
            spikes = batchnorm_lif_step(self.conv(x, trace), self.bn, self.neuron, self.pool)
        trace = trace_of(self.neuron)
        return spikes, (self.pool(trace) if trace is not None else None)


LEAN_BLOCKS = {SpikingConvBlock: LeanSpikingConvBlock}


def can_fuse(block: nn.Module) -> bool:
    """Where the fused step is exact: a conv block without AGMM gate whose BatchNorm and LIF
    :func:`bso.lean.batchnorm_lif.can_fuse_batchnorm_lif` accepts."""
    return (
        isinstance(block, SpikingConvBlock)
        and isinstance(block.gate, nn.Identity)
        and can_fuse_batchnorm_lif(block.bn, block.neuron)
    )


def can_recompute_conv(block: SpikingConvBlock, binary_convs: bool) -> bool:
    """Whether the lean mode saves ``block``'s conv input instead of its output and recomputes the
    output in backward: a full-precision conv on real input with fewer input than output channels
    (the first conv: the image, which its weight gradient keeps anyway), and, with ``binary_convs``,
    a packed binary conv whose input is spikes (``input_levels``: saved as bits or bytes)."""
    conv = block.conv
    if conv.padding_mode != "zeros":
        return False
    if isinstance(conv, PackedWeights):
        return binary_convs and block.input_levels is not None
    return (
        conv.weights == "full"
        and block.input_levels is None
        and conv.in_channels < conv.out_channels
    )


def _save_input(x: torch.Tensor, levels: int | None) -> torch.Tensor:
    if levels is None:
        return x
    if levels == 1:
        return pack_bits(x)
    return (x * levels).to(torch.uint8)  # k / levels -> k, exactly


def _load_input(saved: torch.Tensor, levels: int | None, like: tuple) -> torch.Tensor:
    """The exact input :func:`_save_input` saved, in its dtype and layout."""
    shape, dtype, memory_format = like
    if levels is None:
        return saved
    x = unpack_bits(saved, shape, dtype) if levels == 1 else saved.to(dtype) / levels
    return x.contiguous(memory_format=memory_format)


class _ConvBatchNormLIF(torch.autograd.Function):
    """A block's conv -> BatchNorm -> LIF (-> average pool) in one step that saves the conv's input
    instead of its output (the lean mode's ``recompute_conv``).

    Saved: the conv input -- as it is for real values (the image), as bits for 0/1 spikes, as bytes
    for averages of n spikes (``input_levels``) --, the trace, the weights (packed bits or the
    full-precision parameter, no copy), the BatchNorm parameters and the spikes as bits. Backward
    rebuilds the input exactly, recomputes the conv output with the same kernel (the layer's weights
    are still the old ones: its flip comes last), differentiates BatchNorm + LIF + pool as
    :func:`bso.lean.batchnorm_lif.batchnorm_lif_step` does, then the conv as the plain layer does: a packed
    layer computes its input gradient, then G[t] from the trace, and hands G[t] to BSO/T-BSO; a
    full-precision layer's gradients come from autograd on the recomputed conv. Bit for bit the
    plain graph's gradients on deterministic kernels (the CPU; cuDNN with deterministic algorithms)."""

    @staticmethod
    def forward(ctx, x, trace, weight, bias, bn_weight, bn_bias, block, pool):
        conv = block.conv
        packed = isinstance(conv, PackedWeights)
        w = unpack_signs(weight, conv.binary_shape, x.dtype) if packed else weight
        z = F.conv2d(x, w, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
        out, spike_bits, ctx.fired = batchnorm_lif_forward(z, block.bn, block.neuron, pool)
        saved_x = _save_input(x, block.input_levels)
        ctx.save_for_backward(saved_x, trace, weight, bias, bn_weight, bn_bias, spike_bits)
        ctx.block, ctx.pool = block, pool
        ctx.input_like = (x.shape, x.dtype, memory_format_of(x))
        return out

    @staticmethod
    def backward(ctx, grad_out):
        saved_x, trace, weight, bias, bn_weight, bn_bias, spike_bits = ctx.saved_tensors
        block, conv = ctx.block, ctx.block.conv
        x = _load_input(saved_x, block.input_levels, ctx.input_like)
        args = (conv.stride, conv.padding, conv.dilation, conv.groups)
        needs_grad_x = ctx.needs_input_grad[0]
        packed = isinstance(conv, PackedWeights)
        if packed:  # the layer's flip comes last: these are the forward's weights
            w = unpack_signs(weight, conv.binary_shape, x.dtype)
            z = F.conv2d(x, w, None, *args)
        else:  # full precision: autograd on the recomputed conv gives the plain layer's gradients
            with torch.enable_grad():
                x = x.detach().requires_grad_(needs_grad_x)
                leaves = [p.detach().requires_grad_() for p in (weight, bias) if p is not None]
                z = F.conv2d(x, leaves[0], leaves[1] if bias is not None else None, *args)
        bn_args = (bn_weight, bn_bias, spike_bits, block.bn, block.neuron, ctx.pool, ctx.fired)
        grad_z, grad_bn_weight, grad_bn_bias = batchnorm_lif_backward(
            grad_out, z.detach(), *bn_args
        )
        grad_x = grad_w = grad_b = None
        if packed:
            if needs_grad_x:
                grad_x = conv2d_input(x.shape, w, grad_z, *args)
            # BSO / T-BSO flips the bits here
            update_in_backward(conv, w, conv2d_weight(trace, w.shape, grad_z, *args))
        else:
            grads = list(torch.autograd.grad(z, ([x] if needs_grad_x else []) + leaves, grad_z))
            grad_x = grads.pop(0) if needs_grad_x else None
            grad_w, grad_b = (*grads, None)[:2]
        return grad_x, None, grad_w, grad_b, grad_bn_weight, grad_bn_bias, None, None


def conv_batchnorm_lif_step(block: SpikingConvBlock, x: torch.Tensor, trace) -> torch.Tensor:
    """``block``'s conv -> BatchNorm -> LIF -> pool, recomputing the conv output in backward
    (:class:`_ConvBatchNormLIF`); where that does not apply -- evaluation, bf16 autocast (the
    recompute would need the autocast state replayed), a full-precision conv given a trace -- the
    conv output is saved as by :func:`bso.lean.batchnorm_lif.batchnorm_lif_step`."""
    conv, bn = block.conv, block.bn
    applies = (
        torch.is_grad_enabled()
        and bn.training
        and not torch.is_autocast_enabled(x.device.type)
        and (trace is not None) == isinstance(conv, PackedWeights)
    )
    if not applies:
        return batchnorm_lif_step(conv(x, trace), bn, block.neuron, block.pool)
    fused_pool, after = split_pool(block.pool)
    out = _ConvBatchNormLIF.apply(
        x, trace, conv.weight, conv.bias, bn.weight, bn.bias, block, fused_pool
    )
    return out if after is None else after(out)
