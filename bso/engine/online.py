"""Online training through time (paper Algorithm 1): no graph spans two time steps, so training
memory does not grow with T.

For each batch and t = 0..T-1 (the paper's t = 1..T), one time step (bso/engine/common.py:
``time_step``, also the library's ``bso.online_step``):
  forward one step (the membrane potential carried from t-1 is detached inside the neurons),
  L[t] = ((1-l) CE + l MSE) / T, backward, and the binary layers' weight gradient is
  G[t] = delta[t] * a_hat[t]^T from the presynaptic trace (bso.layers).
``update="per_step"`` steps the optimizers at every t (the paper's "real-time" update);
``update="accumulate"`` sums the T gradients and steps once per batch.
Under torchrun (DistributedDataParallel) every backward all-reduces the gradients before the step, so
every rank flips the same weights; with ``accumulate`` only the last step's backward does.

Where BSO / T-BSO flips the +-1 weights:
  plain mode: in ``optimizer.step(t)``, from the stored ``.grad`` (bso/optim/binary.py: ``step``);
  lean mode (``engine.lean``, bso/lean/; per-step only, the default for BSO / T-BSO): inside
  ``loss.backward()``, in each packed layer's backward as soon as its gradient exists
  (bso/lean/optim.py: ``update_in_backward``); ``optimizer.step(t)`` then steps the full-precision
  parameters and returns the flips made during backward.
"""

from __future__ import annotations

from functools import partial

from bso import lean as lean_mode  # the lean mode: a layer around the core, applied in prepare()
from bso.distributed import grad_sync
from bso.engine.common import (
    PAPER_MSE_WEIGHT,
    Engine,
    input_at,
    instantaneous_loss,
    time_step,
)
from bso.neurons import TRACE_RULES, configure_neurons, reset_neurons

UPDATES = ("per_step", "accumulate")


class OnlineEngine(Engine):
    def __init__(
        self,
        T: int,
        trace: str = "ndot",
        update: str = "per_step",
        mse_weight: float = PAPER_MSE_WEIGHT,
        lean: str | bool = False,
        recompute_binary_convs: bool = False,
    ):
        if trace not in TRACE_RULES:
            raise ValueError(f"unknown engine.trace={trace!r}; choose one of {TRACE_RULES}")
        if update not in UPDATES:
            raise ValueError(f"unknown engine.update={update!r}; choose one of {UPDATES}")
        super().__init__(T, update, mse_weight)
        self.trace = trace
        self.lean = lean_mode.parse(lean)
        self.recompute_binary_convs = bool(recompute_binary_convs)
        self.lean_on = False  # set by prepare: the lean mode is on for this model

    def prepare(self, model):
        """Online mode: detached membrane state and the chosen presynaptic trace; the lean mode
        (bso.lean replaces the binary layers and conv blocks by lean ones) where ``lean`` asks for
        it and it applies."""
        configure_neurons(model, detach_state=True, trace_rule=self.trace)
        self.lean_on = lean_mode.apply(model, self.lean, self.update, self.recompute_binary_convs)

    def train_batch(self, model, optimizer, x, y):
        per_step = self.update == "per_step"
        loss_fn = partial(instantaneous_loss, mse_weight=self.mse_weight, T=self.T)
        reset_neurons(model)
        summed, loss_sum, flips = 0.0, 0.0, 0
        if not per_step:
            optimizer.zero_grad()
        for t in range(self.T):
            if not per_step:  # DDP: all-reduce only the summed gradient, at the last step
                grad_sync(model, t == self.T - 1)
            out, loss, step_flips = time_step(
                model, optimizer, input_at(x, t), y, t, loss_fn, update=per_step
            )
            if per_step:
                flips = flips + step_flips
            summed = summed + out
            loss_sum = loss_sum + loss
        if not per_step:
            flips = optimizer.step()  # the T gradients, summed
        return summed, loss_sum, flips
