"""Synaptic layers: convolution and linear layers whose weights are binary or full precision, and
whose weight gradient can come from the presynaptic trace instead of the spikes.

Binary weights (``weights="binary"``) are stored as exactly -1/+1 in the parameter itself and used as
stored: no sign() in the forward pass, no scaling factor, no latent copy. Only a binary optimizer
(:class:`bso.optim.BSO`, :class:`bso.optim.TBSO`) may change them, by flipping signs.

Online training (spec section 2, step 3): the forward value uses the spikes ``s[t]``, the weight
gradient uses the trace ``a_hat[t]``:  ``G[t] = delta[t] * a_hat[t]^T``. The input gradient is the
usual one (``W^T delta``), so errors still reach the neurons below.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.grad import conv2d_input, conv2d_weight

WEIGHT_MODES = ("binary", "full")


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
        grad_spikes = grad_out @ weight if ctx.needs_input_grad[0] else None
        grad_weight = grad_out.t() @ trace if ctx.needs_input_grad[2] else None
        return grad_spikes, None, grad_weight


def _check_mode(weights: str) -> str:
    if weights not in WEIGHT_MODES:
        raise ValueError(f"unknown weight mode {weights!r}; choose one of {WEIGHT_MODES}")
    return weights


@torch.no_grad()
def binarize_(weight: torch.Tensor) -> torch.Tensor:
    """In place: w <- sign(w) with sign(0) = +1, so every entry is exactly -1 or +1."""
    return weight.copy_(torch.where(weight >= 0, 1.0, -1.0))


class SynapticConv2d(nn.Conv2d):
    """Conv2d with a weight mode (``binary`` = stored +-1, or ``full``) and an optional trace input."""

    def __init__(self, *args, weights: str = "binary", **kwargs):
        self.weights = _check_mode(weights)
        super().__init__(*args, **kwargs)
        if self.weights == "binary" and self.bias is not None:
            raise ValueError("binary convolutions have no bias (the following BatchNorm has one)")

    @property
    def is_binary(self) -> bool:
        return self.weights == "binary"

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if self.is_binary:  # sign of a Kaiming-normal init
            nn.init.kaiming_normal_(self.weight, nonlinearity="relu")
            binarize_(self.weight)

    def forward(self, x: torch.Tensor, trace: torch.Tensor | None = None) -> torch.Tensor:
        if trace is None:
            return super().forward(x)
        out = _TracedConv2d.apply(
            x, trace, self.weight, self.stride, self.padding, self.dilation, self.groups
        )
        if self.bias is not None:
            out = out + self.bias.view(1, -1, 1, 1)
        return out

    def extra_repr(self) -> str:
        return super().extra_repr() + f", weights={self.weights}"


class SynapticLinear(nn.Linear):
    """Linear layer with a weight mode and an optional trace input (see :class:`SynapticConv2d`)."""

    def __init__(self, *args, weights: str = "full", **kwargs):
        self.weights = _check_mode(weights)
        super().__init__(*args, **kwargs)

    @property
    def is_binary(self) -> bool:
        return self.weights == "binary"

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if self.is_binary:
            nn.init.kaiming_normal_(self.weight, a=math.sqrt(5))
            binarize_(self.weight)

    def forward(self, x: torch.Tensor, trace: torch.Tensor | None = None) -> torch.Tensor:
        if trace is None:
            return super().forward(x)
        out = _TracedLinear.apply(x, trace, self.weight)
        return out + self.bias if self.bias is not None else out

    def extra_repr(self) -> str:
        return super().extra_repr() + f", weights={self.weights}"


SYNAPTIC_LAYERS = (SynapticConv2d, SynapticLinear)


def named_binary_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The (name, weight) of every binary synaptic layer, in module order."""
    return [
        (f"{name}.weight" if name else "weight", module.weight)
        for name, module in model.named_modules()
        if isinstance(module, SYNAPTIC_LAYERS) and module.is_binary
    ]
