"""Binary optimizers without latent weights: BSO and T-BSO (spec section 3).

Both keep the binary weights exactly -1/+1 and change them only by flipping signs, in place, under
``no_grad``. ``step`` returns how many weights flipped, one count per parameter (a tensor, so that
no device synchronisation happens inside the training loop).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.optim import Optimizer


class BinaryOptimizer(Optimizer):
    """Shared machinery: the +-1 check, in-place sign flips and the hyper-parameter schedule."""

    beta_keys: tuple[str, ...] = ()

    def __init__(self, params: Iterable, defaults: dict):
        if defaults["gamma"] < 0:
            raise ValueError(f"flip threshold gamma must be >= 0, got {defaults['gamma']}")
        for key in self.beta_keys:
            if not 0.0 <= defaults[key] < 1.0:
                raise ValueError(f"{key} must be in [0, 1), got {defaults[key]}")
        super().__init__(params, defaults)
        for p in self.binary_weights():
            if not torch.all(p.detach().abs() == 1):
                raise ValueError(
                    f"{type(self).__name__} flips binary weights and needs every value to be exactly "
                    f"-1 or +1, but got a tensor of shape {tuple(p.shape)} with other values. "
                    "Give it only binary weights (bso.layers.named_binary_parameters) and use a model "
                    "with model.weights=binary."
                )

    def binary_weights(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def momentum(self, p: torch.Tensor) -> torch.Tensor:
        state = self.state[p]
        if "momentum" not in state:
            state["momentum"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state["momentum"]

    def update_momentum(self, group: dict, beta: float):
        """M <- beta * M + (1 - beta) * G for the group's weights that have a gradient.
        Returns (weights, gradients, momenta), vectorised over the tensors with foreach ops."""
        weights = [p for p in group["params"] if p.grad is not None]
        grads = [p.grad for p in weights]
        moms = [self.momentum(p) for p in weights]
        if weights:
            torch._foreach_mul_(moms, beta)
            torch._foreach_add_(moms, grads, alpha=1.0 - beta)
        return weights, grads, moms

    @staticmethod
    def flip_(weight: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
        """W <- -W where ``flip``; returns the number of flips (0-d tensor)."""
        weight.mul_(1 - 2 * flip.to(weight.dtype))
        return flip.sum()

    def decay_hyperparameters(self, factor: float, betas: Iterable[str] | None = None) -> None:
        """The released code's schedule: gamma <- factor * gamma and, for each beta in ``betas``
        (default: all), (1 - beta) <- factor * (1 - beta)."""
        betas = self.beta_keys if betas is None else tuple(betas)
        unknown = set(betas) - set(self.beta_keys)
        if unknown:
            raise ValueError(
                f"{type(self).__name__} has no {sorted(unknown)} to decay; its betas are "
                f"{list(self.beta_keys)} (optimizer.hparam_decay.betas)"
            )
        for group in self.param_groups:
            group["gamma"] *= factor
            for key in betas:
                group[key] = 1.0 - (1.0 - group[key]) * factor

    def _counts(self, counts: dict[int, torch.Tensor]) -> torch.Tensor:
        weights = self.binary_weights()
        zero = torch.zeros((), dtype=torch.long, device=weights[0].device if weights else None)
        return torch.stack([counts.get(id(p), zero).to(zero.device) for p in weights])


class BSO(BinaryOptimizer):
    """Binary Spiking Online optimizer (paper Eq. 11-12).

        M <- beta * M + (1 - beta) * G          (M starts at 0)
        W <- -W  where  W * M > gamma

    ``reset_momentum=True`` (released code) sets M to 0 where a weight flipped.
    """

    beta_keys = ("beta",)

    def __init__(self, params, gamma: float = 5e-7, beta: float = 1 - 1e-3, reset_momentum=True):
        super().__init__(params, dict(gamma=gamma, beta=beta, reset_momentum=reset_momentum))

    @torch.no_grad()
    def step(self, t: int | None = None) -> torch.Tensor:
        """One update; ``t`` (the time step) is accepted for API symmetry with T-BSO and unused."""
        counts = {}
        for group in self.param_groups:
            weights, _, moms = self.update_momentum(group, group["beta"])
            if not weights:
                continue
            for w, m, wm in zip(weights, moms, torch._foreach_mul(weights, moms), strict=True):
                flip = wm > group["gamma"]
                counts[id(w)] = self.flip_(w, flip)
                if group["reset_momentum"]:
                    m.masked_fill_(flip, 0.0)
        return self._counts(counts)


class TBSO(BinaryOptimizer):
    """Temporal-aware BSO (paper Eq. 13-14, Algorithm 1).

        M      <- beta1 * M + (1 - beta1) * G[t]                 one tensor per weight, shared over t
        v_l[t] <- beta2 * v_l[t] + (1 - beta2) * mean(G[t]^2)    one scalar per layer and time step
        W <- -W  where  W * M > gamma * (sqrt(v_l[t]) + eps)     threshold="code" (released code)
                        W * M > gamma * sqrt(v_l[t] + eps)       threshold="paper"

    ``num_steps`` is T: the number of second-moment slots per layer. ``step(t)`` updates slot ``t``
    (0-based); ``step()`` uses slot 0 (for one update per batch). No bias correction; the momentum is
    not reset after a flip unless ``reset_momentum=True``.
    """

    beta_keys = ("beta1", "beta2")
    THRESHOLDS = ("code", "paper")

    def __init__(
        self,
        params,
        num_steps: int,
        gamma: float = 5e-7,
        beta1: float = 1 - 1e-3,
        beta2: float = 1 - 1e-5,
        eps: float = 1e-10,
        threshold: str = "code",
        reset_momentum: bool = False,
    ):
        if threshold not in self.THRESHOLDS:
            raise ValueError(
                f"unknown T-BSO threshold form {threshold!r}; choose {self.THRESHOLDS}"
            )
        if int(num_steps) < 1:
            raise ValueError(f"num_steps (T) must be >= 1, got {num_steps}")
        self.num_steps = int(num_steps)
        defaults = dict(
            gamma=gamma,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            threshold=threshold,
            reset_momentum=reset_momentum,
        )
        super().__init__(params, defaults)

    def second_moment(self, p: torch.Tensor) -> torch.Tensor:
        """v_l[0..T-1] of the layer whose weight is ``p`` (T scalars)."""
        state = self.state[p]
        if "v" not in state:
            state["v"] = torch.zeros(self.num_steps, dtype=p.dtype, device=p.device)
        return state["v"]

    @torch.no_grad()
    def step(self, t: int | None = None) -> torch.Tensor:
        t = 0 if t is None else int(t)
        if not 0 <= t < self.num_steps:
            raise IndexError(f"T-BSO was built for T={self.num_steps} time steps; got t={t}")
        counts = {}
        for group in self.param_groups:
            weights, grads, moms = self.update_momentum(group, group["beta1"])
            if not weights:
                continue
            beta2 = group["beta2"]
            for w, m, wm, g in zip(
                weights, moms, torch._foreach_mul(weights, moms), grads, strict=True
            ):
                v = self.second_moment(w)
                v[t] = beta2 * v[t] + (1.0 - beta2) * g.square().mean()  # mean(G^2)
                if group["threshold"] == "code":
                    threshold = group["gamma"] * (v[t].sqrt() + group["eps"])
                else:
                    threshold = group["gamma"] * (v[t] + group["eps"]).sqrt()
                flip = wm > threshold
                counts[id(w)] = self.flip_(w, flip)
                if group["reset_momentum"]:
                    m.masked_fill_(flip, 0.0)
        return self._counts(counts)
