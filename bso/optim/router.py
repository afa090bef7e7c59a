"""Route binary weights to a binary optimizer and every other parameter to an ordinary one
(in the spirit of larq's CaseOptimizer)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.optim import Optimizer

from bso.layers import named_binary_parameters
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
            f"{name} flips binary weights, but {type(model).__name__} has none. Use a model with "
            "model.weights=binary (BSO/T-BSO cannot train a full-precision model)."
        )
    binary_ids = {id(p) for _, p in named}
    rest = [p for p in model.parameters() if id(p) not in binary_ids and p.requires_grad]
    other_opt = other(rest) if (other is not None and rest) else None
    return OptimizerRouter(binary([p for _, p in named]), other_opt, [n for n, _ in named])
