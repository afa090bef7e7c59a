"""The optimizer objects the engines step.

* :class:`OptimizerRouter`: binary weights to a binary optimizer (BSO / T-BSO), every other parameter
  to an ordinary one (in the spirit of larq's CaseOptimizer).
* :class:`PlainOptimizer`: one ordinary optimizer (SGD, Adam) for every parameter of a latent-weight or
  full-precision model; counts the sign flips of the latent weights.

Both expose ``zero_grad()``, ``begin_time_step(t)``, ``step(t) -> flips per binary weight``,
``binary_names``, ``state_dict()`` / ``load_state_dict()``, ``binary`` (the flip optimizer or None)
and ``full_precision`` (the ordinary optimizer or None).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.optim import Optimizer

from bso.layers import binary_numel, named_binary_parameters
from bso.optim.binary import BinaryOptimizer

# the one setup order, for the errors that find it broken
BUILD_ORDER = (
    "Build the optimizer on the model as it is trained: bso.CaseOptimizer after bso.convert and "
    "bso.make_lean; bso.optim.build_optimizer after engine.prepare (which applies engine.lean)."
)


class OptimizerRouter:
    """Steps a binary optimizer (BSO / T-BSO) and an ordinary optimizer together.

    ``binary_names[i]`` names the i-th binary weight; ``step(t)`` returns the flip count of each.
    """

    def __init__(
        self, binary: BinaryOptimizer, full_precision: Optimizer | None, binary_names: list[str]
    ):
        binary_params = binary.binary_weights()
        if not binary_params:
            raise ValueError("the binary optimizer was given no parameters")
        if len(binary_names) != len(binary_params):
            raise ValueError("binary_names must name each binary weight once")
        claimed = {id(p) for p in binary_params}
        if len(claimed) != len(binary_params):
            raise ValueError("a parameter is claimed twice by the binary optimizer")
        if full_precision is not None:
            for group in full_precision.param_groups:
                for p in group["params"]:
                    if id(p) in claimed:
                        raise ValueError(
                            "a parameter is claimed by both the binary and the full-precision "
                            "optimizer"
                        )
        self.binary = binary
        self.full_precision = full_precision
        self.binary_names = list(binary_names)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.binary.zero_grad(set_to_none=set_to_none)
        if self.full_precision is not None:
            self.full_precision.zero_grad(set_to_none=set_to_none)

    def begin_time_step(self, t: int | None) -> None:
        """Before the backward of time step ``t``: a binary optimizer that flips inside backward
        (the lean mode, :mod:`bso.lean.optim`) takes ``t`` there; the plain one in ``step(t)``."""
        self.binary.begin_time_step(t)

    def step(self, t: int | None = None) -> torch.Tensor:
        """Update every parameter; returns the number of flips of each binary weight."""
        if self.full_precision is not None:
            self.full_precision.step()
        return self.binary.step(t)

    def check_model(self, model: nn.Module) -> None:
        """Refuse a model whose +-1 weights are not this optimizer's: built for another model, or
        before the model's weights were replaced (the lean mode packs them)."""
        if {id(p) for _, p in named_binary_parameters(model)} != {
            id(p) for p in self.binary.binary_weights()
        }:
            raise ValueError(
                "the optimizer's binary weights are not this model's +-1 weights: it was built for "
                "another model, or before the lean mode replaced them by packed bits. "
                + BUILD_ORDER
            )

    def state_dict(self) -> dict:
        return {
            "binary": self.binary.state_dict(),
            "full_precision": (
                None if self.full_precision is None else self.full_precision.state_dict()
            ),
        }

    def load_state_dict(self, state: dict) -> None:
        self.binary.load_state_dict(state["binary"])
        if self.full_precision is not None:
            self.full_precision.load_state_dict(state["full_precision"])

    @property
    def gamma(self) -> float:
        return self.binary.param_groups[0]["gamma"]

    def flip_numel(self) -> torch.Tensor:
        return torch.tensor([binary_numel(p) for p in self.binary.binary_weights()])

    @property
    def lr(self) -> float | None:
        fp = self.full_precision
        return None if fp is None else fp.param_groups[0]["lr"]


