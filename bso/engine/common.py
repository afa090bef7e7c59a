"""What both engines share: the instantaneous loss, the per-step input, one time step of online
training (the online engine's and :func:`bso.online_step`'s), the readout, the epoch's bookkeeping
and evaluation. The engines themselves (online.py, bptt.py) only say how one batch is
trained: when the graph is cut, when ``backward`` and ``step`` happen."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from bso.distributed import all_reduce_max, all_reduce_sum, is_main
from bso.metrics.memory import SavedTensorMeter
from bso.neurons import reset_neurons

PAPER_MSE_WEIGHT = 0.05  # l of the loss below in the released code: the engines' and online_step's


def instantaneous_loss(output: torch.Tensor, target: torch.Tensor, mse_weight: float, T: int):
    """L[t] = ((1 - l) * CE(o[t], y) + l * MSE(o[t], onehot(y))) / T,  l = ``mse_weight``."""
    loss = F.cross_entropy(output, target)
    if mse_weight:
        onehot = F.one_hot(target, output.shape[-1]).to(output.dtype)
        loss = (1.0 - mse_weight) * loss + mse_weight * F.mse_loss(output, onehot)
    return loss / T


def input_at(x: torch.Tensor, t: int) -> torch.Tensor:
    """Direct encoding: a static batch [B, C, H, W] is the input at every step; an event batch
    [B, T, C, H, W] (or [B, T, C]: channels without a picture, SHD) gives frame t at step t, as a
    copy: a layer that saves its input for backward then holds frame t, not (through a view) all T."""
    return x[:, t].contiguous() if x.dim() in (3, 5) else x


def time_step(
    model: nn.Module,
    optimizer,
    x: torch.Tensor,
    target: torch.Tensor,
    t: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    update: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One time step of online training (paper Algorithm 1), for :class:`bso.engine.OnlineEngine`
    and :func:`bso.online_step` alike: forward (the graph of step ``t`` only), the loss, backward
    (which frees that graph) and, with ``update``, the optimizer step. BSO / T-BSO flip the +-1
    weights in ``optimizer.step(t)``, or in the lean mode inside ``loss.backward()``, told ``t``
    first (``optimizer.begin_time_step``). Without ``update`` the gradients add up for one step
    after the last ``t``. Returns (output, loss) detached and the flips per binary weight (None
    without ``update``). At ``t == 0`` the optimizer must hold the model's +-1 weights."""
    if t == 0 and optimizer.binary is not None:
        optimizer.check_model(model)
    if update:
        optimizer.zero_grad()
    out = model(x)
    loss = loss_fn(out, target)
    optimizer.begin_time_step(t)
    loss.backward()
    flips = optimizer.step(t) if update else None
    return out.detach(), loss.detach(), flips


def topk_correct(scores: torch.Tensor, target: torch.Tensor, ks=(1, 5)) -> dict[int, int]:
    ks = [k for k in ks if k <= scores.shape[-1]]
    top = scores.topk(max(ks), dim=-1).indices
    hit = top == target.unsqueeze(-1)
    return {k: int(hit[:, :k].any(dim=-1).sum()) for k in ks}


@torch.no_grad()
def evaluate(model: nn.Module, loader, T: int, device, mse_weight: float = 0.0) -> dict:
    """Prediction = argmax of the sum over time steps of the output layer (direct encoding: the
    same input at every step, as in the paper).
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

    def __init__(self, T: int, update: str, mse_weight: float):
        if int(T) < 1:
            raise ValueError(f"engine.T must be >= 1, got {T}")
        self.T, self.update, self.mse_weight = int(T), update, mse_weight

    def prepare(self, model: nn.Module) -> None:
        raise NotImplementedError

    def train_batch(
        self, model, optimizer, x, y
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (summed output over T, summed loss, flips per binary weight)."""
        raise NotImplementedError

    def train_epoch(
        self,
        model: nn.Module,
        optimizer,
        loader,
        device,
        desc: str = "train",
        tally: EpochTally | None = None,
        should_stop=None,
        finite_check=None,
    ) -> EpochTally:
        """One pass over ``loader``. ``tally`` carries the sums of an epoch that an interruption cut
        short (a resumed run continues it); ``should_stop()`` is asked after every batch, and a True
        answer ends the epoch early with ``tally.interrupted`` set (the batch in flight finishes).
        ``finite_check``: a :class:`bso.divergence.FiniteCheck` (non-finite loss stops the run)."""
        model.train()
        tally = tally or EpochTally()
        # running sums on the device (no sync per batch), continued from a cut-short epoch's
        flips = torch.zeros(len(optimizer.binary_names), dtype=torch.long, device=device)
        flips = flips if tally.flips is None else tally.flips.to(device)
        correct = torch.as_tensor(tally.correct, device=device)
        loss_sum = torch.as_tensor(tally.loss_sum, dtype=torch.float64, device=device)
        start = time.perf_counter()
        bar = tqdm(
            loader, desc=desc, leave=False, dynamic_ncols=True, disable=None if is_main() else True
        )
        for x, y in bar:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if tally.batches == 0:  # activation memory: peak bytes of saved tensors, first batch
                with SavedTensorMeter() as meter:
                    summed, loss, batch_flips = self.train_batch(model, optimizer, x, y)
                tally.activation_peak_bytes = meter.peak_bytes
            else:
                summed, loss, batch_flips = self.train_batch(model, optimizer, x, y)
            flips += batch_flips.to(device)
            loss_sum += loss.double() * len(y)
            correct += (summed.argmax(dim=-1) == y).sum()
            tally.samples += len(y)
            tally.batches += 1
            if finite_check is not None:  # bso.divergence: a device flag, read only when due
                finite_check.observe(loss, tally.batches)
                if finite_check.due(tally.batches):
                    finite_check.check()
            if should_stop is not None and should_stop():
                tally.interrupted = True
                break
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        tally.seconds += time.perf_counter() - start
        tally.loss_sum, tally.correct, tally.flips = loss_sum.cpu(), correct.cpu(), flips.cpu()
        return tally


@dataclass
class EpochTally:
    """The running sums of one training epoch on this rank (a checkpoint taken mid-epoch saves them)."""

    samples: int = 0
    batches: int = 0
    correct: torch.Tensor | int = 0
    loss_sum: torch.Tensor | float = 0.0  # float64: the same sum whether or not an epoch was cut
    seconds: float = 0.0
    flips: torch.Tensor | None = None  # per binary weight
    activation_peak_bytes: int = 0
    interrupted: bool = False

    def metrics(self) -> dict:
        """The epoch over all ranks (torchrun): samples, correct and loss summed; time and memory
        the slowest / largest rank's; flips are the same on every rank (all-reduced gradients), so
        their maximum is that count. In one process: this rank's numbers."""
        samples, correct, loss_sum = all_reduce_sum(
            torch.tensor(
                [self.samples, int(self.correct), float(self.loss_sum)], dtype=torch.float64
            )
        ).tolist()
        seconds, activation_peak = all_reduce_max(
            torch.tensor([self.seconds, self.activation_peak_bytes], dtype=torch.float64)
        ).tolist()
        return {
            "loss": loss_sum / max(samples, 1),
            "acc1": correct / max(samples, 1),
            "samples_per_s": samples / max(seconds, 1e-9),
            "seconds": seconds,
            "samples": int(samples),
            "correct": int(correct),
            "activation_peak_bytes": int(activation_peak),
            "flips": None if self.flips is None else all_reduce_max(self.flips),
        }
