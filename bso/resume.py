"""Long runs: what a run remembers to continue exactly, which config a resumed run (or an
evaluation, or a fine-tuning) works with, and how SIGINT / SIGTERM stop a run cleanly.
:mod:`bso.train` uses these around its loop."""

from __future__ import annotations

import copy
import logging
import random
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from bso import distributed
from bso.checkpoint import TRAIN_FORMAT, read_checkpoint
from bso.data import IMAGE_SIZE
from bso.engine import EpochTally
from bso.run import MetricsFile, RunStatus, find_resume_checkpoint

log = logging.getLogger(__name__)

# What a resumed run may change on its command line: where and how it runs, never what it trains.
RESUME_MAY_CHANGE = (
    "resume",
    "device",
    "dataset.epochs",
    "dataset.num_workers",
    "dataset.root",
    "logger",
    "paths",
    "hydra",
    "save_checkpoint",
)


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


def command_line_overrides() -> list[str]:
    """The ``key=value`` overrides the user typed (empty outside a Hydra run)."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def _overridden_keys(overrides: list[str]) -> set[str]:
    return {item.split("=", 1)[0].lstrip("+~") for item in overrides}


def upgrade_saved_config(saved: dict) -> dict:
    """A checkpoint's config in the current spelling (resuming a run that an earlier bso wrote):
    ``optimizer.other`` becomes ``optimizer.full_precision``; ``engine.eval_only`` and
    ``checkpoint`` (keys of evaluation, which is eval.py's) are dropped."""
    saved = copy.deepcopy(saved)
    optimizer = saved.get("optimizer") or {}
    if "other" in optimizer:
        optimizer["full_precision"] = optimizer.pop("other")
    (saved.get("engine") or {}).pop("eval_only", None)
    saved.pop("checkpoint", None)
    return saved


def config_for_resume(cfg: DictConfig, saved: dict, overrides: list[str], path: Path) -> DictConfig:
    """The checkpoint's own config, with the few keys a resumed run may change taken from ``cfg``."""
    resumed = OmegaConf.create(upgrade_saved_config(saved))
    keys = _overridden_keys(overrides)
    allowed = {
        key for key in keys if any(key == k or key.startswith(k + ".") for k in RESUME_MAY_CHANGE)
    }
    changed = sorted(
        key
        for key in keys - allowed
        if OmegaConf.select(cfg, key) != OmegaConf.select(resumed, key)
    )
    if changed:
        raise ValueError(
            f"resume={cfg.resume} continues {path} with the config it was trained with, but the command "
            f"line changes {changed}. A resumed run may only change {list(RESUME_MAY_CHANGE)}; start a "
            "new run (init_from=<checkpoint> for its weights) to train something else."
        )
    for key in allowed - {"resume"}:
        if not key.startswith("hydra"):
            OmegaConf.update(resumed, key, OmegaConf.select(cfg, key), merge=False)
    resumed.resume = cfg.resume
    return resumed


# What a checkpoint's dataset must share with the dataset it is evaluated or fine-tuned on
DATASET_SHAPE = ("in_channels", "num_classes", "image_size")


def config_for_weights(
    cfg: DictConfig,
    saved: dict | None,
    overrides: list[str],
    path: str | Path = "the checkpoint",
    evaluate: bool = False,
) -> DictConfig:
    """Evaluation (``evaluate=True``, eval.py) and ``init_from``: build the model the checkpoint was
    trained with (its model config; for an evaluation also its T), except what the command line
    sets explicitly (``model=<name>`` builds another architecture, ``model.<key>=...`` changes a
    key, ``engine.T=...`` another T).

    An evaluation also uses the checkpoint's dataset unless the command line names one
    (``dataset=...`` or ``dataset.<key>=...``); ``init_from`` trains on this run's dataset. Either
    way a dataset whose shape (channels, classes, input size) differs from the checkpoint's is
    refused here, before any work, naming both."""
    if not saved:
        return cfg
    explicit = _overridden_keys(overrides)
    cfg = cfg.copy()
    saved_model = saved.get("model") or {}
    saved_data = saved.get("dataset") or {}
    dataset_named = any(k == "dataset" or k.startswith("dataset.") for k in explicit)
    if evaluate and saved_data and not dataset_named:
        cfg.dataset = OmegaConf.create(saved_data)
    theirs = {key: saved_model.get(key, saved_data.get(key)) for key in DATASET_SHAPE}
    theirs["image_size"] = saved_data.get("image_size") or IMAGE_SIZE.get(saved_data.get("name"))
    ours = {key: cfg.dataset.get(key) for key in DATASET_SHAPE}
    ours["image_size"] = ours["image_size"] or IMAGE_SIZE.get(cfg.dataset.get("name"))
    differ = [k for k in DATASET_SHAPE if None not in (theirs[k], ours[k]) and theirs[k] != ours[k]]
    if differ:

        def describe(name, shape):
            return f"{name} ({', '.join(f'{k}={v}' for k, v in shape.items() if v is not None)})"

        raise ValueError(
            f"{path} was trained on {describe(saved_data.get('name', '?'), theirs)}, but this run "
            f"uses dataset={describe(cfg.dataset.get('name'), ours)}: {', '.join(differ)} differ. "
            + (
                "Leave dataset=... out to evaluate on the checkpoint's dataset, or pick one of the same shape"
                if evaluate
                else "Fine-tune on a dataset of the same shape"
            )
        )
    if "model" not in explicit:  # `model=<name>` picks another architecture on purpose
        model = OmegaConf.create(saved_model)
        for key in sorted(k for k in explicit if k.startswith("model.")):
            OmegaConf.update(model, key[len("model.") :], OmegaConf.select(cfg, key), merge=False)
        cfg.model = model
    saved_T = (saved.get("engine") or {}).get("T")
    if saved_T is not None and "engine.T" not in explicit and evaluate:
        cfg.engine.T = saved_T
    return cfg


class AlreadyCompleted(Exception):
    """``resume=auto`` in the directory of a completed run (a relaunched sweep): nothing to do."""

    def __init__(self, message: str, record: dict):
        super().__init__(message)
        self.record = record


def prepare_resume(cfg: DictConfig, overrides: list[str]) -> tuple[DictConfig, Path, dict | None]:
    """For ``resume=``: the run directory to continue, its checkpoint, and its config. Every refusal
    happens here, before anything is written (the run's status stays as it was)."""
    resume, run_dir = cfg.get("resume"), Path(cfg.paths.output_dir)
    if not resume:
        return cfg, run_dir, None
    if resume == "auto":  # e.g. a requeued Slurm job: continue if this run dir has a checkpoint
        if not (run_dir / "last.pt").is_file():
            if RunStatus(run_dir).read().get("status") == "completed":  # save_checkpoint=false
                records = [r for r in MetricsFile(run_dir).records() if "epoch" in r]
                raise AlreadyCompleted(
                    f"resume=auto: {run_dir} already completed; nothing to do",
                    records[-1] if records else {},
                )
            return cfg, run_dir, None
        path = run_dir / "last.pt"
    else:
        path = find_resume_checkpoint(resume, cfg.paths.log_dir)
    checkpoint = read_checkpoint(path)
    if checkpoint.get("format") != TRAIN_FORMAT:
        raise ValueError(
            f"{path} is not a bso training checkpoint ({TRAIN_FORMAT}); "
            "resume needs the last.pt of a run"
        )
    cfg = config_for_resume(cfg, checkpoint["config"], overrides, path)
    if checkpoint["epoch"] >= cfg.dataset.epochs:
        status = RunStatus(path.parent).read()
        if resume == "auto" and status.get("status") == "completed":
            records = [r for r in MetricsFile(path.parent).records() if "epoch" in r]
            record = records[-1] if records else checkpoint.get("record") or {}
            raise AlreadyCompleted(
                f"resume=auto: {path.parent} already completed {checkpoint['epoch']} epochs; "
                "nothing to do",
                record,
            )
        raise ValueError(
            f"{path}: the run already finished {checkpoint['epoch']} epochs (dataset.epochs="
            f"{cfg.dataset.epochs}); pass a larger dataset.epochs=... to train it longer"
        )
    check_world_size(checkpoint, path)
    return cfg, path.parent, checkpoint


def check_world_size(checkpoint: dict, path: Path) -> None:
    """A checkpoint taken in the middle of an epoch continues only with the processes that wrote
    it (the epoch's data shards belong to the ranks); at an epoch boundary another number of
    processes is allowed, with a warning: the global batch (and so the results) change."""
    env = distributed.torchrun_env()
    world = env["world_size"] if env else 1
    saved = len(checkpoint["rng"])
    if saved == world:
        return
    if any(tally.batches for tally in checkpoint["tally"]):
        from bso.rundir import resume_command

        raise ValueError(
            f"{path} was written by {saved} process(es) in the middle of an epoch and this run has "
            f"{world}; resume it with: {resume_command(path.parent, saved)}"
        )
    if env is None or env["rank"] == 0:
        batch = (checkpoint.get("config") or {}).get("dataset", {}).get("batch_size", "?")
        log.warning(
            f"{path} was trained by {saved} process(es), this run has {world}: the global batch "
            f"changes from {saved} x {batch} to {world} x {batch}, so the continued run differs "
            "from one that kept its world size"
        )


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
