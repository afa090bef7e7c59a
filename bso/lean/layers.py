"""The lean mode's synaptic layers: +-1 weights held as packed bits and flipped inside backward.

:meth:`PackedWeights.from_module` builds the packed layer of a binary
:class:`bso.layers.SynapticConv2d` / :class:`bso.layers.SynapticLinear` (or of a layer made by
:func:`bso.convert`): a new module of the packed class that takes over the old one's parameters,
buffers, hooks and attributes, its weight a :class:`bso.bits.PackedSigns` (8 weights per byte, a
uint8 parameter that needs no gradient), unpacked per layer when used.
:func:`bso.replace.replace_module` puts it where the old one was in the model. In training the
layer runs :class:`_PackedTracedConv2d` /
:class:`_PackedTracedLinear`: the traced layers of :mod:`bso.layers` whose backward, right after
computing the input gradient with the old weights, hands the weight gradient ``G[t]`` to the bound
BSO / T-BSO (:mod:`bso.lean.optim`), which flips the bits in place. No ``.grad`` is ever stored.

The state dict still reads and writes the float +-1 weight, so checkpoints, the 1-bit export and
resume are the same as in the plain mode.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.grad import conv2d_input, conv2d_weight

from bso.bits import PackedSigns, pack_bits, unpack_signs
from bso.conversion import ConvertedConv2d, ConvertedLinear
from bso.layers import SYNAPTIC_LAYERS, SynapticConv2d, SynapticLinear
from bso.lean.optim import InBackwardFlips
from bso.optim.router import BUILD_ORDER
from bso.replace import take_over

LEAN = "the lean mode, bso.lean"  # what replaced a module (bso.replace.take_over's errors)


def update_in_backward(layer, weight: torch.Tensor, grad_weight: torch.Tensor) -> None:
    """Hand a packed layer's gradient to the binary optimizer bound to it (the flip happens there)."""
    update = layer.binary_update() if layer.binary_update is not None else None
    if update is None:
        raise RuntimeError(
            f"{layer.lean_name} holds its +-1 weights as packed bits (the lean mode), which BSO / "
            f"T-BSO flips inside backward, but no binary optimizer is bound to them. {BUILD_ORDER}"
        )
    update(layer.weight, weight, grad_weight)


class _PackedTracedConv2d(torch.autograd.Function):
    """:class:`bso.layers._TracedConv2d` for packed +-1 weights, with the flip inside backward.

    Only the packed bits are saved; backward unpacks them, computes the input gradient with the old
    weights, then the weight gradient from the trace, and gives that gradient straight to the binary
    optimizer, which flips the bits in place. The gradient is freed on return: no ``.grad`` exists."""

    @staticmethod
    def forward(ctx, spikes, trace, bits, layer, stride, padding, dilation, groups):
        ctx.save_for_backward(trace, bits)
        ctx.layer = layer
        ctx.conv = (spikes.shape, stride, padding, dilation, groups)
        weight = unpack_signs(bits, layer.binary_shape, spikes.dtype)
        return F.conv2d(spikes, weight, None, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad_out):
        trace, bits = ctx.saved_tensors
        shape, stride, padding, dilation, groups = ctx.conv
        # float32 even when the forward ran under bf16 autocast (fast.autocast): the flip rule's G[t]
        grad_out, trace = grad_out.float(), trace.float()
        weight = unpack_signs(bits, ctx.layer.binary_shape, grad_out.dtype)
        grad_spikes = None
        if ctx.needs_input_grad[0]:
            grad_spikes = conv2d_input(shape, weight, grad_out, stride, padding, dilation, groups)
        grad_weight = conv2d_weight(
            trace, weight.shape, grad_out, stride, padding, dilation, groups
        )
        update_in_backward(ctx.layer, weight, grad_weight)  # BSO / T-BSO flips the bits here
        return grad_spikes, None, None, None, None, None, None, None


