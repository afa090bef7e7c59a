"""Binary optimizers without latent weights: BSO and T-BSO (paper Eq. 11-14).

Both keep the binary weights exactly -1/+1 and change them only by flipping signs, in place, under
``no_grad``. ``step`` returns how many weights flipped, one count per parameter (a tensor, so that
no device synchronisation happens inside the training loop).

One method, :meth:`BinaryOptimizer.flip_rule`, is the per-tensor update (momentum, T-BSO's v_l[t],
the flip mask). ``step`` applies it to every weight that has a ``.grad``.

Floating-point order (``backend``, :mod:`bso.backend`, docs/parity.md). On the full VGG-11 a
float32 product rounded in another order moves a value by an ulp, a weight that sits at its
threshold flips on one side only, and two runs part within a few steps. Under ``"release"`` (the
default) and ``"fused"`` (which compiles no optimizer code) the optimizer computes what the released
code computes, in its order, so that a run is bit for bit the release's (:class:`ReleaseOrder`):

* it holds ``b = 1 - beta`` (Python float64) and decays ``b *= factor`` (the ``beta`` keys follow);
* ``M = (1 - b1) * M + b1 * G``: two float32 products, then the sum (no fused multiply-add);
* T-BSO: ``v[t] = (1 - b2) * v[t] + mean(b2 * (G * G))``; flip where
  ``(W * M) / (sqrt(v[t]) + eps) - gamma > 0``;  BSO: flip where ``W * M - gamma > 0``.

A tie (the tested value exactly 0) does not flip. The release computes ``r = -sign(value)`` and
``W = sign(r * W)``, so a tie writes a 0 weight (neither -1 nor +1) and BSO halves that momentum: a
defect not copied here. ``"fast"`` is the algebraically equal form with fewer passes over memory
(:class:`FastOrder`: ``M.mul_(beta).add_(G, alpha=1 - beta)``, ``W * M > gamma * (sqrt(v[t]) +
eps)``): the same method, other roundings.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.optim import Optimizer

from bso import backend as backends
from bso.bits import PackedSigns


class BinaryOptimizer(Optimizer):
    """Shared machinery: the +-1 check, in-place sign flips and the hyper-parameter schedule."""

    beta_keys: tuple[str, ...] = ()

    def __init__(self, params: Iterable, defaults: dict):
        if defaults["gamma"] < 0:
            raise ValueError(f"flip threshold gamma must be >= 0, got {defaults['gamma']}")
        backends.check(defaults["backend"])
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

    def begin_time_step(self, t: int | None) -> None:
        """Before the backward of time step ``t``: nothing here (the flips happen in ``step(t)``);
        the lean mode's in-backward optimizers (:mod:`bso.lean.optim`) take ``t`` for the flips
        they make inside that backward."""

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
    """``1 - beta`` of a param group, as held and decayed."""
    return group[complement_key(beta_key)]


def flip_where_above(value: torch.Tensor, gamma: float) -> torch.Tensor:
    """The release's flip test ``-sign(value - gamma) == -1`` in one pass: with IEEE gradual
    underflow the float32 difference ``value - gamma`` is > 0 exactly where ``value > gamma`` (it
    is 0 only where they are equal, and rounds with the sign of the exact difference; inf and NaN
    alike), so the flips are the same bit for bit. A tie (exactly 0) does not flip (the release
    would write a 0 weight there, see the module docstring)."""
    return value > gamma


class ReleaseOrder:
    """BSO / T-BSO's arithmetic in the released code's float32 order (backends release and fused;
    see the module docstring)."""

    @staticmethod
    def momentum_(momentum: torch.Tensor, grad: torch.Tensor, group: dict, key: str) -> None:
        """M <- (1 - b) * M + b * G with b = 1 - beta (``group``'s ``key``): each product in
        float32, then their sum."""
        b = complement(group, key)
        momentum.mul_(1 - b).add_(b * grad)

    @staticmethod
    def second_moment(v: torch.Tensor, grad: torch.Tensor, group: dict) -> torch.Tensor:
        """T-BSO's new v_l[t] = (1 - b2) * v_l[t] + mean(b2 * (G * G))."""
        b2 = complement(group, "beta2")
        return (1 - b2) * v + (grad * grad).mul_(b2).mean()  # b2 * G^2 in place: same values

    @staticmethod
    def bso_flip(weight: torch.Tensor, momentum: torch.Tensor, group: dict) -> torch.Tensor:
        """Where W * M - gamma > 0."""
        return flip_where_above(weight * momentum, group["gamma"])

    @staticmethod
    def tbso_flip(weight, momentum, v: torch.Tensor, group: dict) -> torch.Tensor:
        """Where (W * M) / (sqrt(v_l[t]) + eps) - gamma > 0 (threshold "code"), or
        (W * M) / sqrt(v_l[t] + eps) - gamma > 0 (threshold "paper")."""
        denominator = tbso_denominator(v, group)
        # in fewer passes (same values: in place, and flip_where_above)
        return flip_where_above(torch.mul(weight, momentum).div_(denominator), group["gamma"])


class FastOrder:
    """BSO / T-BSO's arithmetic in fewer passes over memory (backend fast): the same method,
    other roundings."""

    @staticmethod
    def momentum_(momentum: torch.Tensor, grad: torch.Tensor, group: dict, key: str) -> None:
        """M <- beta * M + (1 - beta) * G."""
        momentum.mul_(group[key]).add_(grad, alpha=1.0 - group[key])

    @staticmethod
    def second_moment(v: torch.Tensor, grad: torch.Tensor, group: dict) -> torch.Tensor:
        """T-BSO's new v_l[t] = beta2 * v_l[t] + (1 - beta2) * mean(G^2)."""
        return group["beta2"] * v + (1.0 - group["beta2"]) * grad.square().mean()

    @staticmethod
    def bso_flip(weight: torch.Tensor, momentum: torch.Tensor, group: dict) -> torch.Tensor:
        """Where W * M > gamma."""
        return weight * momentum > group["gamma"]

    @staticmethod
    def tbso_flip(weight, momentum, v: torch.Tensor, group: dict) -> torch.Tensor:
        """Where W * M > gamma * (sqrt(v_l[t]) + eps) (threshold "code"), or
        W * M > gamma * sqrt(v_l[t] + eps) (threshold "paper")."""
        return weight * momentum > group["gamma"] * tbso_denominator(v, group)


def tbso_denominator(v: torch.Tensor, group: dict) -> torch.Tensor:
    """sqrt(v_l[t]) + eps (threshold "code", the released code) or sqrt(v_l[t] + eps) ("paper")."""
    if group["threshold"] == "code":
        return v.sqrt() + group["eps"]
    return (v + group["eps"]).sqrt()


class BSO(BinaryOptimizer):
    """Binary Spiking Online optimizer (paper Eq. 11-12).

        M <- beta * M + (1 - beta) * G          (M starts at 0)
        W <- -W  where  W * M > gamma

    ``reset_momentum=True`` (released code) sets M to 0 where a weight flipped. ``backend``:
    see the module docstring.
    """

    beta_keys = ("beta",)

    def __init__(
        self,
        params,
        gamma: float = 5e-7,
        beta: float = 1 - 1e-3,
        reset_momentum=True,
        backend: str = backends.DEFAULT,
    ):
        defaults = dict(gamma=gamma, beta=beta, reset_momentum=reset_momentum, backend=backend)
        super().__init__(params, defaults)

    def flip_rule(self, p, weight, grad, group, t=None):
        """Eq. 11-12; ``t`` is accepted for API symmetry with T-BSO and unused."""
        m = self.momentum(p)
        arithmetic = backends.optimizer_arithmetic(group["backend"])
        arithmetic.momentum_(m, grad, group, "beta")
        flip = arithmetic.bso_flip(weight, m, group)
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
    not reset after a flip unless ``reset_momentum=True``. ``backend``: see the module docstring
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
        backend: str = backends.DEFAULT,
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
            backend=backend,
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
        arithmetic = backends.optimizer_arithmetic(group["backend"])
        arithmetic.momentum_(m, grad, group, "beta1")
        v[t] = arithmetic.second_moment(v[t], grad, group)
        flip = arithmetic.tbso_flip(weight, m, v[t], group)
        if group["reset_momentum"]:
            m.masked_fill_(flip, 0.0)
        return flip
