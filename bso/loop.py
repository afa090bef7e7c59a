"""The epoch loop (:func:`fit`): train an epoch, evaluate, record, step the schedules, checkpoint.
:class:`Run` holds what the loop works with (built by :mod:`bso.train`); :class:`Schedules` is what
changes at the end of an epoch."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch.optim.lr_scheduler import CosineAnnealingLR
from tqdm.auto import tqdm

from bso import distributed
from bso.checkpoint import TRAIN_FORMAT, export_1bit, read_checkpoint, save_atomic
from bso.data import start_epoch
from bso.divergence import FiniteCheck, RunDiverged
from bso.engine import EpochTally, evaluate
from bso.metrics.memory import (
    PERSISTENT_ROLES,
    cuda_peak_bytes,
    peak_rss_bytes,
    persistent_state_bytes,
    reset_cuda_peak,
)
from bso.metrics.snn import counter_for  # firing rates, SOPs, energy on the test set
from bso.resume import GracefulInterrupt, Progress, RunInterrupted, rng_state
from bso.rundir import BEST, LAST, LAST_1BIT, MetricsFile, RunStatus, copy_last_to_best

log = logging.getLogger(__name__)

LR_SCHEDULES = ("cosine", "constant")
MB = 1e6


class Schedules:
    """What changes at the end of an epoch: the full-precision optimizer's learning rate (constant, or
    cosine to 0 over the run) and the binary optimizer's gamma / (1 - beta) decay, which the released
    code applies at the end of 0-based epoch N, 2N, ... (51 epochs at the initial values for N=50)."""

    def __init__(self, optimizer, cfg: DictConfig, epochs: int):
        if cfg.lr_schedule not in LR_SCHEDULES:
            raise ValueError(
                f"unknown optimizer.lr_schedule={cfg.lr_schedule!r}; choose {LR_SCHEDULES}"
            )
        self.optimizer = optimizer
        self.cosine = (
            CosineAnnealingLR(optimizer.full_precision, T_max=epochs)
            if cfg.lr_schedule == "cosine" and optimizer.full_precision is not None
            else None
        )
        decay = cfg.get("hparam_decay") or {}
        self.every = int(decay.get("every_epochs", 0) or 0)
        self.factor = decay.get("factor", 0.1)
        self.betas = decay.get("betas")
        if self.every and optimizer.binary is not None and self.betas is not None:
            optimizer.binary.decay_hyperparameters(1.0, self.betas)  # rejects unknown betas now

    def decays_after(self, epoch: int) -> bool:
        """After 1-based ``epoch``, i.e. at the end of 0-based epoch ``epoch - 1``."""
        return bool(self.every) and epoch > 1 and (epoch - 1) % self.every == 0

    def step(self, epoch: int) -> None:
        if self.cosine is not None:
            self.cosine.step()
        if self.optimizer.binary is not None and self.decays_after(epoch):
            self.optimizer.binary.decay_hyperparameters(self.factor, self.betas)

    def state_dict(self) -> dict:  # gamma and the betas live in the optimizer's param_groups
        return {"cosine": None if self.cosine is None else self.cosine.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if self.cosine is not None:
            self.cosine.load_state_dict(state["cosine"])


@dataclass
class Run:
    """What the epoch loop works with. ``model`` is the bare network (checkpoints, evaluation, size);
    ``train_model`` is what the engine trains: the same parameters, behind the fast path's wrappers
    and DistributedDataParallel under torchrun."""

    cfg: DictConfig
    dist: distributed.DistState
    run_dir: Path
    status: RunStatus
    model: torch.nn.Module
    train_model: torch.nn.Module
    engine: object
    optimizer: object
    schedules: Schedules
    train_loader: object
    test_loader: object
    logger: object

    @property
    def device(self) -> torch.device:
        return self.dist.device

    def save(self, progress: Progress, best: bool = False, record: dict | None = None) -> None:
        """``last.pt`` (+ ``best.pt``) and their 1-bit exports, written atomically by rank 0; what
        differs between ranks (RNG states, a cut-short epoch's sums and, mid-epoch under torchrun,
        BatchNorm running statistics, averaged only at the epoch's end) is gathered from every rank.
        ``record``: the epoch's metrics record, kept in ``last.pt`` too (re-created on resume if
        metrics.jsonl lost it)."""
        if not self.cfg.save_checkpoint:
            return
        mine = {"tally": progress.tally, "rng": rng_state()}
        if self.dist.enabled and progress.tally.batches:
            buffers = {name for name, _ in self.model.named_buffers()}
            mine["buffers"] = {
                k: v.detach().cpu().clone()
                for k, v in self.model.state_dict().items()
                if k in buffers and v.is_floating_point()
            }
        per_rank = distributed.all_gather_object(mine)
        if not self.dist.is_main:
            return
        config = OmegaConf.to_container(self.cfg, resolve=True)
        blob = {
            "format": TRAIN_FORMAT,
            "epoch": progress.epoch,
            "best_epoch": progress.best_epoch,
            "best_acc1": progress.best_acc1,
            "tally": [r["tally"] for r in per_rank],  # one per rank
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedules": self.schedules.state_dict(),
            "rng": [r["rng"] for r in per_rank],
            "binary_weights": self.optimizer.binary_names,
            "config": config,
            "wandb_id": self.logger.run_id,
            "record": record,
            "world_size": self.dist.world_size,
            "num_threads": torch.get_num_threads(),
        }
        if "buffers" in per_rank[0]:
            blob["rank_buffers"] = [r["buffers"] for r in per_rank]
        save_atomic(blob, self.run_dir / LAST)
        export_1bit(
            self.model,
            self.run_dir / LAST_1BIT,
            config=config,
            model_config=config["model"],
            epoch=progress.epoch,
        )
        if best:
            copy_last_to_best(self.run_dir)


def restore_exports(run_dir: Path, model, progress: Progress, cfg) -> None:
    """Resuming from an epoch's ``last.pt``: write what a failed save (a full disk) may have left
    stale or missing: ``last_1bit.pt``, and ``best.pt`` / ``best_1bit.pt`` when that epoch was the
    best."""
    config = OmegaConf.to_container(cfg, resolve=True)
    export_1bit(
        model,
        run_dir / LAST_1BIT,
        config=config,
        model_config=config["model"],
        epoch=progress.epoch,
    )
    best = run_dir / BEST
    if progress.best_epoch == progress.epoch and (
        not best.is_file() or read_checkpoint(best).get("epoch") != progress.epoch
    ):
        log.warning(f"{best} did not hold the best epoch {progress.epoch}; copied from last.pt")
        copy_last_to_best(run_dir)


def fit(run: Run, progress: Progress, interrupted: GracefulInterrupt) -> dict:
    """The epoch loop: train, evaluate, record, step the schedules, checkpoint."""
    epochs = int(run.cfg.dataset.epochs)
    metrics_file = MetricsFile(run.run_dir, enabled=run.dist.is_main)
    record: dict = {}
    snn = counter_for(run.cfg, run.model, run.engine.T)  # metrics.snn: hooks during evaluation
    divergence = run.cfg.get("divergence") or OmegaConf.create({"stop": False, "check_every": 0})
    epochs_left = range(progress.epoch + 1, epochs + 1)
    for epoch in tqdm(epochs_left, desc="epochs", disable=None if run.dist.is_main else True):
        reset_cuda_peak(run.device)
        lr, gamma = run.optimizer.lr, run.optimizer.gamma  # the values this epoch trains with
        start_epoch(run.train_loader, epoch, skip_batches=progress.tally.batches)
        check = FiniteCheck(epoch, run.device, divergence.check_every) if divergence.stop else None
        tally = run.engine.train_epoch(
            run.train_model,
            run.optimizer,
            run.train_loader,
            run.device,
            tally=progress.tally,
            should_stop=interrupted,
            finite_check=check,
        )
        if check is not None:  # the epoch's last batches, then every weight (bso/divergence.py)
            check.check()
            check.check_model(run.model)
        if tally.interrupted:  # save mid-epoch: a resumed run continues at the next batch
            tally.interrupted = False
            run.save(progress)
            raise RunInterrupted(
                f"{interrupted.signal or 'a signal to another rank'} in epoch {epoch}"
            )
        distributed.average_buffers(run.model)  # torchrun: BN running statistics, mean over ranks
        with snn:
            test_m = evaluate(
                run.model, run.test_loader, run.engine.T, run.device, run.engine.mse_weight
            )
        if divergence.stop and not math.isfinite(test_m["loss"]):
            raise RunDiverged(
                f"the test loss is {test_m['loss']} after epoch {epoch}; the run stopped",
                epoch,
                None,
            )
        progress.epoch, progress.tally = epoch, EpochTally()
        improved = progress.update_best(epoch, test_m["acc1"])

        record = epoch_record(run, epoch, tally, test_m, lr, gamma)
        record.update(snn.record())
        record.update({"best/epoch": progress.best_epoch, "best/test_acc1": progress.best_acc1})
        run.schedules.step(epoch)
        metrics_file.write(record)  # first (flushed): a failed checkpoint write loses no record
        run.save(progress, best=improved, record=record)
        run.logger.log(record, step=epoch)
        run.status.write(
            "running",
            epoch=epoch,
            best_epoch=progress.best_epoch,
            best_test_acc1=progress.best_acc1,
        )
        log.info(
            f"epoch {epoch:3d}/{epochs} | train loss {record['train/loss']:.4f} "
            f"acc {100 * record['train/acc1']:.2f}% | test loss {record['test/loss']:.4f} "
            f"acc {100 * record['test/acc1']:.2f}% (best {100 * progress.best_acc1:.2f}% @ "
            f"{progress.best_epoch}) | flips/weight {record.get('flip_rate/all', float('nan')):.4f} "
            f"| {record['throughput/train_samples_per_s']:.0f} samples/s "
            f"| peak RSS {record['memory/peak_rss_mb']:.0f} MB"
        )
        if interrupted():  # the signal came during evaluation: this epoch is saved
            raise RunInterrupted(
                f"{interrupted.signal or 'a signal to another rank'} after epoch {epoch}"
            )
    return record


def epoch_record(run: Run, epoch: int, tally: EpochTally, test_m: dict, lr, gamma) -> dict:
    """One line of metrics.jsonl; under torchrun the training numbers are reduced over ranks."""
    train_m = tally.metrics()
    record = {
        "epoch": epoch,
        "train/loss": train_m["loss"],
        "train/acc1": train_m["acc1"],
        **{f"test/{k}": v for k, v in test_m.items()},
        "lr": lr,
        "memory/peak_rss_mb": distributed.max_over_ranks(peak_rss_bytes()) / MB,
        "memory/activation_peak_mb": train_m["activation_peak_bytes"] / MB,
        "throughput/train_samples_per_s": train_m["samples_per_s"],
        "time/epoch_s": train_m["seconds"],
    }
    persistent = persistent_state_bytes(run.model, run.optimizer)
    for role in PERSISTENT_ROLES:
        record[f"memory/persistent/{role}_mb"] = persistent[role] / MB
    if gamma is not None:
        record["gamma"] = gamma
    flip_numel = run.optimizer.flip_numel()
    if len(flip_numel):  # sign flips per weight this epoch (binary or latent weights)
        flips = train_m["flips"].double()
        record["flip_rate/all"] = float(flips.sum() / flip_numel.sum())
        for name, rate in zip(run.optimizer.binary_names, flips / flip_numel, strict=True):
            record[f"flip_rate/{name}"] = float(rate)
    if run.device.type == "cuda":
        peak = {k: distributed.max_over_ranks(v) for k, v in cuda_peak_bytes(run.device).items()}
        record["memory/cuda_peak_allocated_mb"] = peak["allocated"] / MB
        record["memory/cuda_peak_reserved_mb"] = peak["reserved"] / MB
    return record
