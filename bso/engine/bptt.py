"""Backpropagation through time (the baselines): the network is unrolled over T steps with the graph
kept through time (membrane potential not detached), one backward and one optimizer step per batch.
Same loss and readout as the online engine, so methods differ only where the method differs.
Memory grows linearly with T.
"""

from __future__ import annotations

import torch

from bso.distributed import grad_sync
from bso.engine.common import PAPER_MSE_WEIGHT, Engine, input_at, instantaneous_loss
from bso.neurons import configure_neurons, reset_neurons


class BPTTEngine(Engine):
    def __init__(self, T: int, update: str = "accumulate", mse_weight: float = PAPER_MSE_WEIGHT):
        if update != "accumulate":
            raise ValueError(
                f"engine=bptt computes one gradient per batch through all T steps, so it cannot "
                f"update per time step (got engine.update={update!r}); use engine=online for "
                "per-step updates, or engine.update=accumulate"
            )
        super().__init__(T, update, mse_weight)

    def prepare(self, model):
        """BPTT mode: the membrane state stays in the graph; no traces."""
        configure_neurons(model, detach_state=False, trace_rule=None)

    def train_batch(self, model, optimizer, x, y):
        reset_neurons(model)
        optimizer.zero_grad()
        outputs = []
        for t in range(self.T):  # one graph through all T steps
            grad_sync(model, t == self.T - 1)  # DDP: one all-reduce, in the one backward
            outputs.append(model(input_at(x, t)))
        loss = sum(instantaneous_loss(out, y, self.mse_weight, self.T) for out in outputs)
        loss.backward()
        flips = optimizer.step()
        return torch.stack(outputs).sum(0).detach(), loss.detach(), flips
