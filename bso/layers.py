"""Synaptic layers: convolution and linear layers whose weights are binary or full precision, and
whose weight gradient can come from the presynaptic trace instead of the spikes.

Weight modes:

* ``binary``: stored as exactly -1/+1 in the parameter itself and used as stored: no sign() in the
  forward pass, no scaling factor, no latent copy. Only a binary optimizer (:class:`bso.optim.BSO`,
  :class:`bso.optim.TBSO`) may change them, by flipping signs.
* ``latent``: the BPTT binary-SNN baseline. A real-valued latent weight ``w``; the forward pass uses
  ``sign(w)`` (sign(0) = +1) and the backward pass the straight-through estimator
  ``dL/dw = dL/dsign(w) * 1[|w| <= 1]`` (spec Eq. 4). Binary at inference (1 bit).
* ``full``: a full-precision weight.

Storage of ``binary`` weights (``storage``): ``float`` keeps the +-1 values in a float32 parameter;
``bits`` (the lean mode, :mod:`bso.lean`) packs them 8 per byte into a uint8 parameter that needs no
gradient, unpacks them per layer when used, and lets the binary optimizer flip them inside backward,
right after the layer computed its input gradient with the old weights (see :class:`_PackedTracedConv2d`).

Online training (spec section 2, step 3): the forward value uses the spikes ``s[t]``, the weight
gradient uses the trace ``a_hat[t]``:  ``G[t] = delta[t] * a_hat[t]^T``. The input gradient is the
usual one (``W^T delta``), so errors still reach the neurons below.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.grad import conv2d_input, conv2d_weight

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


# Packed storage: 8 entries per byte, entry i of a group of 8 in bit i (least significant first);
# bit 1 = +1 for weights, a spike for spikes. Packing multiplies each group's 8 bytes (0/1, read as one
# little-endian int64) by a constant that gathers them into the top byte; unpacking looks each byte up
# in a 256 x 8 table of values (index_select). Both are a few passes over 1/8 of the entries.
_GATHER_BITS = sum(1 << (7 * k) for k in range(1, 9))  # 2^7 + 2^14 + ... + 2^56
_BIT_TABLES: dict = {}


def _bit_table(device, dtype, low: float) -> torch.Tensor:
    """256 x 8: the 8 values a byte packs, bit 1 -> 1, bit 0 -> ``low``."""
    key = (device, dtype, low)
    if key not in _BIT_TABLES:
        table = [[1.0 if (b >> i) & 1 else low for i in range(8)] for b in range(256)]
        _BIT_TABLES[key] = torch.tensor(table, dtype=dtype, device=device)
    return _BIT_TABLES[key]


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A boolean (or 0/1) tensor -> uint8, 8 entries per byte (entry i of each 8 in bit i; zero
    padded), in the tensor's logical (row-major) order."""
    flat = mask.reshape(-1).to(torch.bool)
    pad = (-flat.numel()) % 8
    if pad or flat.storage_offset() % 8 or not flat.is_contiguous():
        flat = torch.cat([flat, flat.new_zeros(pad)])
    groups = flat.view(torch.uint8).view(torch.int64)  # 8 bytes of 0/1 each
    return ((groups * _GATHER_BITS) >> 56).to(torch.uint8)


def unpack_bits(bits: torch.Tensor, shape, dtype=torch.float32, low: float = 0.0) -> torch.Tensor:
    """Packed bits -> a contiguous tensor of ``shape`` on the bits' device: 1 where a bit is set,
    ``low`` elsewhere (0: spikes; -1: +-1 weights)."""
    numel = torch.Size(shape).numel()
    values = _bit_table(bits.device, dtype, low).index_select(0, bits.int()).view(-1)
    return (values if values.numel() == numel else values[:numel]).view(shape)


def unpack_signs_on_device(bits: torch.Tensor, shape, dtype=torch.float32) -> torch.Tensor:
    """Packed bits -> exactly +-1 (bit 1 = +1) of ``shape``, on the bits' device."""
    return unpack_bits(bits, shape, dtype, low=-1.0)


