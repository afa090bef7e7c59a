"""Spiking VGG built from a layer list such as the paper's VGG-11
``64C3-128C3-AP2-256C3-256C3-AP2-512C3-512C3-AP2-512C3-512C3`` (+ global average pool + FC).

Each ``<n>C<k>`` is conv(k x k, n channels, stride 1, 'same' padding) -> BatchNorm -> LIF; ``AP<k>`` /
``MP<k>`` is average / max pooling applied to the spikes (and to their trace). The first conv and the
final linear layer are full precision (the first conv has a bias, as in the released code); every
other conv uses ``weights`` (binary: stored +-1; latent: sign of a latent weight; full). BatchNorm runs
per time step (``norm="none"`` with ``weight_standardization=True`` gives OTTT's normaliser-free VGG).
``agmm=True`` adds AGMM's gate (bso.models.agmm) after each of those convs' BatchNorm.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import nn

from bso.layers import SynapticLinear
from bso.models.parts import ModelOptions, SpikingConvBlock, initialize, spike_levels

VGG11 = "64C3-128C3-AP2-256C3-256C3-AP2-512C3-512C3-AP2-512C3-512C3"

_CONV = re.compile(r"^(\d+)C(\d+)$")
_POOL = re.compile(r"^(AP|MP)(\d+)$")


def parse_layers(layers: str | Sequence[str]) -> list[tuple[str, int, int]]:
    """'64C3-AP2' -> [('conv', 64, 3), ('AP', 2, 2)]."""
    tokens = layers.split("-") if isinstance(layers, str) else list(layers)
    parsed = []
    for token in tokens:
        token = str(token).strip()
        if m := _CONV.match(token):
            parsed.append(("conv", int(m[1]), int(m[2])))
        elif m := _POOL.match(token):
            parsed.append((m[1], int(m[2]), int(m[2])))
        else:
            raise ValueError(
                f"bad layer token {token!r} in model.layers; expected '<channels>C<kernel>' "
                "(e.g. 64C3), 'AP<k>' (average pool) or 'MP<k>' (max pool)"
            )
    if not parsed or parsed[0][0] != "conv":
        raise ValueError(f"model.layers must start with a conv layer, got {layers!r}")
    return parsed


class SpikingVGG(nn.Module):
    """One time step of a spiking VGG: image (or frame) in, class scores out.

    ``options`` are :class:`bso.models.parts.ModelOptions` (weights, neuron, norm, AGMM, ...)."""

    def __init__(
        self,
        layers: str | Sequence[str] = VGG11,
        in_channels: int = 3,
        num_classes: int = 10,
        **options,
    ):
        super().__init__()
        opts = ModelOptions(**options)
        blocks: list[SpikingConvBlock] = []
        channels = in_channels
        for kind, size, kernel in parse_layers(layers):
            if kind == "conv":
                first = not blocks  # the first conv is full precision, with a bias
                conv = opts.conv(channels, size, kernel, binary=not first, bias=first)
                blocks.append(SpikingConvBlock(conv, opts, binary=not first))
                channels = size
            else:
                blocks[-1].pool = nn.AvgPool2d(kernel) if kind == "AP" else nn.MaxPool2d(kernel)
        for before, block in zip(blocks[:-1], blocks[1:], strict=True):  # input: the output before
            block.input_levels = spike_levels(before.pool)
        self.blocks = nn.ModuleList(blocks)
        self.classifier = SynapticLinear(channels, num_classes, weights="full")
        initialize(self, opts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        trace = None
        for block in self.blocks:
            x, trace = block(x, trace)
        x = x.mean(dim=(2, 3))  # global average pool
        if trace is not None:
            trace = trace.mean(dim=(2, 3))
        return self.classifier(x, trace)
