"""Binary optimizers without latent weights: BSO and T-BSO (paper Eq. 11-14).

Both keep the binary weights exactly -1/+1 and change them only by flipping signs, in place, under
``no_grad``. ``step`` returns how many weights flipped, one count per parameter (a tensor, so that
no device synchronisation happens inside the training loop).

One method, :meth:`BinaryOptimizer.flip_rule`, is the per-tensor update (momentum, T-BSO's v_l[t],
the flip mask). ``step`` applies it to every weight that has a ``.grad``.

Floating-point order (``float_order``, docs/parity.md). On the full VGG-11 a float32 product
rounded in another order moves a value by an ulp, a weight that sits at its threshold flips on one
side only, and two runs part within a few steps. ``"release"`` (the default) computes what the
released code computes, in its order, so that a run is bit for bit the release's:

* it holds ``b = 1 - beta`` (Python float64) and decays ``b *= factor`` (the ``beta`` keys follow);
* ``M = (1 - b1) * M + b1 * G``: two float32 products, then the sum (no fused multiply-add);
* T-BSO: ``v[t] = (1 - b2) * v[t] + mean(b2 * (G * G))``; flip where
  ``(W * M) / (sqrt(v[t]) + eps) - gamma > 0``;  BSO: flip where ``W * M - gamma > 0``.

A tie (the tested value exactly 0) does not flip. The release computes ``r = -sign(value)`` and
``W = sign(r * W)``, so a tie writes a 0 weight (neither -1 nor +1) and BSO halves that momentum: a
defect not copied here. ``"fast"`` is the algebraically equal form with fewer passes over memory
(``M.mul_(beta).add_(G, alpha=1 - beta)``, ``W * M > gamma * (sqrt(v[t]) + eps)``): the same
method, other roundings.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.optim import Optimizer

from bso.bits import PackedSigns

FLOAT_ORDERS = ("release", "fast")


class BinaryOptimizer(Optimizer):
    """Shared machinery: the +-1 check, in-place sign flips and the hyper-parameter schedule."""

    beta_keys: tuple[str, ...] = ()

    def __init__(self, params: Iterable, defaults: dict):
        if defaults["gamma"] < 0:
            raise ValueError(f"flip threshold gamma must be >= 0, got {defaults['gamma']}")
        if defaults.get("float_order") not in FLOAT_ORDERS:
            raise ValueError(
                f"unknown float_order {defaults.get('float_order')!r}; choose one of {FLOAT_ORDERS} "
                "(release: the released code's rounding order, bit for bit; fast: fewer passes)"
            )
        for key in self.beta_keys:
            if not 0.0 <= defaults[key] < 1.0:
                raise ValueError(f"{key} must be in [0, 1), got {defaults[key]}")
            defaults[complement_key(key)] = 1.0 - defaults[key]  # the release holds 1 - beta
        super().__init__(params, defaults)
        for p in self.binary_weights():
            if isinstance(p, PackedSigns):  # +-1 weights held as bits: +-1 by construction
                continue
            if not torch.all(p.detach().abs() == 1):
                raise ValueError(
                    f"{type(self).__name__} flips binary weights and needs every value to be exactly "
                    f"-1 or +1, but got a tensor of shape {tuple(p.shape)} with other values. "
                    "Give it only binary weights: bso.binary_parameters(model) of a model made binary "
                    "with bso.convert, or bso.CaseOptimizer(model, ...); in train.py, a model with "
                    "model.weights=binary."
                )

    def binary_weights(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def momentum(self, p: torch.Tensor) -> torch.Tensor:
        """M of weight ``p``: of the weight's shape and dtype."""
        state = self.state[p]
        if "momentum" not in state:
            state["momentum"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state["momentum"]

    @staticmethod
    def update_momentum_(momentum: torch.Tensor, grad: torch.Tensor, beta: float) -> None:
        """M <- beta * M + (1 - beta) * G (float_order="fast")."""
        momentum.mul_(beta).add_(grad, alpha=1.0 - beta)

    @staticmethod
    def release_momentum_(momentum: torch.Tensor, grad: torch.Tensor, b: float) -> None:
        """M <- (1 - b) * M + b * G with b = 1 - beta, rounded as the released code rounds it: each
        product in float32, then their sum (float_order="release")."""
        momentum.mul_(1 - b).add_(b * grad)

    def flip_rule(
        self, p: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor, group: dict, t: int | None
    ) -> torch.Tensor:
        """The per-tensor update of weight ``p`` (its +-1 values ``weight``) with gradient ``grad``
        at time step ``t``: updates ``p``'s state and returns where to flip (a bool tensor)."""
        raise NotImplementedError

    @torch.no_grad()
    def step(self, t: int | None = None) -> torch.Tensor:
        """Apply the flip rule to every weight with a ``.grad``; returns each weight's flips."""
        t = self.check_time_step(t)
        counts = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    counts[id(p)] = self.flip_(p, self.flip_rule(p, p, p.grad, group, t))
        return self.flip_counts(counts)

    def check_time_step(self, t: int | None) -> int | None:
        return t

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
                group[complement_key(key)] = complement(group, key) * factor
                group[key] = 1.0 - (1.0 - group[key]) * factor

    def flip_counts(self, counts: dict[int, torch.Tensor]) -> torch.Tensor:
        """One count per binary weight, in order, from ``{id(weight): count}`` (0 where none)."""
        weights = self.binary_weights()
        zero = torch.zeros((), dtype=torch.long, device=weights[0].device if weights else None)
        return torch.stack([counts.get(id(p), zero).to(zero.device) for p in weights])


def complement_key(beta_key: str) -> str:
    """The param-group key of ``1 - beta`` as the release holds it (e.g. ``one_minus_beta1``)."""
    return f"one_minus_{beta_key}"


def complement(group: dict, beta_key: str) -> float:
    """``1 - beta`` of a param group, as held and decayed (a group saved without it: computed)."""
    return group.get(complement_key(beta_key), 1.0 - group[beta_key])


def float_order(group: dict) -> str:
    """The group's float order; a group saved without one (a checkpoint from before the choice
    existed) trained, and continues, in the "fast" order."""
    return group.get("float_order", "fast")


def flip_where_positive(value: torch.Tensor) -> torch.Tensor:
    """The release's flip test ``-sign(value) == -1``, i.e. ``value > 0``; a tie (exactly 0) does
    not flip (the release would write a 0 weight there, see the module docstring)."""
    return value > 0


def flip_where_above(value: torch.Tensor, gamma: float) -> torch.Tensor:
    """``flip_where_positive(value - gamma)`` in one pass: with IEEE gradual underflow the float32
    difference ``value - gamma`` is > 0 exactly where ``value > gamma`` (it is 0 only where they
    are equal, and rounds with the sign of the exact difference; inf and NaN alike), so the flips
    are the same bit for bit."""
    return value > gamma


class BSO(BinaryOptimizer):
    """Binary Spiking Online optimizer (paper Eq. 11-12).

        M <- beta * M + (1 - beta) * G          (M starts at 0)
        W <- -W  where  W * M > gamma

    ``reset_momentum=True`` (released code) sets M to 0 where a weight flipped. ``float_order``:
    see the module docstring.
    """

    beta_keys = ("beta",)

    def __init__(
        self,
        params,
        gamma: float = 5e-7,
        beta: float = 1 - 1e-3,
        reset_momentum=True,
        float_order: str = "release",
    ):
        defaults = dict(
            gamma=gamma, beta=beta, reset_momentum=reset_momentum, float_order=float_order
        )
        super().__init__(params, defaults)

    def flip_rule(self, p, weight, grad, group, t=None):
        """Eq. 11-12; ``t`` is accepted for API symmetry with T-BSO and unused."""
        m = self.momentum(p)
        if float_order(group) == "release":
            self.release_momentum_(m, grad, complement(group, "beta"))
            flip = flip_where_above(weight * m, group["gamma"])
        else:
            self.update_momentum_(m, grad, group["beta"])
            flip = weight * m > group["gamma"]
        if group["reset_momentum"]:
            m.masked_fill_(flip, 0.0)
        return flip


class TBSO(BinaryOptimizer):
    """Temporal-aware BSO (paper Eq. 13-14, Algorithm 1).

        M      <- beta1 * M + (1 - beta1) * G[t]                 one tensor per weight, shared over t
        v_l[t] <- beta2 * v_l[t] + (1 - beta2) * mean(G[t]^2)    one scalar per layer and time step
        W <- -W  where  W * M > gamma * (sqrt(v_l[t]) + eps)     threshold="code" (released code)
                        W * M > gamma * sqrt(v_l[t] + eps)       threshold="paper"

    ``num_steps`` is T: the number of second-moment slots per layer. ``step(t)`` updates slot ``t``
    (0-based); ``step()`` uses slot 0 (for one update per batch). No bias correction; the momentum is
    not reset after a flip unless ``reset_momentum=True``. ``float_order``: see the module docstring
    (with ``threshold="paper"`` the release order tests ``(W * M) / sqrt(v_l[t] + eps) - gamma > 0``).
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
        float_order: str = "release",
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
            float_order=float_order,
        )
        super().__init__(params, defaults)

    def second_moment(self, p: torch.Tensor) -> torch.Tensor:
        """v_l[0..T-1] of the layer whose weight is ``p`` (T scalars)."""
        state = self.state[p]
        if "v" not in state:
            state["v"] = torch.zeros(self.num_steps, dtype=p.dtype, device=p.device)
        return state["v"]

    def check_time_step(self, t: int | None) -> int:
        """``None`` -> slot 0 (one update per batch); otherwise 0 <= t < T."""
        t = 0 if t is None else int(t)
        if not 0 <= t < self.num_steps:
            raise IndexError(f"T-BSO was built for T={self.num_steps} time steps; got t={t}")
        return t

    def flip_rule(self, p, weight, grad, group, t):
        """Eq. 13-14 at time step ``t``."""
        m, v = self.momentum(p), self.second_moment(p)
        if float_order(group) == "release":
            b1, b2 = complement(group, "beta1"), complement(group, "beta2")
            self.release_momentum_(m, grad, b1)
            squared = grad * grad
            v[t] = (1 - b2) * v[t] + squared.mul_(b2).mean()  # b2 * G^2, in place (same values)
            del squared
            if group["threshold"] == "code":
                denominator = v[t].sqrt() + group["eps"]
            else:
                denominator = (v[t] + group["eps"]).sqrt()
            # (W * M) / denominator - gamma > 0, in fewer passes (same values: in place, and
            # flip_where_above)
            flip = flip_where_above(torch.mul(weight, m).div_(denominator), group["gamma"])
        else:
            self.update_momentum_(m, grad, group["beta1"])
            beta2 = group["beta2"]
            v[t] = beta2 * v[t] + (1.0 - beta2) * grad.square().mean()  # mean(G^2)
            if group["threshold"] == "code":
                threshold = group["gamma"] * (v[t].sqrt() + group["eps"])
            else:
                threshold = group["gamma"] * (v[t] + group["eps"]).sqrt()
            flip = weight * m > threshold
        if group["reset_momentum"]:
            m.masked_fill_(flip, 0.0)
        return flip