class PackedSigns(nn.Parameter):
    """A uint8 parameter (no gradient) holding +-1 weights of shape ``binary_shape`` as packed bits."""

    def __new__(cls, bits: torch.Tensor, binary_shape):
        param = super().__new__(cls, bits, requires_grad=False)
        param.binary_shape = torch.Size(binary_shape)
        return param

    def __deepcopy__(self, memo):
        if id(self) not in memo:
            memo[id(self)] = PackedSigns(self.data.clone(), self.binary_shape)
        return memo[id(self)]

    def __repr__(self) -> str:
        return f"PackedSigns(shape={tuple(self.binary_shape)}, {self.numel()} bytes)"


def update_in_backward(layer, weight: torch.Tensor, grad_weight: torch.Tensor) -> None:
    """Hand a packed layer's gradient to its binary optimizer (bound by bso.optim.build_router)."""
    update = layer.binary_update() if layer.binary_update is not None else None
    if update is None:
        raise RuntimeError(
            f"{type(layer).__name__} holds its +-1 weights as packed bits (engine.lean); they are "
            "flipped inside backward by BSO/T-BSO, but no binary optimizer is bound to them. Build "
            "the optimizer with bso.optim.build_router / build_optimizer after engine.prepare(model)."
        )
    update(layer.weight, weight, grad_weight)


class _PackedTracedConv2d(torch.autograd.Function):
    """:class:`_TracedConv2d` for packed +-1 weights, with the binary update fused into backward.

    Only the packed bits are saved; backward unpacks them, computes the input gradient with the old
    weights, then the weight gradient from the trace, and gives that gradient straight to the binary
    optimizer, which flips the bits in place. The gradient is freed on return: no ``.grad`` exists."""

    @staticmethod
    def forward(ctx, spikes, trace, bits, layer, stride, padding, dilation, groups):
        ctx.save_for_backward(trace, bits)
        ctx.layer = layer
        ctx.conv = (spikes.shape, stride, padding, dilation, groups)
        weight = unpack_signs_on_device(bits, layer.binary_shape, spikes.dtype)
        return F.conv2d(spikes, weight, None, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad_out):
        trace, bits = ctx.saved_tensors
        shape, stride, padding, dilation, groups = ctx.conv
        # float32 even when the forward ran under bf16 autocast (fast.autocast): the flip rule's G[t]
        grad_out, trace = grad_out.float(), trace.float()
        weight = unpack_signs_on_device(bits, ctx.layer.binary_shape, grad_out.dtype)
        grad_spikes = None
        if ctx.needs_input_grad[0]:
            grad_spikes = conv2d_input(shape, weight, grad_out, stride, padding, dilation, groups)
        grad_weight = conv2d_weight(
            trace, weight.shape, grad_out, stride, padding, dilation, groups
        )
        update_in_backward(ctx.layer, weight, grad_weight)
        return grad_spikes, None, None, None, None, None, None, None


