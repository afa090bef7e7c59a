"""Spiking VGG built from a layer list such as the paper's VGG-11
``64C3-128C3-AP2-256C3-256C3-AP2-512C3-512C3-AP2-512C3-512C3`` (+ global average pool + FC).

Each ``<n>C<k>`` is conv(k x k, n channels, stride 1, 'same' padding) -> BatchNorm -> LIF; ``AP<k>`` /
``MP<k>`` is average / max pooling applied to the spikes (and to their trace). The first conv and the
final linear layer are full precision (the first conv has a bias, as in the released code); every
other conv uses ``weights`` (binary: stored +-1; latent: sign of a latent weight; full). BatchNorm runs
per time step. ``agmm=True`` adds AGMM's gate (bso.models.agmm) after each of those convs' BatchNorm.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import nn

from bso.layers import SynapticConv2d, SynapticLinear
from bso.models.agmm import AGMMGate
from bso.neurons import LIFNode

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


class SpikingConvBlock(nn.Module):
    """conv -> BatchNorm [-> AGMM gate] -> LIF [-> pool]; passes the spikes and their trace on."""

    def __init__(self, conv: SynapticConv2d, neuron: LIFNode, gate: nn.Module | None = None):
        super().__init__()
        self.conv = conv
        self.bn = nn.BatchNorm2d(conv.out_channels)
        self.gate = gate if gate is not None else nn.Identity()
        self.neuron = neuron
        self.pool = nn.Identity()

    def forward(self, x, trace=None):
        spikes = self.neuron(self.gate(self.bn(self.conv(x, trace))))
        trace = self.neuron.trace
        if trace is not None and torch.is_grad_enabled():
            return self.pool(spikes), self.pool(trace)
        return self.pool(spikes), None


class SpikingVGG(nn.Module):
    """One time step of a spiking VGG: image (or frame) in, class scores out."""

    def __init__(
        self,
        layers: str | Sequence[str] = VGG11,
        in_channels: int = 3,
        num_classes: int = 10,
        weights: str = "binary",
        neuron: dict | None = None,
        agmm: bool = False,
        agmm_num_steps: int = 1,
        agmm_statistic: str = "spatial_mean",
        agmm_learnable_alpha: bool = True,
    ):
        super().__init__()
        neuron_kwargs = dict(neuron or {})
        blocks: list[SpikingConvBlock] = []
        channels = in_channels
        for kind, size, kernel in parse_layers(layers):
            if kind == "conv":
                first = not blocks
                conv = SynapticConv2d(
                    channels,
                    size,
                    kernel,
                    padding=kernel // 2,
                    bias=first,
                    weights="full" if first else weights,
                )
                gate = (
                    AGMMGate(agmm_num_steps, agmm_statistic, agmm_learnable_alpha)
                    if agmm and not first
                    else None
                )
                blocks.append(SpikingConvBlock(conv, LIFNode(**neuron_kwargs), gate))
                channels = size
            else:
                pool = nn.AvgPool2d(kernel) if kind == "AP" else nn.MaxPool2d(kernel)
                blocks[-1].pool = pool
        self.blocks = nn.ModuleList(blocks)
        self.classifier = SynapticLinear(channels, num_classes, weights="full")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        trace = None
        for block in self.blocks:
            x, trace = block(x, trace)
        x = x.mean(dim=(2, 3))  # global average pool
        if trace is not None:
            trace = trace.mean(dim=(2, 3))
        return self.classifier(x, trace)
