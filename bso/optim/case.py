"""The router of the library API: binary weights to BSO / T-BSO, every other parameter to an
ordinary optimizer -- larq's ``CaseOptimizer`` for PyTorch models."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn
from torch.optim import Optimizer

from bso.layers import named_binary_parameters
from bso.optim.binary import BinaryOptimizer
from bso.optim.router import OptimizerRouter, build_router


class CaseOptimizer(OptimizerRouter):
    """Split ``model``'s parameters: its stored +-1 weights go to ``binary(params)`` (BSO / T-BSO),
    every other trainable parameter to ``full_precision(params)`` (SGD, Adam, ...).

    ``binary`` and ``full_precision`` build an optimizer from a parameter list, e.g.
    ``functools.partial(bso.TBSO, num_steps=T)`` (or the class, ``bso.BSO``) and
    ``lambda p: torch.optim.Adam(p, lr=1e-3)``. ``full_precision`` may be None only when every other
    parameter is frozen. On a lean model (:func:`bso.make_lean`) the binary optimizer is built as the
    in-backward class of ``binary``'s (a class or a ``functools.partial`` of one), which flips the
    packed weights inside backward.

    ``zero_grad()`` and ``step(t=None)`` act on both; ``step`` returns the number of flips of each
    binary weight (named by ``binary_names``). ``state_dict()`` / ``load_state_dict()`` hold both.
    """

    def __init__(
        self,
        model: nn.Module,
        binary: Callable[[list[nn.Parameter]], BinaryOptimizer],
        full_precision: Callable[[list[nn.Parameter]], Optimizer] | None = None,
    ):
        named = named_binary_parameters(model)
        if not named:
            raise ValueError(
                f"{type(model).__name__} has no stored +-1 weights for BSO / T-BSO to flip: make it "
                "binary with bso.convert(model) first"
            )
        binary_ids = {id(p) for _, p in named}
        rest = [
            n for n, p in model.named_parameters() if id(p) not in binary_ids and p.requires_grad
        ]
        if rest and full_precision is None:
            raise ValueError(
                f"{type(model).__name__} has {len(rest)} full-precision parameters ({rest[0]!r}, "
                "...) that BSO / T-BSO cannot train: give full_precision=, e.g. "
                "full_precision=lambda p: torch.optim.Adam(p, lr=1e-3)"
            )
        router = build_router(model, binary, full_precision, name="bso.CaseOptimizer")
        super().__init__(router.binary, router.full_precision, router.binary_names)

    def __repr__(self) -> str:
        fp = "None" if self.full_precision is None else type(self.full_precision).__name__
        return (
            f"CaseOptimizer(binary={type(self.binary).__name__} over {len(self.binary_names)} "
            f"+-1 weights, full_precision={fp})"
        )