def build_router(
    model: nn.Module,
    binary: Callable[..., BinaryOptimizer],
    full_precision: Callable[..., Optimizer] | None,
    name: str = "the binary optimizer",
) -> OptimizerRouter:
    """Split ``model``'s parameters: binary weights -> ``binary(params)``, the rest ->
    ``full_precision(params)``.

    ``binary`` and ``full_precision`` are optimizer constructors missing only their parameters
    (Hydra ``_partial_: true`` configs). A lean model's (:mod:`bso.lean`) binary optimizer is built as
    the in-backward class of ``binary``'s and bound to the packed layers, which it flips inside
    backward."""
    named = named_binary_parameters(model)
    if not named:
        raise ValueError(
            f"{name} flips stored +-1 weights, but {type(model).__name__} has none (its weights are "
            "latent or full precision). Use model.weights=binary with BSO/T-BSO, or a plain "
            "optimizer (optimizer=sgd|adam) for latent or full-precision weights."
        )
    binary_ids = {id(p) for _, p in named}
    rest = [p for p in model.parameters() if id(p) not in binary_ids and p.requires_grad]
    fp_opt = full_precision(rest) if (full_precision is not None and rest) else None
    packed = [m for m in model.modules() if getattr(m, "is_packed", False)]
    if packed:  # the lean mode: imported only for a lean model (the core does not import it)
        from bso.lean.optim import in_backward_constructor

        binary = in_backward_constructor(binary)
    binary_opt = binary([p for _, p in named])
    if not isinstance(binary_opt, BinaryOptimizer):
        raise TypeError(
            f"{name}: binary= must build bso.BSO or bso.TBSO from the +-1 weights, got "
            f"{type(binary_opt).__name__}"
        )
    router = OptimizerRouter(binary_opt, fp_opt, [n for n, _ in named])
    for module in packed:  # layers whose weights it flips inside backward
        module.bind_binary_optimizer(binary_opt)
    return router


class PlainOptimizer:
    """One ordinary optimizer for all parameters (latent-weight or full-precision models).

    ``step()`` returns how many latent weights changed sign, per layer (the sign-flip ratio that AGMM
    studies); ``clip_latent=True`` clips latent weights to [-1, 1] after each step.
    """

    binary = None

    def __init__(
        self, optimizer: Optimizer, latent: list[tuple[str, torch.Tensor]], clip_latent=False
    ):
        self.full_precision = optimizer
        self.latent = [w for _, w in latent]
        self.binary_names = [n for n, _ in latent]
        self.clip_latent = clip_latent

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.full_precision.zero_grad(set_to_none=set_to_none)

    def begin_time_step(self, t: int | None) -> None:
        """Nothing happens inside backward: every update is in ``step``."""

    @torch.no_grad()
    def step(self, t: int | None = None) -> torch.Tensor:
        before = [w >= 0 for w in self.latent]
        self.full_precision.step()
        if self.clip_latent:
            for w in self.latent:
                w.clamp_(-1.0, 1.0)
        if not self.latent:
            return torch.zeros(0, dtype=torch.long)
        return torch.stack(
            [((w >= 0) != b).sum() for w, b in zip(self.latent, before, strict=True)]
        )

    def state_dict(self) -> dict:
        return {"binary": None, "full_precision": self.full_precision.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.full_precision.load_state_dict(state["full_precision"])

    @property
    def gamma(self) -> None:
        return None

    @property
    def lr(self) -> float:
        return self.full_precision.param_groups[0]["lr"]

    def flip_numel(self) -> torch.Tensor:
        return torch.tensor([w.numel() for w in self.latent], dtype=torch.long)


def build_optimizer(
    model: nn.Module, cfg, backend: str = "release"
) -> OptimizerRouter | PlainOptimizer:
    """From an ``optimizer`` config: ``binary`` (a flip optimizer, built with ``backend``, or null)
    and ``full_precision`` (the optimizer of every other parameter)."""
    from hydra.utils import instantiate

    full = cfg.get("full_precision")
    full_precision = instantiate(full) if full is not None else None
    if cfg.get("binary") is not None:
        if "backend" in cfg.binary:
            raise ValueError(
                "optimizer.binary.backend: the backend is one choice for the whole run, the "
                "top-level key backend=release|fast|fused (configs/train.yaml)"
            )
        binary = instantiate(cfg.binary, backend=backend)
        return build_router(model, binary, full_precision, name=f"optimizer={cfg.name}")
    if named_binary_parameters(model, "binary"):
        raise ValueError(
            f"optimizer={cfg.name} would take gradient steps on stored +-1 weights and break them. "
            "Use optimizer=bso|tbso for model.weights=binary, or model.weights=latent|full."
        )
    if full_precision is None:
        raise ValueError(f"optimizer={cfg.name} defines neither `binary` nor `full_precision`")
    params = [p for p in model.parameters() if p.requires_grad]
    latent = named_binary_parameters(model, "latent")
    return PlainOptimizer(full_precision(params), latent, clip_latent=cfg.get("clip_latent", False))
