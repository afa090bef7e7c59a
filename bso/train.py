"""One training run from a composed config: build, train epoch by epoch, log, checkpoint."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.optim.lr_scheduler import CosineAnnealingLR
from tqdm.auto import tqdm

from bso import distributed, fastpath
from bso.checkpoint import export_1bit, load_checkpoint
from bso.data import build_dataloaders
from bso.engine import evaluate
from bso.loggers import NullLogger
from bso.metrics.memory import (
    PERSISTENT_ROLES,
    cuda_peak_bytes,
    peak_rss_bytes,
    persistent_state_bytes,
    reset_cuda_peak,
)
from bso.models import model_size
from bso.optim import build_optimizer
from bso.run import MetricsFile, write_run_info

log = logging.getLogger(__name__)

LR_SCHEDULES = ("cosine", "constant")
MB = 1e6


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(cfg: DictConfig) -> dict:
    """Train ``cfg.model`` on ``cfg.dataset`` with ``cfg.optimizer`` and ``cfg.engine``.
    Returns the last epoch's metrics record.

    Under torchrun every rank runs this; ``bso.distributed`` sets up the process group and rank 0
    alone writes the run directory, checkpoints and wandb (one process: all of it is a no-op)."""
    # distributed: process group, this rank's device; the DistState is what a resume needs to know
    dist_state = distributed.setup(
        cfg.device, backend=cfg.distributed.backend, timeout_min=cfg.distributed.timeout_min
    )
    try:
        record = run_training(cfg, dist_state)
    except BaseException:
        distributed.cleanup(dist_state, barrier=False)
        raise
    distributed.cleanup(dist_state)
    return record


def run_training(cfg: DictConfig, dist_state: distributed.DistState) -> dict:
    """The run itself, on this rank (``train`` wraps it in the process group's set-up/tear-down)."""
    if cfg.optimizer.lr_schedule not in LR_SCHEDULES:
        raise ValueError(
            f"unknown optimizer.lr_schedule={cfg.optimizer.lr_schedule!r}; choose {LR_SCHEDULES}"
        )
    seed_everything(cfg.seed)
    device = dist_state.device
    main = dist_state.is_main  # distributed: only rank 0 writes
    run_dir = distributed.agree_on_run_dir(dist_state, Path(cfg.paths.output_dir))
    epochs = int(cfg.dataset.epochs)

    # Build everything that can reject the config before any data is read.
    model = instantiate(cfg.model).to(device)
    engine = instantiate(cfg.engine)
    engine.prepare(model)
    if engine.eval_only:
        return evaluate_checkpoint(cfg, model, engine, dist_state, run_dir)
    if cfg.get("init_from"):  # e.g. ImageNet fine-tuning at T=4 from the T=1 pre-training
        load_checkpoint(model, cfg.init_from)
    # fast path (channels_last, cudnn.benchmark, compile, autocast), then DDP under torchrun;
    # `model` stays the bare network (checkpoints, size), `train_model` is what the engine runs
    train_model = distributed.wrap_model(
        fastpath.apply(model, cfg.fast, device), dist_state, cfg.distributed.sync_batchnorm
    )
    if dist_state.enabled:  # identical init on every rank above; augmentation differs per rank
        seed_everything(cfg.seed + dist_state.rank)
    optimizer = build_optimizer(model, cfg.optimizer)
    lr_schedule = (
        CosineAnnealingLR(optimizer.other, T_max=epochs)
        if cfg.optimizer.lr_schedule == "cosine" and optimizer.other is not None
        else None
    )
    decay = cfg.optimizer.get("hparam_decay") or {"every_epochs": 0}
    train_loader, test_loader = build_dataloaders(
        cfg.dataset, seed=cfg.seed, rank=dist_state.rank, world_size=dist_state.world_size
    )

    size = model_size(model)
    flip_numel = optimizer.flip_numel()
    if main:
        write_run_info(run_dir, cfg, device, {"model_size": size.as_dict()})
    metrics_file = MetricsFile(run_dir)
    make_logger = instantiate(cfg.logger, _partial_=True) if main else NullLogger
    run_config = {**OmegaConf.to_container(cfg, resolve=True), "model_size": size.as_dict()}
    logger = make_logger(run_dir=run_dir, run_config=run_config)
    log.info(
        f"{type(model).__name__} ({cfg.model.weights} weights): {size}\n"
        f"{cfg.optimizer.name} | {type(engine).__name__} T={engine.T} | {cfg.dataset.name}: "
        f"{len(train_loader.dataset)} train / {len(test_loader.dataset)} test | {device} | "
        f"run dir {run_dir}"
        + (f" | {dist_state.world_size} processes" if dist_state.enabled else "")
    )

    record: dict = {}
    try:
        bar = None if main else True  # torchrun: progress bars on rank 0 only
        for epoch in tqdm(range(1, epochs + 1), desc="epochs", disable=bar, dynamic_ncols=True):
            reset_cuda_peak(device)
            distributed.set_epoch(train_loader, epoch)  # torchrun: a new shuffle each epoch
            lr, gamma = optimizer.lr, optimizer.gamma  # the values this epoch trains with
            train_m = engine.train_epoch(train_model, optimizer, train_loader, device)
            distributed.average_buffers(model)  # torchrun: BN running stats, the mean over ranks
            eval_model = distributed.unwrap(train_model)  # each rank evaluates its test shard
            test_m = evaluate(eval_model, test_loader, engine.T, device, engine.mse_weight)

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
            persistent = persistent_state_bytes(model, optimizer)
            for role in PERSISTENT_ROLES:
                record[f"memory/persistent/{role}_mb"] = persistent[role] / MB
            if gamma is not None:
                record["gamma"] = gamma
            if len(flip_numel):  # sign flips per weight this epoch (binary or latent weights)
                flips = train_m["flips"].double()
                record["flip_rate/all"] = float(flips.sum() / flip_numel.sum())
                for name, rate in zip(optimizer.binary_names, flips / flip_numel, strict=True):
                    record[f"flip_rate/{name}"] = float(rate)
            if device.type == "cuda":
                peak = cuda_peak_bytes(device)
                peak = {k: distributed.max_over_ranks(v) for k, v in peak.items()}
                record["memory/cuda_peak_allocated_mb"] = peak["allocated"] / MB
                record["memory/cuda_peak_reserved_mb"] = peak["reserved"] / MB
            if main:
                metrics_file.write(record)
            logger.log(record, step=epoch)
            log.info(
                f"epoch {epoch:3d}/{epochs} | train loss {record['train/loss']:.4f} "
                f"acc {100 * record['train/acc1']:.2f}% | test loss {record['test/loss']:.4f} "
                f"acc {100 * record['test/acc1']:.2f}% "
                f"| flips/weight {record.get('flip_rate/all', float('nan')):.4f} "
                f"| {record['throughput/train_samples_per_s']:.0f} samples/s "
                f"| peak RSS {record['memory/peak_rss_mb']:.0f} MB"
            )

            if lr_schedule is not None:
                lr_schedule.step()
            decay_now = decay["every_epochs"] and epoch % decay["every_epochs"] == 0
            if optimizer.binary is not None and decay_now:
                optimizer.binary.decay_hyperparameters(decay["factor"])

        if cfg.save_checkpoint and main:
            torch.save(
                {
                    "epoch": epochs,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "binary_weights": optimizer.binary_names,
                    "config": OmegaConf.to_container(cfg, resolve=True),
                },
                run_dir / "checkpoint.pt",
            )
            export_1bit(model, run_dir / "model_1bit.pt", model_config=run_config["model"])
    finally:
        logger.finish()
    log.info(
        f"final test accuracy {100 * record.get('test/acc1', float('nan')):.2f}% "
        f"after {epochs} epochs; run dir {run_dir}"
    )
    return record


def evaluate_checkpoint(
    cfg: DictConfig, model, engine, dist_state: distributed.DistState, run_dir: Path
) -> dict:
    """``engine.eval_only=true checkpoint=...``: test-set metrics of a saved model, no training
    (under torchrun each rank evaluates a shard; rank 0 writes)."""
    if not cfg.get("checkpoint"):
        raise ValueError(
            "engine.eval_only=true needs checkpoint=<path to a checkpoint.pt or model_1bit.pt>"
        )
    device = dist_state.device
    load_checkpoint(model, cfg.checkpoint)
    _, test_loader = build_dataloaders(
        cfg.dataset, seed=cfg.seed, rank=dist_state.rank, world_size=dist_state.world_size
    )
    if dist_state.is_main:
        write_run_info(run_dir, cfg, device, {"model_size": model_size(model).as_dict()})
    metrics = evaluate(model, test_loader, engine.T, device, engine.mse_weight)
    record = {"checkpoint": str(cfg.checkpoint), **{f"test/{k}": v for k, v in metrics.items()}}
    if dist_state.is_main:
        MetricsFile(run_dir).write(record)
    log.info(
        f"{cfg.checkpoint}: test loss {record['test/loss']:.4f} "
        f"acc {100 * record['test/acc1']:.2f}% (T={engine.T}, {len(test_loader.dataset)} samples)"
    )
    return record
