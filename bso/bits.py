"""Bits: tensors of 0/1 values (+-1 weights, spikes) stored 8 per byte, in one bit order.

The order is numpy's (``np.packbits`` / ``np.unpackbits`` with the default ``bitorder="big"``):
entries are taken in the tensor's logical (row-major) order, entry ``8 k + i`` sits in bit ``7 - i``
of byte ``k`` (the most significant bit first), and the last byte is padded with zero bits. For +-1
weights a set bit is +1 (sign(0) = +1 when packing real values), a clear bit -1; for spikes a set bit
is a spike. The 1-bit exports (``*_1bit.pt``, :mod:`bso.checkpoint`) and the lean mode's packed
weights and saved spikes (:mod:`bso.lean`) all use these functions.

Packing multiplies each group of 8 entries (8 bytes of 0/1, read as one little-endian int64) by a
constant that gathers them into the top byte; unpacking looks each byte up in a 256 x 8 table of
values (index_select). Both are a few passes over 1/8 of the entries.
"""

from __future__ import annotations

import torch
from torch import nn

# byte k of a group (bit 8k of the int64) lands on bit 63 - k: 2^63 + 2^54 + ... + 2^0, as an int64
_GATHER_BITS = sum(1 << (63 - 9 * k) for k in range(8)) - (1 << 64)
_BIT_TABLES: dict = {}


def _bit_table(device, dtype, low: float) -> torch.Tensor:
    """256 x 8: the 8 values a byte packs (most significant bit first), bit 1 -> 1, bit 0 -> ``low``."""
    key = (device, dtype, low)
    if key not in _BIT_TABLES:
        table = [[1.0 if (b >> (7 - i)) & 1 else low for i in range(8)] for b in range(256)]
        _BIT_TABLES[key] = torch.tensor(table, dtype=dtype, device=device)
    return _BIT_TABLES[key]


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A boolean (or 0/1) tensor -> uint8 on the same device, 8 entries per byte (see the module
    docstring for the order; zero padded)."""
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


def pack_signs(weight: torch.Tensor) -> torch.Tensor:
    """The signs of ``weight`` as bits: +1 (w >= 0, so sign(0) = +1) -> 1, -1 -> 0."""
    return pack_bits(weight.detach() >= 0)


def unpack_signs(bits: torch.Tensor, shape, dtype=torch.float32) -> torch.Tensor:
    """Packed bits -> exactly +-1 (bit 1 = +1) of ``shape``, on the bits' device."""
    return unpack_bits(bits, shape, dtype, low=-1.0)


class PackedSigns(nn.Parameter):
    """A uint8 parameter (no gradient) holding the +-1 weights of shape ``binary_shape`` as bits."""

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

    def values(self, dtype=torch.float32) -> torch.Tensor:
        """The +-1 weights, unpacked (on the parameter's device)."""
        return unpack_signs(self, self.binary_shape, dtype)