class _PackedTracedLinear(torch.autograd.Function):
    """:class:`bso.layers._TracedLinear` for packed +-1 weights (see :class:`_PackedTracedConv2d`)."""

    @staticmethod
    def forward(ctx, spikes, trace, bits, layer):
        ctx.save_for_backward(trace, bits)
        ctx.layer = layer
        return spikes @ unpack_signs(bits, layer.binary_shape, spikes.dtype).t()

    @staticmethod
    def backward(ctx, grad_out):
        trace, bits = ctx.saved_tensors
        grad_out, trace = grad_out.float(), trace.float()  # float32 G[t] (see above)
        weight = unpack_signs(bits, ctx.layer.binary_shape, grad_out.dtype)
        grad_spikes = grad_out @ weight if ctx.needs_input_grad[0] else None
        update_in_backward(ctx.layer, weight, grad_out.t() @ trace)  # BSO / T-BSO flips here
        return grad_spikes, None, None, None


class PackedWeights:
    """What the packed layers add to a synaptic layer: the bits, their binding to BSO / T-BSO and a
    state dict in float +-1."""

    is_packed = True
    binary_shape: torch.Size  # the +-1 weight's shape
    binary_update = None  # weak reference to the bound optimizer's update_in_backward
    lean_name: str = "?"  # the layer's name in its model, for errors

    def sign_values(self) -> torch.Tensor:
        """The +-1 weights, unpacked to float32."""
        return unpack_signs(self.weight, self.binary_shape)

    def effective_weight(self) -> torch.Tensor:
        return self.sign_values()

    def training_forward(self, x, trace, function, *args):
        """Training forward: only the online engine's traced path (per-step updates) exists."""
        if trace is None:
            raise RuntimeError(
                "packed +-1 weights (engine.lean) train only online with per-step updates: they "
                "have no gradient to accumulate. Use engine.lean=false for BPTT or accumulated updates."
            )
        return function.apply(x, trace, self.weight, self, *args)

    def bind_binary_optimizer(self, optimizer) -> None:
        """From now on ``optimizer`` (BSO / T-BSO holding this layer's bits) flips them inside
        backward; called by :func:`bso.optim.build_router`. A weak reference, so the model neither
        keeps the optimizer alive nor carries it into a copy."""
        if not isinstance(optimizer, InBackwardFlips):
            raise TypeError(
                f"{self.lean_name} holds packed +-1 weights (the lean mode), which only an "
                f"in-backward BSO / T-BSO flips, not {type(optimizer).__name__}: give the "
                "optimizer's class, binary=bso.TBSO or functools.partial(bso.TBSO, num_steps=T, "
                "...), and bso builds its in-backward class (bso.lean.optim.LeanTBSO); or build "
                "bso.lean.optim.LeanBSO / LeanTBSO yourself"
            )
        if not any(p is self.weight for p in optimizer.binary_weights()):
            raise ValueError("a packed layer's weight is not one of this optimizer's weights")
        self.binary_update = weakref.WeakMethod(optimizer.update_in_backward)
        optimizer.packed_layers.append(weakref.ref(self))

    def bound_optimizer(self):
        """The binary optimizer that flips this layer's bits (None before one is built)."""
        update = self.binary_update() if self.binary_update is not None else None
        return None if update is None else update.__self__

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """The weight as float +-1, as the plain layer writes it."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if prefix + "weight" in destination:
            destination[prefix + "weight"] = self.sign_values()

    def _load_from_state_dict(self, state_dict, prefix, *args):
        """Accept the float +-1 weight (any checkpoint) and pack it."""
        key = prefix + "weight"
        value = state_dict.get(key)
        fits = value is not None and value.dtype != torch.uint8 and value.shape == self.binary_shape
        if fits and torch.all(value.abs() == 1):  # otherwise load_state_dict reports the mismatch
            state_dict[key] = pack_bits(value.to(self.weight.device) > 0)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def __getstate__(self):
        """Copies and pickles leave the optimizer binding (a weak reference) behind."""
        state = self.__dict__.copy()
        state["binary_update"] = None
        return state

    def extra_repr(self) -> str:
        return super().extra_repr() + ", storage=bits"

    @classmethod
    @torch.no_grad()
    def from_module(cls, layer: nn.Module, name: str = "?") -> PackedWeights:
        """The packed layer of ``layer`` (a binary synaptic layer): a new module of its packed class
        (:data:`PACKED_CLASSES`) that takes over its parameters, hooks and everything else, the
        weight held as bits; ``layer`` is left empty (:func:`take_over`). ``name``: the layer's name
        in its model, for errors."""
        if not (isinstance(layer, SYNAPTIC_LAYERS) and layer.is_binary):
            raise ValueError("only stored +-1 weights (weights=binary) can be packed")
        if isinstance(layer, PackedWeights):
            raise ValueError(f"{layer.lean_name} holds packed bits already")
        if layer.weight_standardization:
            raise ValueError("packing needs the stored +-1 weights: no weight standardisation")
        w = layer.weight.detach()
        if not torch.all(w.abs() == 1):
            raise ValueError("packing needs every weight to be exactly -1 or +1")
        packed = take_over(lean_class(type(layer), PACKED_CLASSES), layer, LEAN)
        packed.binary_shape = w.shape
        packed.weight = PackedSigns(pack_bits(w > 0), w.shape)
        packed.lean_name = name
        return packed


class PackedSynapticConv2d(PackedWeights, SynapticConv2d):
    """A binary :class:`bso.layers.SynapticConv2d` whose +-1 weights are packed bits."""

    def forward(self, x: torch.Tensor, trace: torch.Tensor | None = None) -> torch.Tensor:
        if not torch.is_grad_enabled():  # evaluation: the plain layer on the unpacked weights
            return super().forward(x, trace)
        args = (self.stride, self.padding, self.dilation, self.groups)
        return self.training_forward(x, trace, _PackedTracedConv2d, *args)


class PackedSynapticLinear(PackedWeights, SynapticLinear):
    """A binary :class:`bso.layers.SynapticLinear` whose +-1 weights are packed bits."""

    def forward(self, x: torch.Tensor, trace: torch.Tensor | None = None) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return super().forward(x, trace)
        out = self.training_forward(x, trace, _PackedTracedLinear)
        return out + self.bias if self.bias is not None else out


class _PackedConverted:
    """A converted layer (bso.convert) with packed weights needs its input's trace in training."""

    def input_trace(self, x: torch.Tensor) -> torch.Tensor | None:
        trace = super().input_trace(x)
        if trace is None and self.trace_links is not None and torch.is_grad_enabled():
            raise RuntimeError(
                f"{self.bso_name} holds packed +-1 weights (bso.make_lean) and needs the presynaptic "
                "trace of its input spikes, but its input is not a neuron's spikes (the network "
                "input?). Keep it full precision: bso.convert(model, full_precision=[...])."
            )
        return trace


class PackedConvertedConv2d(_PackedConverted, ConvertedConv2d, PackedSynapticConv2d):
    """A :class:`bso.conversion.ConvertedConv2d` whose +-1 weights are packed bits."""


class PackedConvertedLinear(_PackedConverted, ConvertedLinear, PackedSynapticLinear):
    """A :class:`bso.conversion.ConvertedLinear` whose +-1 weights are packed bits."""


PACKED_CLASSES = {
    SynapticConv2d: PackedSynapticConv2d,
    SynapticLinear: PackedSynapticLinear,
    ConvertedConv2d: PackedConvertedConv2d,
    ConvertedLinear: PackedConvertedLinear,
}


def lean_class(cls: type, classes: dict[type, type]) -> type:
    """The lean-mode class for a module of class ``cls``: ``classes[cls]``; for a subclass of one of
    its keys, a subclass of both (made once); ``cls`` itself if it is a lean class already."""
    if any(issubclass(cls, lean) for lean in classes.values()):
        return cls
    if cls not in classes:
        base = next(c for c in cls.__mro__ if c in classes)
        name = classes[base].__name__.replace(base.__name__, cls.__name__)
        classes[cls] = type(name, (cls, classes[base]), {})
    return classes[cls]