class _PackedTracedLinear(torch.autograd.Function):
    """:class:`_TracedLinear` for packed +-1 weights (see :class:`_PackedTracedConv2d`)."""

    @staticmethod
    def forward(ctx, spikes, trace, bits, layer):
        ctx.save_for_backward(trace, bits)
        ctx.layer = layer
        return spikes @ unpack_signs_on_device(bits, layer.binary_shape, spikes.dtype).t()

    @staticmethod
    def backward(ctx, grad_out):
        trace, bits = ctx.saved_tensors
        grad_out, trace = grad_out.float(), trace.float()  # float32 G[t] (see above)
        weight = unpack_signs_on_device(bits, ctx.layer.binary_shape, grad_out.dtype)
        grad_spikes = grad_out @ weight if ctx.needs_input_grad[0] else None
        update_in_backward(ctx.layer, weight, grad_out.t() @ trace)
        return grad_spikes, None, None, None


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
    storage: str = "float"  # float | bits (packed +-1 weights, see pack_weight_)
    binary_shape: torch.Size | None = None  # the weight's shape while stored as bits
    binary_update = None  # weakref to the binary optimizer's fused update (storage="bits")

    @property
    def is_binary(self) -> bool:
        """Stored +-1 weights, for BSO / T-BSO."""
        return self.weights == "binary"

    @property
    def is_packed(self) -> bool:
        return self.storage == "bits"

    @torch.no_grad()
    def pack_weight_(self) -> None:
        """Hold the +-1 weights as packed bits (8 per byte, a uint8 parameter without gradient).
        The state dict still reads and writes the float +-1 weight, so checkpoints, the 1-bit export
        and resume are the same in both storages."""
        if not self.is_binary or self.weight_standardization:
            raise ValueError(
                "only stored +-1 weights (weights=binary, no weight standardisation) can be packed"
            )
        if self.is_packed:
            return
        w = self.weight.detach()
        if not torch.all(w.abs() == 1):
            raise ValueError("pack_weight_ needs every weight to be exactly -1 or +1")
        self.binary_shape = w.shape
        self.weight = PackedSigns(pack_bits(w > 0), w.shape)
        self.storage = "bits"
        self._register_state_dict_hook(_unpacked_state_dict)
        self._register_load_state_dict_pre_hook(_pack_loaded_state, with_module=True)

    def __getstate__(self):
        """Copies and pickles leave the optimizer binding (a weak reference) behind."""
        state = self.__dict__.copy()
        state["binary_update"] = None
        return state

    def sign_values(self) -> torch.Tensor:
        """The +-1 weights as a float tensor (unpacked when stored as bits)."""
        if self.is_packed:
            return unpack_signs_on_device(self.weight, self.binary_shape)
        return self.weight.detach()

    def effective_weight(self) -> torch.Tensor:
        """The weight the forward pass uses: sign(latent) with STE in latent mode, then (optionally)
        OTTT's scaled weight standardisation ``gain * (w - mean) / sqrt(var * fan_in + eps)`` per
        output channel."""
        if self.is_packed:
            return self.sign_values()
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

    def packed_training_forward(self, x, trace, function, *args):
        """Training forward of a packed layer: only the online engine's traced path exists."""
        if trace is None:
            raise RuntimeError(
                "packed +-1 weights (engine.lean) train only online with per-step updates: they "
                "have no gradient to accumulate. Use engine.lean=false for BPTT or accumulated updates."
            )
        return function.apply(x, trace, self.weight, self, *args)

    def extra_repr(self) -> str:
        ws = ", weight_standardization=True" if self.weight_standardization else ""
        packed = ", storage=bits" if self.is_packed else ""
        return super().extra_repr() + f", weights={self.weights}{ws}{packed}"


def _unpacked_state_dict(module, state_dict, prefix, local_metadata):
    """State dict hook of a packed layer: write the weight as float +-1, as the float storage does."""
    key = prefix + "weight"
    if key in state_dict:
        state_dict[key] = module.sign_values()
    return state_dict


def _pack_loaded_state(module, state_dict, prefix, *args):
    """Load pre-hook of a packed layer: accept the float +-1 weight (any checkpoint) and pack it."""
    key = prefix + "weight"
    value = state_dict.get(key)
    if value is None or value.dtype == torch.uint8:
        return
    if value.shape != module.binary_shape or not torch.all(value.abs() == 1):
        return  # let load_state_dict report the mismatch
    state_dict[key] = pack_bits(value.to(module.weight.device) > 0)


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
        if self.is_packed and torch.is_grad_enabled():
            return self.packed_training_forward(
                x, trace, _PackedTracedConv2d, self.stride, self.padding, self.dilation, self.groups
            )
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
        if self.is_packed and torch.is_grad_enabled():
            out = self.packed_training_forward(x, trace, _PackedTracedLinear)
            return out + self.bias if self.bias is not None else out
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
    """(name, +-1 values as float) of every stored binary weight, whether float or packed bits."""
    return [
        (f"{name}.weight" if name else "weight", module.sign_values())
        for name, module in model.named_modules()
        if isinstance(module, SYNAPTIC_LAYERS) and module.is_binary
    ]


def binary_numel(weight: torch.Tensor) -> int:
    """How many +-1 weights a binary parameter holds (8 per byte when packed)."""
    shape = getattr(weight, "binary_shape", None)
    return int(shape.numel()) if shape is not None else weight.numel()


def is_packed(weight: torch.Tensor) -> bool:
    """A packed +-1 weight (storage=bits): a uint8 parameter with its logical ``binary_shape``."""
    return getattr(weight, "binary_shape", None) is not None
