"""AGMM's adaptive gradient modulation gate (Liang et al., AAAI 2025).

After a binary conv + BN:  X'[t] = alpha[t] * sigmoid(E(X[t])) * X[t].

The public material does not fix two details; both are options, with these defaults:
* ``statistic``: E(X[t]) is the mean over spatial positions per sample and channel
  (``"spatial_mean"``, shape [B, C, 1, 1]), or over channels and positions (``"global_mean"``, [B, 1, 1, 1]);
* ``learnable_alpha``: alpha[t] is a learnable scalar per time step, initialised to 1
  (``False``: fixed at 1).
The gate counts its own time steps; they restart when the neurons are reset (spikingjelly reset_net).
"""

from __future__ import annotations

import torch
from spikingjelly.activation_based import base
from torch import nn

STATISTICS = ("spatial_mean", "global_mean")


class AGMMGate(base.MemoryModule):
    def __init__(self, num_steps: int, statistic: str = "spatial_mean", learnable_alpha=True):
        super().__init__()
        if statistic not in STATISTICS:
            raise ValueError(f"unknown model.agmm_statistic={statistic!r}; choose {STATISTICS}")
        self.statistic = statistic
        alpha = torch.ones(int(num_steps))
        if learnable_alpha:
            self.alpha = nn.Parameter(alpha)
        else:
            self.register_buffer("alpha", alpha)
        self.register_memory("step", 0)

    def single_step_forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = (2, 3) if self.statistic == "spatial_mean" else (1, 2, 3)
        t = min(self.step, len(self.alpha) - 1)  # steps beyond T reuse the last alpha
        self.step = self.step + 1
        return self.alpha[t] * torch.sigmoid(x.mean(dim=dims, keepdim=True)) * x

    def extra_repr(self) -> str:
        return f"T={len(self.alpha)}, statistic={self.statistic}"
