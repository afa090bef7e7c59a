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
    every other trainable parameter to ``default(params)`` (SGD, Adam, ...).

    ``binary`` and ``default`` build an optimizer from a parameter list, e.g.
    ``lambda p: bso.TBSO(p, num_steps=T)`` and ``lambda p: torch.optim.Adam(p, lr=1e-3)`` (or a
    ``functools.partial``). ``default`` may be None only when every other parameter is frozen.
    Packed layers of a lean model (:func:`bso.make_lean`) are bound to the binary optimizer, which
    flips them inside backward.

    ``zero_grad()`` and ``step(t=None)`` act on both; ``step`` returns the number of flips of each
    binary weight (named by ``binary_names``). ``state_dict()`` / ``load_state_dict()`` hold both.
    """

    def __init__(
        self,
        model: nn.Module,
        binary: Callable[[list[nn.Parameter]], BinaryOptimizer],
        default: Callable[[list[nn.Parameter]], Optimizer] | None = None,
    ):
        named = named_binary_parameters(model)
        if not named:
            raise ValueError(
                f"{type(model).__name__} has no stored +-1 weights for BSO / T-BSO to flip: make it "
                "binary with bso.convert(model) before building the optimizer"
            )
        binary_ids = {id(p) for _, p in named}
        rest = [
            n for n, p in model.named_parameters() if id(p) not in binary_ids and p.requires_grad
        ]
        if rest and default is None:
            raise ValueError(
                f"{type(model).__name__} has {len(rest)} full-precision parameters ({rest[0]!r}, "
                "...) that BSO / T-BSO cannot train: give default=, e.g. "
                "default=lambda p: torch.optim.Adam(p, lr=1e-3)"
            )

        def checked(params):
            opt = binary(params)
            if not isinstance(opt, BinaryOptimizer):
                raise TypeError(
                    f"binary= must build bso.BSO or bso.TBSO from the +-1 weights, got "
                    f"{type(opt).__name__}"
                )
            return opt

        router = build_router(model, checked, default, name="bso.CaseOptimizer")
        super().__init__(router.binary, router.other, router.binary_names)

    def __repr__(self) -> str:
        other = "None" if self.other is None else type(self.other).__name__
        return (
            f"CaseOptimizer(binary={type(self.binary).__name__} over {len(self.binary_names)} "
            f"+-1 weights, default={other})"
        )
