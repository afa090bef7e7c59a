"""Synaptic layers: convolution and linear layers whose weights are binary or full precision, and
whose weight gradient can come from the presynaptic trace instead of the spikes.

Weight modes:

* ``binary``: stored as exactly -1/+1 in the parameter itself and used as stored: no sign() in the
  forward pass, no scaling factor, no latent copy. Only a binary optimizer (:class:`bso.optim.BSO`,
  :class:`bso.optim.TBSO`) may change them, by flipping signs.
* ``latent``: the BPTT binary-SNN baseline. A real-valued latent weight ``w``; the forward pass uses
  ``sign(w)`` (sign(0) = +1) and the backward pass the straight-through estimator
  ``dL/dw = dL/dsign(w) * 1[|w| <= 1]`` (paper Eq. 4). Binary at inference (1 bit).
* ``full``: a full-precision weight.

Online training (paper Eq. 9): the forward value uses the spikes ``s[t]``, the weight gradient uses
the presynaptic trace ``a_hat[t]``:  ``G[t] = delta[t] * a_hat[t]^T``. The input gradient is the
usual one (``W^T delta``), so errors still reach the neurons below.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.grad import conv2d_input, conv2d_weight

from bso.bits import PackedSigns

WEIGHT_MODES = ("binary", "latent", "full")


class _TracedConv2d(torch.autograd.Function):
    """y = conv2d(spikes, W); dL/dW = conv2d_weight(trace, dL/dy); dL/dspikes = conv2d_input(W, dL/dy)."""

    @staticmethod
    def forward(ctx, spikes, trace, weight, stride, padding, dilation, groups):
        ctx.save_for_backward(trace, weight)
        ctx.conv = (spikes.shape, stride, padding, dilation, groups)
        return F.conv2d(spikes, weight, None, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad_out):
        trace, weight = ctx.saved_tensors
        shape, stride, padding, dilation, groups = ctx.conv
        # under bf16 autocast (fast.autocast) the forward ran in bf16: G[t] and the input gradient are
        # computed in the weight's float32 (a no-op without autocast)
        grad_out, trace = grad_out.to(weight.dtype), trace.to(weight.dtype)
        grad_spikes = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_spikes = conv2d_input(shape, weight, grad_out, stride, padding, dilation, groups)
        if ctx.needs_input_grad[2]:
            grad_weight = conv2d_weight(
                trace, weight.shape, grad_out, stride, padding, dilation, groups
            )
        return grad_spikes, None, grad_weight, None, None, None, None


class _TracedLinear(torch.autograd.Function):
    """y = spikes W^T; dL/dW = dL/dy^T trace; dL/dspikes = dL/dy W (2-D inputs)."""

    @staticmethod
    def forward(ctx, spikes, trace, weight):
        ctx.save_for_backward(trace, weight)
        return spikes @ weight.t()

    @staticmethod
    def backward(ctx, grad_out):
        trace, weight = ctx.saved_tensors
        grad_out, trace = grad_out.to(weight.dtype), trace.to(weight.dtype)  # float32 (autocast)
        grad_spikes = grad_out @ weight if ctx.needs_input_grad[0] else None
        grad_weight = grad_out.t() @ trace if ctx.needs_input_grad[2] else None
        return grad_spikes, None, grad_weight


class _SignSTE(torch.autograd.Function):
    """sign(w) forward (sign(0) = +1); straight-through gradient where |w| <= 1 (Eq. 4)."""

    @staticmethod
    def forward(ctx, latent):
        ctx.save_for_backward(latent)
        return torch.where(latent >= 0, 1.0, -1.0).to(latent.dtype)

    @staticmethod
    def backward(ctx, grad):
        (latent,) = ctx.saved_tensors
        return grad * (latent.abs() <= 1).to(grad.dtype)


def sign_ste(latent: torch.Tensor) -> torch.Tensor:
    return _SignSTE.apply(latent)


def _check_mode(weights: str) -> str:
    if weights not in WEIGHT_MODES:
        raise ValueError(f"unknown weight mode {weights!r}; choose one of {WEIGHT_MODES}")
    return weights


@torch.no_grad()
def binarize_(weight: torch.Tensor) -> torch.Tensor:
    """In place: w <- sign(w) with sign(0) = +1, so every entry is exactly -1 or +1."""
    return weight.copy_(torch.where(weight >= 0, 1.0, -1.0))


class _WeightMode:
    """What the two synaptic layers share: the weight mode, its init and the forward weight."""

    weights: str
    weight: nn.Parameter
    weight_standardization: bool = False

    @property
    def is_binary(self) -> bool:
        """Stored +-1 weights, for BSO / T-BSO."""
        return self.weights == "binary"

    def sign_values(self) -> torch.Tensor:
        """The stored +-1 weights as a float tensor (no gradient)."""
        return self.weight.detach()

    def effective_weight(self) -> torch.Tensor:
        """The weight the forward pass uses: sign(latent) with STE in latent mode, then (optionally)
        OTTT's scaled weight standardisation ``gain * (w - mean) / sqrt(var * fan_in + eps)`` per
        output channel."""
        w = sign_ste(self.weight) if self.weights == "latent" else self.weight
        if self.weight_standardization:
            fan_in = w[0].numel()
            mean = w.mean(dim=tuple(range(1, w.dim())), keepdim=True)
            var = w.var(dim=tuple(range(1, w.dim())), keepdim=True, unbiased=False)
            w = self.gain * (w - mean) / torch.sqrt(var * fan_in + 1e-4)
        return w

    def _init_weight_mode(self) -> None:
        if self.is_binary:  # sign of a Kaiming-normal init
            nn.init.kaiming_normal_(self.weight, nonlinearity="relu")
            binarize_(self.weight)

    def extra_repr(self) -> str:
        ws = ", weight_standardization=True" if self.weight_standardization else ""
        return super().extra_repr() + f", weights={self.weights}{ws}"


class SynapticConv2d(_WeightMode, nn.Conv2d):
    """Conv2d with a weight mode and an optional trace input for the weight gradient."""

    def __init__(self, *args, weights: str = "binary", weight_standardization=False, **kwargs):
        self.weights = _check_mode(weights)
        super().__init__(*args, **kwargs)
        if self.weights != "full" and self.bias is not None:
            raise ValueError("binary convolutions have no bias (the following BatchNorm has one)")
        self.weight_standardization = bool(weight_standardization)
        if self.weight_standardization:
            self.gain = nn.Parameter(torch.ones(self.out_channels, 1, 1, 1))

    def reset_parameters(self) -> None:
        super().reset_parameters()
        self._init_weight_mode()

    def forward(self, x: torch.Tensor, trace: torch.Tensor | None = None) -> torch.Tensor:
        weight = self.effective_weight()
        if trace is None:
            return self._conv_forward(x, weight, self.bias)
        out = _TracedConv2d.apply(
            x, trace, weight, self.stride, self.padding, self.dilation, self.groups
        )
        if self.bias is not None:
            out = out + self.bias.view(1, -1, 1, 1)
        return out


class SynapticLinear(_WeightMode, nn.Linear):
    """Linear layer with a weight mode and an optional trace input (see :class:`SynapticConv2d`)."""

    def __init__(self, *args, weights: str = "full", **kwargs):
        self.weights = _check_mode(weights)
        super().__init__(*args, **kwargs)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        self._init_weight_mode()

    def forward(self, x: torch.Tensor, trace: torch.Tensor | None = None) -> torch.Tensor:
        weight = self.effective_weight()
        if trace is None:
            return F.linear(x, weight, self.bias)
        out = _TracedLinear.apply(x, trace, weight)
        return out + self.bias if self.bias is not None else out


SYNAPTIC_LAYERS = (SynapticConv2d, SynapticLinear)
BINARY_AT_INFERENCE = ("binary", "latent")  # the weight modes stored as 1 bit once trained


def named_binary_parameters(
    model: nn.Module, mode: str | tuple[str, ...] = "binary"
) -> list[tuple[str, nn.Parameter]]:
    """The (name, weight) of every synaptic layer whose weight mode is ``mode`` (or one of the
    modes in a tuple, e.g. ``BINARY_AT_INFERENCE``), in module order."""
    modes = (mode,) if isinstance(mode, str) else tuple(mode)
    return [
        (f"{name}.weight" if name else "weight", module.weight)
        for name, module in model.named_modules()
        if isinstance(module, SYNAPTIC_LAYERS) and module.weights in modes
    ]


def binary_weight_values(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, +-1 values as float) of every stored binary weight (:meth:`_WeightMode.sign_values`)."""
    return [
        (f"{name}.weight" if name else "weight", module.sign_values())
        for name, module in model.named_modules()
        if isinstance(module, SYNAPTIC_LAYERS) and module.is_binary
    ]


def binary_numel(weight: torch.Tensor) -> int:
    """How many +-1 weights a binary parameter holds (8 per byte when stored as
    :class:`bso.bits.PackedSigns`)."""
    return weight.binary_shape.numel() if isinstance(weight, PackedSigns) else weight.numel()
