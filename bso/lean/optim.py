"""BSO / T-BSO flipping packed +-1 weights inside backward: the lean mode's update.

When :func:`bso.optim.build_router` builds the binary optimizer of a model with packed layers
(:mod:`bso.lean.layers`), it builds the in-backward class of the one asked for
(:func:`in_backward_constructor`: :class:`LeanBSO` for :class:`bso.optim.BSO`, :class:`LeanTBSO`
for :class:`bso.optim.TBSO`) and binds each packed layer to it. From then on, a packed layer's
backward calls :meth:`InBackwardFlips.update_in_backward` with its gradient ``G[t]``: the very flip
rule of :class:`bso.optim.BSO` / :class:`bso.optim.TBSO`
(:meth:`~bso.optim.binary.BinaryOptimizer.flip_rule`) runs on it, the bits flip in place (XOR) and
the gradient is freed. ``step(t)`` then counts those flips with any others. The time step tells the
optimizer ``t`` first (:meth:`InBackwardFlips.begin_time_step`: T-BSO's v_l[t]).

Under torchrun the packed weights are not DDP's parameters (they need no gradient), so DDP's reducer
never sees their gradient: it is averaged over the ranks here
(:func:`bso.distributed.average_over_ranks_`), and every rank flips the same weights.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from bso.bits import PackedSigns, pack_bits
from bso.distributed import average_over_ranks_
from bso.optim.binary import BSO, TBSO, BinaryOptimizer
from bso.optim.router import BUILD_ORDER


class InBackwardFlips:
    """What a binary optimizer adds to flip packed weights inside backward (mixed into BSO / T-BSO)."""

    time_step: int | None  # t of the next backward (begin_time_step)
    packed_layers: list  # weak references to the layers bound to this optimizer
    transient_gradient_peak_bytes: int  # the largest gradient held at once (bso.metrics.memory)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.time_step = None
        self.packed_layers = []
        self.transient_gradient_peak_bytes = 0
        self._flips_in_backward: dict[int, torch.Tensor] = {}

    def momentum(self, p: torch.Tensor) -> torch.Tensor:
        """M of a packed weight: float32 of the +-1 values' shape, as for a float weight."""
        if isinstance(p, PackedSigns) and "momentum" not in self.state[p]:
            self.state[p]["momentum"] = torch.zeros(p.binary_shape, device=p.device)
        return super().momentum(p)

    def second_moment(self, p: torch.Tensor) -> torch.Tensor:
        """T-BSO's v_l[0..T-1] of a packed weight: float32."""
        if isinstance(p, PackedSigns) and "v" not in self.state[p]:
            self.state[p]["v"] = torch.zeros(self.num_steps, dtype=torch.float32, device=p.device)
        return super().second_moment(p)

    def begin_time_step(self, t: int | None) -> None:
        """The time step of the next backward, whose flips T-BSO takes v_l[t] for. Refuses to go on
        when a layer this optimizer was bound to has been bound to another one since."""
        for ref in self.packed_layers:
            layer = ref()
            if layer is not None and layer.bound_optimizer() is not self:
                raise ValueError(
                    f"{layer.lean_name} holds packed +-1 weights (lean mode) that its BSO / T-BSO "
                    "flips inside backward, but this optimizer is not bound to it (another one was "
                    f"built for the model since). {BUILD_ORDER}"
                )
        self.time_step = self.check_time_step(t)

    @torch.no_grad()
    def update_in_backward(self, bits: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor):
        """The flip rule for a packed weight (its +-1 values ``weight``), called from its layer's
        backward as soon as ``grad`` exists; flips ``bits`` in place and records the count for the
        next ``step``."""
        average_over_ranks_(grad)  # torchrun: DDP's reducer does not see this gradient
        group = self._group_of(bits)
        flip = self.flip_rule(bits, weight, grad, group, self.check_time_step(self.time_step))
        bits.bitwise_xor_(pack_bits(flip))  # W <- -W where flip
        count = flip.sum()
        previous = self._flips_in_backward.get(id(bits))
        self._flips_in_backward[id(bits)] = count if previous is None else previous + count
        self.transient_gradient_peak_bytes = max(
            self.transient_gradient_peak_bytes, grad.numel() * grad.element_size()
        )

    def flip_counts(self, counts: dict[int, torch.Tensor]) -> torch.Tensor:
        """``step``'s counts, with the flips made inside backward since the last ``step``."""
        counts.update(self._flips_in_backward)
        self._flips_in_backward = {}
        return super().flip_counts(counts)

    def _group_of(self, p: torch.Tensor) -> dict:
        for group in self.param_groups:
            if any(q is p for q in group["params"]):
                return group
        raise KeyError("this weight is not one of the optimizer's parameters")


class LeanBSO(InBackwardFlips, BSO):
    """:class:`bso.optim.BSO` flipping packed weights inside backward."""


class LeanTBSO(InBackwardFlips, TBSO):
    """:class:`bso.optim.TBSO` flipping packed weights inside backward."""


IN_BACKWARD_CLASSES: dict[type, type] = {BSO: LeanBSO, TBSO: LeanTBSO}


def in_backward_class(cls: type) -> type:
    """The in-backward class of a BSO / T-BSO class: :data:`IN_BACKWARD_CLASSES`; for a subclass of
    BSO / T-BSO, a subclass of it and :class:`InBackwardFlips` (made once)."""
    if issubclass(cls, InBackwardFlips):
        return cls
    if cls not in IN_BACKWARD_CLASSES:
        IN_BACKWARD_CLASSES[cls] = type(f"Lean{cls.__name__}", (InBackwardFlips, cls), {})
    return IN_BACKWARD_CLASSES[cls]


def in_backward_constructor(
    binary: Callable[..., BinaryOptimizer],
) -> Callable[..., BinaryOptimizer]:
    """``binary`` (an optimizer class, or a ``functools.partial`` of one: a Hydra ``_partial_``
    config) with its class replaced by the in-backward one, for a lean model. Any other callable is
    returned as it is: what it builds must flip inside backward itself (the packed layers refuse an
    optimizer that does not, :meth:`bso.lean.layers.PackedWeights.bind_binary_optimizer`)."""
    if isinstance(binary, type) and issubclass(binary, BinaryOptimizer):
        return in_backward_class(binary)
    func = getattr(binary, "func", None)
    if isinstance(binary, functools.partial) and isinstance(func, type):
        if issubclass(func, BinaryOptimizer):
            return functools.partial(in_backward_class(func), *binary.args, **binary.keywords)
    return binary
