"""Building blocks shared by the spiking models: how a model's options turn into layers."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from bso.layers import SynapticConv2d, SynapticLinear, binarize_
from bso.models.agmm import AGMMGate
from bso.neurons import LIFNode

NORMS = ("bn", "none")
MODEL_INITS = ("release", "pytorch")  # model.init: how the model's weights start


@dataclass
class ModelOptions:
    """The options every model takes (see configs/model/*.yaml)."""

    name: str | None = None  # the config's name (vgg11, vgg_tiny, ...), for logs and reports
    weights: str = "binary"  # binary | latent | full, for the binary-able convs
    init: str = (
        "release"  # release: the released code's initialisation | pytorch: PyTorch's defaults
    )
    neuron: dict = field(default_factory=dict)  # LIFNode kwargs
    norm: str = "bn"  # bn: BatchNorm after each conv | none (with weight standardisation)
    weight_standardization: bool = False
    agmm: bool = False
    agmm_num_steps: int = 1
    agmm_statistic: str = "spatial_mean"
    agmm_learnable_alpha: bool = True

    def __post_init__(self):
        if self.norm not in NORMS:
            raise ValueError(f"unknown model.norm={self.norm!r}; choose one of {NORMS}")
        if self.init not in MODEL_INITS:
            raise ValueError(f"unknown model.init={self.init!r}; choose one of {MODEL_INITS}")
        self.neuron = dict(self.neuron or {})

    def lif(self) -> LIFNode:
        return LIFNode(**self.neuron)

    def conv(self, cin, cout, kernel, stride=1, binary=True, bias=False) -> SynapticConv2d:
        """A conv with the model's weight mode (``binary=True``) or full precision."""
        return SynapticConv2d(
            cin,
            cout,
            kernel,
            stride=stride,
            padding=kernel // 2,
            bias=bias and not binary,
            weights=self.weights if binary else "full",
            weight_standardization=self.weight_standardization,
        )

    def norm_layer(self, channels: int) -> nn.Module:
        return nn.BatchNorm2d(channels) if self.norm == "bn" else nn.Identity()

    def gate(self, binary: bool = True) -> nn.Module:
        """AGMM's gate after a binary conv + BN when ``agmm`` is on; identity otherwise."""
        if self.agmm and binary:
            return AGMMGate(self.agmm_num_steps, self.agmm_statistic, self.agmm_learnable_alpha)
        return nn.Identity()


@torch.no_grad()
def initialize(model: nn.Module, options: ModelOptions) -> nn.Module:
    """``init="release"``, the released code's initialisation (docs/parity.md): every conv Kaiming
    normal (fan_out, relu) with zero bias, binary ones then turned into their signs (+-1 from the
    start, unlike the release, whose first forward pass still sees the real values); the linear layer
    N(0, 0.01) with zero bias; BatchNorm weight 1, bias 0. ``init="pytorch"`` keeps PyTorch's
    defaults (binary convs: sign of a Kaiming-normal draw)."""
    if options.init == "pytorch":
        return model
    for module in model.modules():
        if isinstance(module, SynapticConv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
            if module.is_binary:
                binarize_(module.weight)
        elif isinstance(module, SynapticLinear):
            nn.init.normal_(module.weight, 0.0, 0.01)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    return model


def trace_of(neuron: LIFNode) -> torch.Tensor | None:
    """The neuron's presynaptic trace while training online; None otherwise."""
    return neuron.trace if torch.is_grad_enabled() else None


class SpikingConvBlock(nn.Module):
    """conv -> norm [-> AGMM gate] -> LIF [-> pool]; passes the spikes and their trace on."""

    def __init__(self, conv: SynapticConv2d, options: ModelOptions, binary: bool):
        super().__init__()
        self.conv = conv
        self.bn = options.norm_layer(conv.out_channels)
        self.gate = options.gate(binary)
        self.neuron = options.lif()
        self.pool = nn.Identity()
        # what this block's input is, set by the model that chains the blocks (spike_levels): 1 for
        # 0/1 spikes, n for averages of n spikes, None for real values (the image)
        self.input_levels: int | None = None

    def forward(self, x, trace=None):
        spikes = self.pool(self.neuron(self.gate(self.bn(self.conv(x, trace)))))
        trace = trace_of(self.neuron)
        return spikes, (self.pool(trace) if trace is not None else None)


def as_pair(value) -> tuple:
    """A pool's or conv's size argument as a pair: 3 -> (3, 3), (2, 3) -> (2, 3)."""
    return (value, value) if isinstance(value, int) else tuple(value)


def spike_levels(pool: nn.Module) -> int | None:
    """What ``pool(spikes)`` holds, exactly and compactly: 1 for 0/1 values (no pool, a max pool);
    n for multiples of 1/n (an average pool over n spikes, n a power of 2 below 256, so that k / n is
    exact in floating point and k fits a byte); None when neither holds."""
    if isinstance(pool, (nn.Identity, nn.MaxPool2d)):
        return 1
    if isinstance(pool, nn.AvgPool2d):
        kernel = as_pair(pool.kernel_size)
        stride = as_pair(pool.stride or pool.kernel_size)
        n = kernel[0] * kernel[1]
        plain = stride == kernel and pool.padding in (0, (0, 0)) and pool.divisor_override is None
        if plain and not pool.ceil_mode and n < 256 and n & (n - 1) == 0:
            return n
    return None
