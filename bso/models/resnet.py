"""Spiking ResNets.

* :class:`BiRealResNet18` (the paper's ImageNet model; Liu et al. 2018 style):
  full-precision stem (3x3 conv 64, BN, max-pool), 4 stages x 4 blocks of widths 64/128/256/512
  (stride 2 at the first block of stages 2-4). Each block is LIF -> binary 3x3 conv -> BN, plus a
  real-valued shortcut of the block's input; the downsample shortcut is avg-pool 2 -> full-precision
  1x1 conv -> BN. Global average pool, full-precision FC. ``stem_stride`` / ``stem_pool`` adapt it to
  64x64 or 32x32 inputs (CIFAR-style stem: stride 1, no pool).
* :class:`SpikingResNet19` (the CIFAR ResNet-19 of the BPTT binary-SNN literature): full-precision
  3x3 conv 128 stem + BN + LIF, stages of widths 128/256/512 with 3/3/2 basic blocks
  (conv-BN-LIF-conv-BN + shortcut -> LIF), 1x1 full-precision downsample shortcuts, GAP and one
  full-precision FC (the original's extra 256-unit FC is left out).

Binary 3x3 convs use ``weights``; every conv takes the presynaptic trace of its spiking input, so
both engines work unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from bso.layers import SynapticLinear
from bso.models.parts import ModelOptions, SpikingConvBlock, initialize, trace_of


class BiRealBlock(nn.Module):
    """x (real-valued) -> LIF -> binary 3x3 conv -> BN [-> AGMM gate], plus shortcut(x)."""

    def __init__(self, cin: int, cout: int, stride: int, opts: ModelOptions):
        super().__init__()
        self.neuron = opts.lif()
        self.conv = opts.conv(cin, cout, 3, stride=stride)
        self.bn = opts.norm_layer(cout)
        self.gate = opts.gate()
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.AvgPool2d(stride) if stride > 1 else nn.Identity(),
                opts.conv(cin, cout, 1, binary=False),
                opts.norm_layer(cout),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spikes = self.neuron(x)
        out = self.gate(self.bn(self.conv(spikes, trace_of(self.neuron))))
        return out + self.shortcut(x)


class BiRealResNet18(nn.Module):
    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 1000,
        widths=(64, 128, 256, 512),
        blocks_per_stage: int = 4,
        stem_stride: int = 2,
        stem_pool: bool = True,
        **options,
    ):
        super().__init__()
        opts = ModelOptions(**options)
        self.stem = nn.Sequential(
            opts.conv(in_channels, widths[0], 3, stride=stem_stride, binary=False),
            opts.norm_layer(widths[0]),
            nn.MaxPool2d(3, stride=2, padding=1) if stem_pool else nn.Identity(),
        )
        blocks, cin = [], widths[0]
        for stage, width in enumerate(widths):
            for i in range(blocks_per_stage):
                stride = 2 if (stage > 0 and i == 0) else 1
                blocks.append(BiRealBlock(cin, width, stride, opts))
                cin = width
        self.blocks = nn.Sequential(*blocks)
        self.classifier = SynapticLinear(cin, num_classes, weights="full")
        initialize(self, opts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.classifier(x.mean(dim=(2, 3)))


class SpikingBasicBlock(nn.Module):
    """spikes -> conv-BN-LIF -> conv-BN, plus shortcut(spikes) -> LIF -> spikes (and their trace)."""

    def __init__(self, cin: int, cout: int, stride: int, opts: ModelOptions):
        super().__init__()
        self.conv1 = opts.conv(cin, cout, 3, stride=stride)
        self.bn1, self.gate1, self.neuron1 = opts.norm_layer(cout), opts.gate(), opts.lif()
        self.conv2 = opts.conv(cout, cout, 3)
        self.bn2, self.gate2, self.neuron2 = opts.norm_layer(cout), opts.gate(), opts.lif()
        self.down_conv = self.down_bn = None
        if stride != 1 or cin != cout:
            self.down_conv = opts.conv(cin, cout, 1, stride=stride, binary=False)
            self.down_bn = opts.norm_layer(cout)

    def forward(self, x, trace=None):
        h = self.neuron1(self.gate1(self.bn1(self.conv1(x, trace))))
        out = self.gate2(self.bn2(self.conv2(h, trace_of(self.neuron1))))
        shortcut = x if self.down_conv is None else self.down_bn(self.down_conv(x, trace))
        spikes = self.neuron2(out + shortcut)
        return spikes, trace_of(self.neuron2)


class SpikingResNet19(nn.Module):
    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        widths=(128, 256, 512),
        blocks=(3, 3, 2),
        **options,
    ):
        super().__init__()
        opts = ModelOptions(**options)
        self.stem = SpikingConvBlock(
            opts.conv(in_channels, widths[0], 3, binary=False), opts, binary=False
        )
        layers, cin = [], widths[0]
        for stage, (width, n) in enumerate(zip(widths, blocks, strict=True)):
            for i in range(n):
                layers.append(
                    SpikingBasicBlock(cin, width, 2 if (stage > 0 and i == 0) else 1, opts)
                )
                cin = width
        self.blocks = nn.ModuleList(layers)
        self.classifier = SynapticLinear(cin, num_classes, weights="full")
        initialize(self, opts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, trace = self.stem(x)
        for block in self.blocks:
            x, trace = block(x, trace)
        x = x.mean(dim=(2, 3))
        return self.classifier(x, trace.mean(dim=(2, 3)) if trace is not None else None)
