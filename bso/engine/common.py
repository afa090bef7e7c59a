"""What both engines share: the instantaneous loss, the per-step input, the readout, the epoch's
bookkeeping and evaluation. The engines themselves (online.py, bptt.py) only say how one batch is
trained: when the graph is cut, when ``backward`` and ``step`` happen."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from bso.distributed import all_reduce_max, all_reduce_sum, is_main
from bso.metrics.memory import SavedTensorMeter
from bso.neurons import reset_neurons


def instantaneous_loss(output: torch.Tensor, target: torch.Tensor, mse_weight: float, T: int):
    """L[t] = ((1 - l) * CE(o[t], y) + l * MSE(o[t], onehot(y))) / T   (released code: l = 0.05)."""
    loss = F.cross_entropy(output, target)
    if mse_weight:
        onehot = F.one_hot(target, output.shape[-1]).to(output.dtype)
        loss = (1.0 - mse_weight) * loss + mse_weight * F.mse_loss(output, onehot)
    return loss / T


def input_at(x: torch.Tensor, t: int) -> torch.Tensor:
    """Direct encoding: a static batch [B, C, H, W] is the input at every step; an event batch
    [B, T, C, H, W] gives frame t at step t."""
    return x[:, t] if x.dim() == 5 else x


def topk_correct(scores: torch.Tensor, target: torch.Tensor, ks=(1, 5)) -> dict[int, int]:
    ks = [k for k in ks if k <= scores.shape[-1]]
    top = scores.topk(max(ks), dim=-1).indices
    hit = top == target.unsqueeze(-1)
    return {k: int(hit[:, :k].any(dim=-1).sum()) for k in ks}


@torch.no_grad()
def evaluate(model: nn.Module, loader, T: int, device, mse_weight: float = 0.0) -> dict:
    """Prediction = argmax of the sum over time steps of the output layer (spec section 1).
    Reports the loss (summed over steps, as in training), top-1, and top-5 when classes > 10."""
    model.eval()
    total, loss_sum, correct, classes = 0, 0.0, {1: 0, 5: 0}, 0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        reset_neurons(model)
        summed = 0.0
        for t in range(T):
            out = model(input_at(x, t))
            loss_sum += instantaneous_loss(out, y, mse_weight, T) * len(y)  # no sync per step
            summed = summed + out
        for k, c in topk_correct(summed, y).items():
            correct[k] += c
        total += len(y)
        classes = summed.shape[-1]
    # torchrun: each rank evaluated its shard; sum over ranks (no-op in one process)
    loss_sum, correct1, correct5, total = all_reduce_sum(
        torch.tensor([float(loss_sum), correct[1], correct[5], total], dtype=torch.float64)
    ).tolist()
    classes = int(all_reduce_max(torch.tensor(classes)))
    metrics = {"loss": loss_sum / total, "acc1": correct1 / total}
    if classes > 10:
        metrics["acc5"] = correct5 / total
    return metrics


class Engine:
    """Base of the engines: ``train_batch`` is theirs, the epoch loop around it is shared."""

    def __init__(self, T: int, update: str, mse_weight: float, eval_only: bool):
        if int(T) < 1:
            raise ValueError(f"engine.T must be >= 1, got {T}")
        self.T, self.update, self.mse_weight, self.eval_only = int(T), update, mse_weight, eval_only

    def prepare(self, model: nn.Module) -> None:
        raise NotImplementedError

    def train_batch(
        self, model, optimizer, x, y
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (summed output over T, summed loss, flips per binary weight)."""
        raise NotImplementedError

    def train_epoch(self, model: nn.Module, optimizer, loader, device, desc: str = "train") -> dict:
        model.train()
        flips = torch.zeros(len(optimizer.binary_names), dtype=torch.long, device=device)
        total, correct, loss_sum, activation_peak = 0, 0, 0.0, 0
        start = time.perf_counter()
        bar = tqdm(
            loader, desc=desc, leave=False, dynamic_ncols=True, disable=None if is_main() else True
        )
        for i, (x, y) in enumerate(bar):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if i == 0:  # activation memory: peak bytes of saved tensors over the first batch
                with SavedTensorMeter() as meter:
                    summed, loss, batch_flips = self.train_batch(model, optimizer, x, y)
                activation_peak = meter.peak_bytes
            else:
                summed, loss, batch_flips = self.train_batch(model, optimizer, x, y)
            flips += batch_flips.to(device)
            loss_sum += loss * len(y)
            correct += (summed.argmax(dim=-1) == y).sum()  # a tensor: no device sync per batch
            total += len(y)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        # torchrun: sums over ranks; flips are the same on every rank (max = that count); time and
        # memory are the slowest / largest rank's. All no-ops in one process.
        rank_counts = {"samples": total, "correct": int(correct)}
        loss_sum, correct, total = all_reduce_sum(
            torch.tensor([float(loss_sum), float(correct), total], dtype=torch.float64)
        ).tolist()
        seconds, activation_peak = all_reduce_max(
            torch.tensor([seconds, activation_peak], dtype=torch.float64)
        ).tolist()
        return {
            "loss": loss_sum / max(total, 1),
            "acc1": correct / max(total, 1),
            "samples_per_s": total / seconds,
            "seconds": seconds,
            "flips": all_reduce_max(flips).cpu(),
            "activation_peak_bytes": int(activation_peak),
            "samples": int(total),
            "correct": int(correct),
            "rank": rank_counts,  # what this rank alone saw
        }
