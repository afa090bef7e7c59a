"""Building blocks shared by the spiking models: how a model's options turn into layers."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.grad import conv2d_input, conv2d_weight

from bso.layers import (
    SynapticConv2d,
    SynapticLinear,
    binarize_,
    pack_bits,
    unpack_bits,
    unpack_signs_on_device,
    update_in_backward,
)
from bso.models.agmm import AGMMGate
from bso.neurons import (
    LIFNode,
    batchnorm_lif_backward,
    batchnorm_lif_forward,
    batchnorm_lif_step,
    memory_format_of,
    split_pool,
)

NORMS = ("bn", "none")
INITS = ("release", "pytorch")


@dataclass
class ModelOptions:
    """The options every model takes (see configs/model/*.yaml)."""

    name: str | None = None  # the config's name (vgg11, vgg_tiny, ...), for logs and reports
    weights: str = "binary"  # binary | latent | full, for the binary-able convs
    init: str = "release"  # release: the released code's initialisation | pytorch: PyTorch's defaults
    neuron: dict = field(default_factory=dict)  # LIFNode kwargs
    norm: str = "bn"  # bn: BatchNorm after each conv | none (with weight standardisation)
    weight_standardization: bool = False
    agmm: bool = False
    agmm_num_steps: int = 1
    agmm_statistic: str = "spatial_mean"
    agmm_learnable_alpha: bool = True

    def __post_init__(self):
        if self.norm not in NORMS:
            raise ValueError(f"unknown model.norm={self.norm!r}; choose one of {NORMS}")
        if self.init not in INITS:
            raise ValueError(f"unknown model.init={self.init!r}; choose one of {INITS}")
        self.neuron = dict(self.neuron or {})

    def lif(self) -> LIFNode:
        return LIFNode(**self.neuron)

    def conv(self, cin, cout, kernel, stride=1, binary=True, bias=False) -> SynapticConv2d:
        """A conv with the model's weight mode (``binary=True``) or full precision."""
        return SynapticConv2d(
            cin,
            cout,
            kernel,
            stride=stride,
            padding=kernel // 2,
            bias=bias and not binary,
            weights=self.weights if binary else "full",
            weight_standardization=self.weight_standardization,
        )

    def norm_layer(self, channels: int) -> nn.Module:
        return nn.BatchNorm2d(channels) if self.norm == "bn" else nn.Identity()

    def gate(self, binary: bool = True) -> nn.Module:
        """AGMM's gate after a binary conv + BN when ``agmm`` is on; identity otherwise."""
        if self.agmm and binary:
            return AGMMGate(self.agmm_num_steps, self.agmm_statistic, self.agmm_learnable_alpha)
        return nn.Identity()


@torch.no_grad()
def initialize(model: nn.Module, options: ModelOptions) -> nn.Module:
    """``init="release"``, the released code's initialisation (spec section 3): every conv Kaiming
    normal (fan_out, relu) with zero bias, binary ones then turned into their signs (+-1 from the
    start, unlike the release, whose first forward pass still sees the real values); the linear layer
    N(0, 0.01) with zero bias; BatchNorm weight 1, bias 0. ``init="pytorch"`` keeps PyTorch's
    defaults (binary convs: sign of a Kaiming-normal draw)."""
    if options.init == "pytorch":
        return model
    for module in model.modules():
        if isinstance(module, SynapticConv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
            if module.is_binary:
                binarize_(module.weight)
        elif isinstance(module, SynapticLinear):
            nn.init.normal_(module.weight, 0.0, 0.01)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    return model


def trace_of(neuron: LIFNode) -> torch.Tensor | None:
    """The neuron's presynaptic trace while training online; None otherwise."""
    return neuron.trace if torch.is_grad_enabled() else None


class SpikingConvBlock(nn.Module):
    """conv -> norm [-> AGMM gate] -> LIF [-> pool]; passes the spikes and their trace on."""

    def __init__(self, conv: SynapticConv2d, options: ModelOptions, binary: bool):
        super().__init__()
        self.conv = conv
        self.bn = options.norm_layer(conv.out_channels)
        self.gate = options.gate(binary)
        self.neuron = options.lif()
        self.pool = nn.Identity()
        # what this block's input is, set by the model that chains the blocks (spike_levels): 1 for
        # 0/1 spikes, n for averages of n spikes, None for real values (the image)
        self.input_levels: int | None = None
        # lean mode (bso.lean): BN + LIF + pool in one step that saves less; with recompute_conv the
        # conv joins it and its output is recomputed in backward from the saved input
        self.fuse_batchnorm_lif = False
        self.recompute_conv = False

    def forward(self, x, trace=None):
        if self.fuse_batchnorm_lif and self.recompute_conv:
            spikes = conv_batchnorm_lif_step(self, x, trace)
        elif self.fuse_batchnorm_lif:
            spikes = batchnorm_lif_step(self.conv(x, trace), self.bn, self.neuron, self.pool)
        else:
            spikes = self.pool(self.neuron(self.gate(self.bn(self.conv(x, trace)))))
        trace = trace_of(self.neuron)
        return spikes, (self.pool(trace) if trace is not None else None)


def spike_levels(pool: nn.Module) -> int | None:
    """What ``pool(spikes)`` holds, exactly and compactly: 1 for 0/1 values (no pool, a max pool);
    n for multiples of 1/n (an average pool over n spikes, n a power of 2 below 256, so that k / n is
    exact in floating point and k fits a byte); None when neither holds."""
    if isinstance(pool, (nn.Identity, nn.MaxPool2d)):
        return 1
    if isinstance(pool, nn.AvgPool2d):
        kernel = nn.modules.utils._pair(pool.kernel_size)
        stride = nn.modules.utils._pair(pool.stride or pool.kernel_size)
        n = kernel[0] * kernel[1]
        plain = stride == kernel and pool.padding in (0, (0, 0)) and pool.divisor_override is None
        if plain and not pool.ceil_mode and n < 256 and n & (n - 1) == 0:
            return n
    return None


def can_recompute_conv(block: SpikingConvBlock, binary_convs: bool) -> bool:
    """Whether the lean mode saves ``block``'s conv input instead of its output and recomputes the
    output in backward: a full-precision conv on real input with fewer input than output channels
    (the first conv: the image, which its weight gradient keeps anyway), and, with ``binary_convs``,
    a packed binary conv whose input is spikes (``input_levels``: saved as bits or bytes)."""
    conv = block.conv
    if conv.padding_mode != "zeros" or not block.fuse_batchnorm_lif:
        return False
    if conv.is_packed:
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
    :func:`bso.neurons.batchnorm_lif_step` does, then the conv as the plain layer does: a packed
    layer computes its input gradient, then G[t] from the trace, and hands G[t] to BSO/T-BSO; a
    full-precision layer's gradients come from autograd on the recomputed conv. Bit for bit the
    plain graph's gradients on deterministic kernels (the CPU; cuDNN with deterministic algorithms)."""

    @staticmethod
    def forward(ctx, x, trace, weight, bias, bn_weight, bn_bias, block, pool):
        conv = block.conv
        w = unpack_signs_on_device(weight, conv.binary_shape, x.dtype) if conv.is_packed else weight
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
        if conv.is_packed:  # the layer's flip comes last: these are the forward's weights
            w = unpack_signs_on_device(weight, conv.binary_shape, x.dtype)
            z = F.conv2d(x, w, None, *args)
        else:  # full precision: autograd on the recomputed conv gives the plain layer's gradients
            with torch.enable_grad():
                x = x.detach().requires_grad_(needs_grad_x)
                leaves = [p.detach().requires_grad_() for p in (weight, bias) if p is not None]
                z = F.conv2d(x, leaves[0], leaves[1] if bias is not None else None, *args)
        bn_args = (bn_weight, bn_bias, spike_bits, block.bn, block.neuron, ctx.pool, ctx.fired)
        grad_z, grad_bn_weight, grad_bn_bias = batchnorm_lif_backward(grad_out, z.detach(), *bn_args)
        grad_x = grad_w = grad_b = None
        if conv.is_packed:
            if needs_grad_x:
                grad_x = conv2d_input(x.shape, w, grad_z, *args)
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
    conv output is saved as by :func:`bso.neurons.batchnorm_lif_step`."""
    conv, bn = block.conv, block.bn
    applies = (
        torch.is_grad_enabled()
        and bn.training
        and not torch.is_autocast_enabled(x.device.type)
        and (trace is not None) == conv.is_packed
    )
    if not applies:
        return batchnorm_lif_step(conv(x, trace), bn, block.neuron, block.pool)
    fused_pool, after = split_pool(block.pool)
    out = _ConvBatchNormLIF.apply(
        x, trace, conv.weight, conv.bias, bn.weight, bn.bias, block, fused_pool
    )
    return out if after is None else after(out)
