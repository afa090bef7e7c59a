"""Model size as the paper's tables count it: binary weights 1 bit, every other parameter (first
conv, FC, BatchNorm weight and bias) 32 bits; MB = 10^6 bytes. Latent-weight models are binary at
inference, so their latent weights count 1 bit too. Buffers (BN running statistics) are not
counted."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from bso.layers import BINARY_AT_INFERENCE, binary_numel, named_binary_parameters


@dataclass(frozen=True)
class ModelSize:
    binary_params: int
    full_precision_params: int
    size_mb: float  # binary weights at 1 bit
    full_precision_size_mb: float  # every parameter at 32 bits

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return (
            f"{self.binary_params:,} binary + {self.full_precision_params:,} full-precision "
            f"parameters: {self.size_mb:.2f} MB (full-precision equivalent "
            f"{self.full_precision_size_mb:.2f} MB)"
        )


def model_size(model: nn.Module) -> ModelSize:
    binary_ids = {id(p) for _, p in named_binary_parameters(model, BINARY_AT_INFERENCE)}
    # binary_numel: the count of +-1 weights, also where they are held as bits (8 per byte)
    n_binary = sum(binary_numel(p) for p in model.parameters() if id(p) in binary_ids)
    n_full = sum(p.numel() for p in model.parameters() if id(p) not in binary_ids)
    return ModelSize(
        binary_params=n_binary,
        full_precision_params=n_full,
        size_mb=(n_binary / 8 + n_full * 4) / 1e6,
        full_precision_size_mb=(n_binary + n_full) * 4 / 1e6,
    )
