"""Long runs: what a run remembers to continue exactly (:func:`restore`), and how SIGINT / SIGTERM
stop a run cleanly (:class:`GracefulInterrupt`). Which config a resumed run works with, and what it
refuses, is :mod:`bso.preflight`'s."""

from __future__ import annotations

import logging
import random
import signal
import threading
from dataclasses import dataclass, field

import numpy as np
import torch

from bso import distributed
from bso.engine import EpochTally

log = logging.getLogger(__name__)


class RunInterrupted(Exception):
    """SIGINT / SIGTERM arrived; the run saved its checkpoint and can be resumed."""


def rng_state() -> dict:
    """Every random number generator a run draws from (the data order is a function of the epoch)."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class Progress:
    """Where a run is: the last finished epoch, the best one so far, and a cut-short epoch's sums."""

    epoch: int = 0
    best_epoch: int | None = None
    best_acc1: float | None = None
    tally: EpochTally = field(default_factory=EpochTally)

    def update_best(self, epoch: int, acc1: float) -> bool:
        if self.best_acc1 is None or acc1 > self.best_acc1:
            self.best_epoch, self.best_acc1 = epoch, acc1
            return True
        return False


class GracefulInterrupt:
    """SIGINT / SIGTERM (Ctrl-C, Slurm preemption) ask the run to stop after the batch in flight; a
    second SIGINT stops at once. Under torchrun every rank gets the signal, maybe not during the same
    batch: the ranks agree (an all-reduce of the flag after each batch) so they stop together."""

    def __init__(self):
        self.signal: str | None = None
        self._previous: dict = {}

    def __call__(self) -> bool:
        flag = torch.tensor(float(self.signal is not None))
        return bool(distributed.all_reduce_max(flag))  # the flag itself in one process

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name
        log.warning(f"{self.signal}: finishing the current batch, then saving a checkpoint")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def restore(checkpoint: dict, model, optimizer, schedules, dist) -> Progress:
    """Model, both optimizers' state, the schedules, the counters and every RNG of ``checkpoint``
    (this rank's RNG states and cut-short epoch sums under torchrun)."""
    saved_ranks = len(checkpoint["rng"])
    mid_epoch = any(tally.batches for tally in checkpoint["tally"])
    rank = min(dist.rank, saved_ranks - 1)  # another world size: exact data order, other RNG draws
    model.load_state_dict(checkpoint["model"])
    rank_buffers = checkpoint.get("rank_buffers")
    if mid_epoch and rank_buffers:  # torchrun, mid-epoch: this rank's own BatchNorm statistics
        state = model.state_dict()
        for key, value in rank_buffers[rank].items():
            state[key].copy_(value)
    threads = checkpoint.get("num_threads")
    if (
        threads
        and dist.device.type == "cpu"
        and threads != torch.get_num_threads()
        and dist.is_main
    ):
        log.warning(
            f"the checkpoint was trained with {threads} CPU threads, this run has "
            f"{torch.get_num_threads()}: float sums may round differently from here on"
        )
    optimizer.load_state_dict(checkpoint["optimizer"])
    schedules.load_state_dict(checkpoint["schedules"])
    set_rng_state(checkpoint["rng"][rank])
    return Progress(
        epoch=checkpoint["epoch"],
        best_epoch=checkpoint["best_epoch"],
        best_acc1=checkpoint["best_acc1"],
        tally=checkpoint["tally"][rank] if mid_epoch else EpochTally(),
    )
