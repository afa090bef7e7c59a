"""The optimizer objects the engines step.

* :class:`OptimizerRouter`: binary weights to a binary optimizer (BSO / T-BSO), every other parameter
  to an ordinary one (in the spirit of larq's CaseOptimizer).
* :class:`PlainOptimizer`: one ordinary optimizer (SGD, Adam) for every parameter of a latent-weight or
  full-precision model; counts the sign flips of the latent weights.

Both expose ``zero_grad()``, ``step(t) -> flips per binary weight``, ``binary_names``,
``state_dict()`` / ``load_state_dict()``, ``binary`` (the flip optimizer or None) and ``other``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.optim import Optimizer

from bso.layers import binary_numel, named_binary_parameters
from bso.optim.binary import BinaryOptimizer


class OptimizerRouter:
    """Steps a binary optimizer (BSO / T-BSO) and an ordinary optimizer together.

    ``binary_names[i]`` names the i-th binary weight; ``step(t)`` returns the flip count of each.
    """

    def __init__(self, binary: BinaryOptimizer, other: Optimizer | None, binary_names: list[str]):
        binary_params = binary.binary_weights()
        if not binary_params:
            raise ValueError("the binary optimizer was given no parameters")
        if len(binary_names) != len(binary_params):
            raise ValueError("binary_names must name each binary weight once")
        claimed = {id(p) for p in binary_params}
        if len(claimed) != len(binary_params):
            raise ValueError("a parameter is claimed twice by the binary optimizer")
        if other is not None:
            for group in other.param_groups:
                for p in group["params"]:
                    if id(p) in claimed:
                        raise ValueError(
                            "a parameter is claimed by both the binary and the other optimizer"
                        )
        self.binary = binary
        self.other = other
        self.binary_names = list(binary_names)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.binary.zero_grad(set_to_none=set_to_none)
        if self.other is not None:
            self.other.zero_grad(set_to_none=set_to_none)

    def step(self, t: int | None = None) -> torch.Tensor:
        """Update every parameter; returns the number of flips of each binary weight."""
        if self.other is not None:
            self.other.step()
        return self.binary.step(t)

    def state_dict(self) -> dict:
        return {
            "binary": self.binary.state_dict(),
            "other": None if self.other is None else self.other.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.binary.load_state_dict(state["binary"])
        if self.other is not None:
            self.other.load_state_dict(state["other"])

    @property
    def gamma(self) -> float:
        return self.binary.param_groups[0]["gamma"]

    def flip_numel(self) -> torch.Tensor:
        return torch.tensor([binary_numel(p) for p in self.binary.binary_weights()])

    @property
    def lr(self) -> float | None:
        return None if self.other is None else self.other.param_groups[0]["lr"]


def build_router(
    model: nn.Module,
    binary: Callable[..., BinaryOptimizer],
    other: Callable[..., Optimizer] | None,
    name: str = "the binary optimizer",
) -> OptimizerRouter:
    """Split ``model``'s parameters: binary weights -> ``binary(params)``, the rest -> ``other(params)``.

    ``binary`` and ``other`` are optimizer constructors missing only their parameters (Hydra
    ``_partial_: true`` configs)."""
    named = named_binary_parameters(model)
    if not named:
        raise ValueError(
            f"{name} flips stored +-1 weights, but {type(model).__name__} has none (its weights are "
            "latent or full precision). Use model.weights=binary with BSO/T-BSO, or a plain "
            "optimizer (optimizer=sgd|adam) for latent or full-precision weights."
        )
    binary_ids = {id(p) for _, p in named}
    rest = [p for p in model.parameters() if id(p) not in binary_ids and p.requires_grad]
    other_opt = other(rest) if (other is not None and rest) else None
    binary_opt = binary([p for _, p in named])
    for module in model.modules():  # layers whose weights it flips inside backward (bso.lean)
        if hasattr(module, "bind_binary_optimizer"):
            module.bind_binary_optimizer(binary_opt)
    return OptimizerRouter(binary_opt, other_opt, [n for n, _ in named])


class PlainOptimizer:
    """One ordinary optimizer for all parameters (latent-weight or full-precision models).

    ``step()`` returns how many latent weights changed sign, per layer (the sign-flip ratio that AGMM
    studies); ``clip_latent=True`` clips latent weights to [-1, 1] after each step.
    """

    binary = None

    def __init__(
        self, optimizer: Optimizer, latent: list[tuple[str, torch.Tensor]], clip_latent=False
    ):
        self.other = optimizer
        self.latent = [w for _, w in latent]
        self.binary_names = [n for n, _ in latent]
        self.clip_latent = clip_latent

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.other.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, t: int | None = None) -> torch.Tensor:
        before = [w >= 0 for w in self.latent]
        self.other.step()
        if self.clip_latent:
            for w in self.latent:
                w.clamp_(-1.0, 1.0)
        if not self.latent:
            return torch.zeros(0, dtype=torch.long)
        return torch.stack(
            [((w >= 0) != b).sum() for w, b in zip(self.latent, before, strict=True)]
        )

    def state_dict(self) -> dict:
        return {"binary": None, "other": self.other.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.other.load_state_dict(state["other"])

    @property
    def gamma(self) -> None:
        return None

    @property
    def lr(self) -> float:
        return self.other.param_groups[0]["lr"]

    def flip_numel(self) -> torch.Tensor:
        return torch.tensor([w.numel() for w in self.latent], dtype=torch.long)


def build_optimizer(
    model: nn.Module, cfg, backend: str = "release"
) -> OptimizerRouter | PlainOptimizer:
    """From an ``optimizer`` config: ``binary`` (a flip optimizer, built with ``backend``, or null)
    and ``full_precision`` (the optimizer of every other parameter)."""
    from hydra.utils import instantiate

    full = cfg.get("full_precision")
    other = instantiate(full) if full is not None else None
    if cfg.get("binary") is not None:
        if "backend" in cfg.binary:
            raise ValueError(
                "optimizer.binary.backend: the backend is one choice for the whole run, the "
                "top-level key backend=release|fast|fused (configs/train.yaml)"
            )
        binary = instantiate(cfg.binary, backend=backend)
        return build_router(model, binary, other, name=f"optimizer={cfg.name}")
    if named_binary_parameters(model, "binary"):
        raise ValueError(
            f"optimizer={cfg.name} would take gradient steps on stored +-1 weights and break them. "
            "Use optimizer=bso|tbso for model.weights=binary, or model.weights=latent|full."
        )
    if other is None:
        raise ValueError(f"optimizer={cfg.name} defines neither `binary` nor `full_precision`")
    params = [p for p in model.parameters() if p.requires_grad]
    latent = named_binary_parameters(model, "latent")
    return PlainOptimizer(other(params), latent, clip_latent=cfg.get("clip_latent", False))
