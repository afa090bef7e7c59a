"""Spiking MLP for feature sequences such as the Spiking Heidelberg Digits (700 input channels per
time step): ``hidden`` fully connected layers, each linear -> BatchNorm1d -> LIF, then a linear
classifier on the last layer's spikes.

As in :class:`bso.models.SpikingVGG`, the first layer (on the frames: spike counts, not 0/1 spikes)
and the classifier are full precision and every other linear layer uses ``weights`` (binary: stored
+-1; latent: sign of a latent weight; full), with BatchNorm per time step. ``init="release"``:
hidden layers Kaiming normal (fan_in, relu; binary ones turned into their signs), the classifier
N(0, 0.01), zero biases -- the VGG's rule carried over to linear layers (our choice; the released
code has no MLP).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from bso.layers import SynapticLinear, binarize_
from bso.models.parts import ModelOptions, initialize, trace_of


def parse_hidden(hidden: int | str | Sequence[int]) -> list[int]:
    """512 -> [512]; '512-256' -> [512, 256]; [512, 256] -> [512, 256] (each >= 1)."""
    if isinstance(hidden, int):
        sizes = [hidden]
    elif isinstance(hidden, str):
        sizes = [int(s) for s in hidden.split("-") if s.strip()] if hidden.strip() else []
    else:
        sizes = [int(s) for s in hidden]
    if not sizes or min(sizes) < 1:
        raise ValueError(
            f"model.hidden must list the hidden layers' widths, each >= 1 (e.g. [512, 512]), "
            f"got {hidden!r}"
        )
    return sizes


class SpikingLinearBlock(nn.Module):
    """linear -> norm -> LIF; passes the spikes and their trace on (the MLP's SpikingConvBlock)."""

    def __init__(self, linear: SynapticLinear, options: ModelOptions):
        super().__init__()
        self.linear = linear
        self.bn = nn.BatchNorm1d(linear.out_features) if options.norm == "bn" else nn.Identity()
        self.neuron = options.lif()

    def forward(self, x, trace=None):
        spikes = self.neuron(self.bn(self.linear(x, trace)))
        return spikes, trace_of(self.neuron)


class SpikingMLP(nn.Module):
    """One time step of a spiking MLP: a feature vector ``[B, in_channels]`` (or any
    ``[B, in_channels, ...]``, flattened) in, class scores out.

    ``options`` are :class:`bso.models.parts.ModelOptions` (weights, neuron, norm, init). AGMM's
    gate and weight standardisation are for convolutions and are refused here."""

    def __init__(
        self,
        hidden: int | str | Sequence[int] = (512, 512, 512),
        in_channels: int = 700,
        num_classes: int = 20,
        **options,
    ):
        super().__init__()
        opts = ModelOptions(**options)
        if opts.agmm or opts.weight_standardization:
            raise ValueError(
                "model.agmm and model.weight_standardization apply to convolutions; the spiking "
                "MLP has none (set them to false)"
            )
        blocks = []
        features = in_channels
        for i, width in enumerate(parse_hidden(hidden)):
            weights = "full" if i == 0 else opts.weights  # the first layer sees the frames
            linear = SynapticLinear(features, width, bias=i == 0, weights=weights)
            blocks.append(SpikingLinearBlock(linear, opts))
            features = width
        self.blocks = nn.ModuleList(blocks)
        self.classifier = SynapticLinear(features, num_classes, weights="full")
        initialize(self, opts)  # BatchNorm and the classifier
        if opts.init == "release":
            with torch.no_grad():
                for block in self.blocks:
                    weight = block.linear.weight
                    nn.init.kaiming_normal_(weight, mode="fan_in", nonlinearity="relu")
                    if block.linear.bias is not None:
                        nn.init.zeros_(block.linear.bias)
                    if block.linear.is_binary:
                        binarize_(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, trace = x.flatten(1), None
        for block in self.blocks:
            x, trace = block(x, trace)
        return self.classifier(x, trace)
