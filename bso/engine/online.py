"""Online training through time (spec section 2): no graph spans two time steps, so training memory
does not grow with T.

For each batch and t = 0..T-1 (the paper's t = 1..T):
  forward one step (the membrane potential carried from t-1 is detached inside the neurons),
  L[t] = ((1-l) CE + l MSE) / T, backward, and the binary layers' weight gradient is
  G[t] = delta[t] * a_hat[t]^T from the presynaptic trace (bso.layers).
``update="per_step"`` steps the optimizers at every t (the paper's "real-time" update);
``update="accumulate"`` sums the T gradients and steps once per batch.
"""

from __future__ import annotations

import time
from contextlib import nullcontext

import torch
from torch import nn
from tqdm.auto import tqdm

from bso.engine.common import input_at, instantaneous_loss, topk_correct
from bso.metrics.memory import SavedTensorMeter
from bso.neurons import TRACE_RULES, configure_neurons, reset_neurons
from bso.optim.router import OptimizerRouter

UPDATES = ("per_step", "accumulate")


class OnlineEngine:
    def __init__(
        self,
        T: int,
        trace: str = "ndot",
        update: str = "per_step",
        mse_weight: float = 0.05,
    ):
        if int(T) < 1:
            raise ValueError(f"engine.T must be >= 1, got {T}")
        if trace not in TRACE_RULES:
            raise ValueError(f"unknown engine.trace={trace!r}; choose one of {TRACE_RULES}")
        if update not in UPDATES:
            raise ValueError(f"unknown engine.update={update!r}; choose one of {UPDATES}")
        self.T, self.trace, self.update, self.mse_weight = int(T), trace, update, mse_weight

    def prepare(self, model: nn.Module) -> None:
        """Online mode: detached membrane state and the chosen presynaptic trace."""
        configure_neurons(model, detach_state=True, trace_rule=self.trace)

    def train_epoch(
        self,
        model: nn.Module,
        optimizer: OptimizerRouter,
        loader,
        device: torch.device,
        desc: str = "train",
    ) -> dict:
        model.train()
        T, per_step = self.T, self.update == "per_step"
        flips = torch.zeros(len(optimizer.binary_names), dtype=torch.long, device=device)
        total, correct, loss_sum = 0, 0, 0.0
        activation_peak = 0
        start = time.perf_counter()
        for i, (x, y) in enumerate(
            tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=None)
        ):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            reset_neurons(model)
            meter = SavedTensorMeter() if i == 0 else None  # activation memory, first batch
            summed = 0.0
            if not per_step:
                optimizer.zero_grad()
            for t in range(T):
                with meter if meter is not None else nullcontext():
                    out = model(input_at(x, t))  # graph of this time step only
                    loss = instantaneous_loss(out, y, self.mse_weight, T)
                if per_step:
                    optimizer.zero_grad()
                loss.backward()
                if per_step:
                    flips += optimizer.step(t)
                summed = summed + out.detach()
                loss_sum += loss.detach() * len(y)
            if not per_step:
                flips += optimizer.step()
            if meter is not None:
                activation_peak = meter.peak_bytes
            correct += topk_correct(summed, y, ks=(1,))[1]
            total += len(y)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        return {
            "loss": float(loss_sum) / max(total, 1),
            "acc1": correct / max(total, 1),
            "samples_per_s": total / seconds,
            "seconds": seconds,
            "flips": flips.cpu(),
            "activation_peak_bytes": activation_peak,
        }
