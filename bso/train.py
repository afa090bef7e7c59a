"""One training run from a composed config: build, train epoch by epoch, log, checkpoint
(:func:`train`, train.py); and one evaluation of a saved model (:func:`evaluate_checkpoint`, eval.py).

The epoch loop is :func:`fit`; around it, :mod:`bso.resume` (what a checkpoint restores, resumed
configs, signals), :mod:`bso.run` (the run directory and its status), :mod:`bso.checkpoint` (files)
and :mod:`bso.distributed` (torchrun) keep the loop short.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.optim.lr_scheduler import CosineAnnealingLR
from tqdm.auto import tqdm

from bso import distributed, fastpath, rundir
from bso.checkpoint import (
    TRAIN_FORMAT,
    copy_atomic,
    export_1bit,
    load_checkpoint,
    read_checkpoint,
    save_atomic,
)
from bso.data import build_dataloaders, build_datasets, input_shape, start_epoch
from bso.data.errors import DataError
from bso.divergence import FiniteCheck, RunDiverged
from bso.engine import EpochTally, evaluate
from bso.loggers import NullLogger
from bso.metrics.memory import (
    PERSISTENT_ROLES,
    cuda_peak_bytes,
    peak_rss_bytes,
    persistent_state_bytes,
    reset_cuda_peak,
)
from bso.metrics.snn import counter_for  # firing rates, SOPs, energy on the test set
from bso.models import model_size
from bso.neurons import reset_neurons
from bso.optim import build_optimizer
from bso.resume import (
    AlreadyCompleted,
    GracefulInterrupt,
    Progress,
    RunInterrupted,
    command_line_overrides,
    config_for_weights,
    prepare_resume,
    restore,
    rng_state,
)
from bso.run import MetricsFile, RunStatus, hydra_subdir_used, write_run_info
from bso.rundir import RunLock, RunRefused
from bso.validate import ConfigError, validate

log = logging.getLogger(__name__)

LR_SCHEDULES = ("cosine", "constant")
MB = 1e6


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


def build_model(cfg: DictConfig, device: torch.device):
    model = _instantiate(cfg, "model").to(device)
    engine = _instantiate(cfg, "engine")
    engine.prepare(model)
    return model, engine


def _instantiate(cfg: DictConfig, key: str, **kwargs):
    """``instantiate(cfg.<key>)``; a constructor that refuses its arguments raises ConfigError with
    the constructor's own message (Hydra's InstantiationException wraps it in several lines)."""
    from hydra.errors import InstantiationException

    try:
        return instantiate(cfg[key], **kwargs)
    except InstantiationException as err:
        cause = err.__cause__ or err
        text = str(cause) if isinstance(cause, ValueError) else f"{type(cause).__name__}: {cause}"
        raise ConfigError(f"{key} ({cfg[key].get('_target_')}): {text}") from err


def load_weights(model, path, blob: dict, saved: dict | None, cfg: DictConfig) -> dict:
    """Load ``path`` (read as ``blob``) into ``model`` with an error that names the checkpoint's
    model and this one."""
    try:
        return load_checkpoint(model, path, blob)
    except ValueError as err:
        theirs = (saved or {}).get("model", {})
        held = (
            f"{theirs.get('name', '?')} ({theirs.get('_target_', '?')}, layers="
            f"{theirs.get('layers', '-')}, weights={theirs.get('weights', '?')})"
        )
        built = (
            f"{cfg.model.get('name')} ({cfg.model._target_}, layers={cfg.model.get('layers', '-')}, "
            f"weights={cfg.model.weights})"
        )
        if held == built:  # the same model: the file's weights are not what its config says
            raise ValueError(
                f"{path} says it holds model {held}, but its weights do not fit that model: the file "
                f"is damaged or was changed; use another checkpoint of the run. {err}"
            ) from err
        raise ValueError(
            f"{path} holds model {held}, but this run builds model {built}. {err}"
        ) from err


def train(cfg: DictConfig, overrides: list[str] | None = None) -> dict:
    """Train ``cfg.model`` on ``cfg.dataset`` with ``cfg.optimizer`` and ``cfg.engine``; returns the
    last epoch's metrics record. ``overrides`` are the command line's (read from Hydra if None).

    The run directory's ``status.json`` says what became of the run: ``running`` while it trains,
    then ``completed``, ``failed`` (with the error), ``interrupted`` (resume it with ``resume=``) or
    ``diverged`` (non-finite loss or weights; epoch and batch). A command refused before any work
    (a bad value, a directory that holds another run or is in use, a resume that does not fit)
    raises without touching the run directory (:mod:`bso.rundir`, :mod:`bso.validate`).
    Under torchrun every rank runs this; rank 0 alone writes the run directory, checkpoints and wandb
    (:mod:`bso.distributed`; in one process all of that is a no-op)."""
    return _start(cfg, overrides, _train, evaluating=False)


def evaluate_checkpoint(cfg: DictConfig, overrides: list[str] | None = None) -> dict:
    """``eval.py checkpoint=...`` (configs/eval.yaml): the test-set metrics of a saved model (a run's
    ``best.pt`` / ``last.pt`` or a 1-bit export), no training; returns the record it writes to the
    evaluation's ``metrics.jsonl``. The model and T are the checkpoint's, and so is the dataset
    unless the command line names one (:func:`bso.resume.config_for_weights`); a checkpoint that
    does not fit is refused before any work. Under torchrun each rank evaluates a shard of the test
    set; rank 0 writes."""
    return _start(cfg, overrides, _evaluate, evaluating=True)


def _start(cfg: DictConfig, overrides: list[str] | None, job, evaluating: bool) -> dict:
    """Everything that can refuse the command (:func:`preflight`), then ``job`` in its run
    directory. A refusal leaves no trace: the directory Hydra made for the command is removed and an
    existing run's files are untouched."""
    overrides = command_line_overrides() if overrides is None else list(overrides)
    sizes = rundir.log_sizes()  # a refusal takes its lines out of an existing run's log
    hydra_dir = Path(
        cfg.paths.output_dir
    )  # what Hydra made for this command (rank > 0: a temp dir)
    env = distributed.torchrun_env()
    main_rank = env is None or env["rank"] == 0
    lock = None
    try:
        cfg = validate(cfg, overrides)
        if evaluating:
            checkpoint, weights_from = None, _checkpoint_to_evaluate(cfg)
            run_dir = hydra_dir
        else:
            cfg, run_dir, checkpoint = prepare_resume(
                cfg, overrides
            )  # refusals leave the run untouched
            weights_from = cfg.get("init_from")
        weights = None
        if (
            weights_from and checkpoint is None
        ):  # evaluation / fine-tuning: does the checkpoint fit?
            blob = read_checkpoint(weights_from)
            saved = blob.get("config") or (
                {"model": blob["model_config"]} if "model_config" in blob else None
            )
            cfg = config_for_weights(cfg, saved, overrides, weights_from, evaluate=evaluating)
            weights = (blob, saved)
        datasets = preflight(cfg, checkpoint, weights, evaluating, env)
        lock = RunLock(run_dir, enabled=main_rank).acquire()  # one live process per run directory
        if checkpoint is None and main_rank:
            restart = _restart_allowed(cfg, run_dir)
            rundir.claim(
                run_dir,
                overwrite=bool(cfg.get("overwrite")) or restart,
                hydra_subdir=hydra_subdir_used(),
                reason="overwrite=true"
                if cfg.get("overwrite")
                else "resume=auto and no checkpoint to continue from",
            )
    except AlreadyCompleted as done:  # a relaunched sweep: this job finished before
        log.info(f"{done}; skipping")
        _discard(hydra_dir, main_rank, sizes)
        return done.record
    except BaseException:
        if lock is not None:
            lock.release()
        _discard(hydra_dir, main_rank, sizes)
        raise
    try:
        return _run(cfg, job, run_dir, checkpoint, hydra_dir, weights, datasets)
    finally:
        lock.release()


@contextlib.contextmanager
def _quiet():
    """No info lines while :func:`preflight` builds a throwaway model (the run logs its own)."""
    logging.disable(logging.INFO)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def preflight(cfg: DictConfig, checkpoint: dict | None, weights, evaluating: bool, env) -> tuple:
    """What would make the run fail in its first seconds, decided before its directory is claimed:
    the device, ``dataset.epochs``, the model, engine and optimizers the config builds (impossible
    combinations raise here), whether the checkpoint's weights fit that model, whether the model
    takes the dataset's input (one sample, one time step, on the CPU: a too-small input for the
    architecture), and the data itself (missing or unreadable files). Returns the (training, test)
    datasets, which the run then uses."""
    try:
        distributed.resolve_device(str(cfg.device), env["local_rank"] if env else 0)
    except (ValueError, RuntimeError) as err:
        raise ConfigError(str(err)) from None
    if not evaluating and int(cfg.dataset.epochs) < 1:
        raise ConfigError(
            f"dataset.epochs must be >= 1 to train, got {cfg.dataset.epochs} "
            "(python eval.py checkpoint=... evaluates a saved model without training)"
        )
    cpu = torch.device("cpu")
    with _quiet():
        model, engine = build_model(cfg, cpu)
        if weights is not None:
            load_weights(model, cfg.get("checkpoint") or cfg.get("init_from"), *weights, cfg)
        if checkpoint is not None:
            load_weights(model, cfg.resume, checkpoint, checkpoint.get("config"), cfg)
        if not evaluating:
            Schedules(build_optimizer(model, cfg.optimizer), cfg.optimizer, int(cfg.dataset.epochs))
    check_input_fits(model, cfg)
    del model, engine
    try:
        return build_datasets(cfg.dataset)
    except DataError as err:
        raise ConfigError(str(err)) from err


def check_input_fits(model: torch.nn.Module, cfg: DictConfig) -> None:
    """One time step of two samples of the dataset's input shape through ``model`` (no gradients,
    evaluation mode): an input too small for the architecture (``model=resnet18 dataset=digits``)
    raises ConfigError here instead of in the first training step."""
    shape = input_shape(cfg.dataset)
    if shape is None:
        return
    model.eval()
    reset_neurons(model)
    try:
        with torch.no_grad():
            model(torch.zeros(2, *shape))
    except RuntimeError as err:
        detail = str(err).strip().splitlines()[0]
        name, dataset = cfg.model.get("name"), cfg.dataset.get("name")
        raise ConfigError(
            f"model={name} does not take dataset={dataset}'s input ({shape[0]} x {shape[1]} x "
            f"{shape[2]} per time step): {detail}. Pick a model made for this input (leave model= "
            f"out for the dataset's own) or a dataset of the size the model expects"
        ) from None
    finally:
        reset_neurons(model)


EVAL_CHOICES = ("best.pt", "last.pt", "best_1bit.pt", "last_1bit.pt")


def _checkpoint_to_evaluate(cfg: DictConfig) -> str:
    """``checkpoint=``: a checkpoint file, or a run directory (its best.pt, else last.pt, else a
    1-bit export)."""
    command = "bso-eval" if Path(sys.argv[0]).name == "bso-eval" else "python eval.py"
    if OmegaConf.is_missing(cfg, "checkpoint") or not cfg.get("checkpoint"):
        raise ConfigError(
            f"{command} needs checkpoint=<a run directory, its best.pt or last.pt, or a *_1bit.pt "
            f"export>, e.g. {command} checkpoint=outputs/runs/<run>"
        )
    path = Path(str(cfg.checkpoint))
    if path.is_dir():
        found = [path / name for name in EVAL_CHOICES if (path / name).is_file()]
        if not found:
            raise ConfigError(
                f"checkpoint={path}: the directory holds none of {', '.join(EVAL_CHOICES)} (a run "
                "that stopped before its first epoch ended, or not a run directory)"
            )
        path = found[0]
        log.info(f"checkpoint={cfg.checkpoint}: evaluating {path}")
    cfg.checkpoint = str(path)
    return str(path)


def describe(err: BaseException) -> str:
    """``err``'s message on one line (an OSError bso raised: without its ``[Errno N]``)."""
    text = str(err)
    if isinstance(err, OSError) and err.strerror and err.filename is None:
        text = err.strerror
    return " ".join(text.split())


def user_error(err: BaseException) -> bool:
    """Print a user's mistake (a refused command, a bad value, a missing or unreadable file, a
    checkpoint that does not fit, a full disk) as one ``error:`` line on stderr (and in the run's
    log file, when there is one), on rank 0 only under torchrun; False for anything else (a bug
    keeps its traceback). ``HYDRA_FULL_ERROR=1`` keeps tracebacks for everything."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        return False
    if not isinstance(err, (RunRefused, ConfigError, ValueError, OSError, RunDiverged, DataError)):
        return False
    if distributed.is_main() and (distributed.torchrun_env() or {"rank": 0})["rank"] == 0:
        line = "error: " + describe(err)
        print(line, file=sys.stderr, flush=True)
        record = log.makeRecord(log.name, logging.ERROR, __file__, 0, line, None, None)
        for handler in logging.getLogger().handlers:  # the log file; the console has it already
            if isinstance(handler, logging.FileHandler):
                with contextlib.suppress(Exception):
                    handler.handle(record)
    return True


def _restart_allowed(cfg: DictConfig, run_dir: Path) -> bool:
    """``resume=auto`` without a last.pt (the job stopped before its first checkpoint): start
    afresh over its status and records, as long as it left no checkpoint at all."""
    return cfg.get("resume") == "auto" and not list(run_dir.glob("*.pt"))


def _discard(hydra_dir: Path, main_rank: bool, sizes: dict | None = None) -> None:
    """A refused command leaves nothing behind (rank > 0: its temp dir; rank 0: an empty run dir,
    or its own files in an existing one)."""
    if main_rank:
        rundir.discard_refused(hydra_dir, hydra_subdir_used(), sizes)
    elif hydra_dir.name.startswith("bso-rank"):
        shutil.rmtree(hydra_dir, ignore_errors=True)


def _run(
    cfg, job, run_dir: Path, checkpoint: dict | None, hydra_dir: Path, weights, datasets
) -> dict:
    """``job`` (:func:`_train` or :func:`_evaluate`) with the process group set up, and the run's
    final status written whatever happens."""
    dist = distributed.setup(
        cfg.device, backend=cfg.distributed.backend, timeout_min=cfg.distributed.timeout_min
    )
    if not dist.is_main and hydra_dir.name.startswith("bso-rank"):
        dist.temp_dirs.append(hydra_dir)  # rank > 0's throwaway Hydra directory, removed at the end
    run_dir = distributed.agree_on_run_dir(dist, run_dir)
    status = RunStatus(run_dir, enabled=dist.is_main)
    try:
        record = job(cfg, run_dir, status, checkpoint, dist, weights, datasets)
    except (RunInterrupted, KeyboardInterrupt) as err:
        state = _record_status(status, "interrupted", error=str(err) or "KeyboardInterrupt")
        if dist.is_main:
            log.error(
                f"interrupted after epoch {state.get('epoch', 0)}; "
                + (
                    f"resume with: {rundir.resume_command(run_dir, dist.world_size)}"
                    if (run_dir / "last.pt").is_file()
                    else "no checkpoint was written (the first epoch had not finished)"
                )
            )
        distributed.cleanup(dist, barrier=False)
        raise
    except RunDiverged as err:
        _record_status(
            status, "diverged", error=str(err), diverged_epoch=err.epoch, diverged_batch=err.batch
        )
        if dist.is_main:
            kept = (
                "last.pt and best.pt hold the last finite epoch"
                if (run_dir / "last.pt").is_file()
                else "no checkpoint was written"
            )
            log.error(f"diverged: {err} (status.json: diverged; {kept})")
        distributed.cleanup(dist, barrier=False)
        raise
    except BaseException as err:
        _record_status(
            status,
            "failed",
            error=f"{type(err).__name__}: {err}",
            said=str(status.path) in str(err),  # the error is the status write itself
        )
        distributed.cleanup(dist, barrier=False)
        raise
    distributed.cleanup(dist)
    return record


def _record_status(status: RunStatus, state: str, said: bool = False, **fields) -> dict:
    """Write the final status; when even that fails (a full disk), say so on stderr (unless
    ``said``: the error that ended the run was that write)."""
    if len(str(fields.get("error") or "")) > 2000:  # status.json stays small (one disk block)
        fields["error"] = str(fields["error"])[:2000] + " ..."
    try:
        return status.write(state, **fields)
    except OSError as err:
        if not said:
            print(
                f"warning: {describe(err)}; the run ended {state} but its status.json could not "
                "say so",
                file=sys.stderr,
                flush=True,
            )
        with contextlib.suppress(OSError, ValueError):
            return {**status.read(), "status": state, **fields} if status.enabled else {}
        return {"status": state, **fields}


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
        save_atomic(blob, self.run_dir / "last.pt")
        export_1bit(
            self.model,
            self.run_dir / "last_1bit.pt",
            config=config,
            model_config=config["model"],
            epoch=progress.epoch,
        )
        if best:  # the same files: copied, not serialised again
            for name in ("", "_1bit"):
                copy_atomic(self.run_dir / f"last{name}.pt", self.run_dir / f"best{name}.pt")


def _train(
    cfg, run_dir: Path, status: RunStatus, checkpoint: dict | None, dist, weights, datasets=None
) -> dict:
    status.write("running", epochs=int(cfg.dataset.epochs), error=None)
    seed_everything(cfg.seed)
    device = dist.device
    weights_from = cfg.get("init_from")
    blob, saved = weights or (None, None)

    # Build everything that can reject the config before any data is read.
    model, engine = build_model(cfg, device)
    epochs = int(cfg.dataset.epochs)
    if weights_from and checkpoint is None:  # e.g. ImageNet fine-tuning at T=4 from T=1
        load_weights(model, weights_from, blob, saved, cfg)
    # fast path (channels_last, cudnn.benchmark, compile, autocast), then DDP under torchrun
    train_model = distributed.wrap_model(
        fastpath.apply(model, cfg.fast, device), dist, cfg.distributed.sync_batchnorm
    )
    if dist.enabled:  # the same init on every rank above; augmentation differs per rank
        seed_everything(cfg.seed + dist.rank)
    optimizer = build_optimizer(model, cfg.optimizer)
    schedules = Schedules(optimizer, cfg.optimizer, epochs)
    train_loader, test_loader = build_dataloaders(
        cfg.dataset, seed=cfg.seed, rank=dist.rank, world_size=dist.world_size, datasets=datasets
    )

    progress = Progress()
    if checkpoint is not None:
        progress = restore(checkpoint, model, optimizer, schedules, dist)
        if dist.is_main:  # drop records after the checkpoint; re-create its own if it was lost
            MetricsFile(run_dir).truncate_after(progress.epoch, checkpoint.get("record"))
            if not progress.tally.batches and cfg.save_checkpoint:
                restore_exports(run_dir, model, progress, cfg)
        log.info(
            f"resuming {run_dir} after epoch {progress.epoch}"
            + (f" and {progress.tally.batches} batches" if progress.tally.batches else "")
        )

    size = model_size(model)
    run_config = {**OmegaConf.to_container(cfg, resolve=True), "model_size": size.as_dict()}
    if dist.is_main:
        write_run_info(
            run_dir,
            cfg,
            device,
            {
                "model_size": size.as_dict(),
                "model": cfg.model.get("name"),
                "world_size": dist.world_size,
            },
        )
    make_logger = instantiate(cfg.logger, _partial_=True) if dist.is_main else NullLogger
    logger = make_logger(
        run_dir=run_dir,
        run_config=run_config,
        run_id=checkpoint.get("wandb_id") if checkpoint else None,
    )
    status.write("running", epoch=progress.epoch, wandb_id=logger.run_id)
    log.info(
        f"{cfg.model.get('name')} ({type(model).__name__}, {cfg.model.weights} weights): {size}\n"
        f"{cfg.optimizer.name} | {type(engine).__name__} T={engine.T} | {cfg.dataset.name}: "
        f"{len(train_loader.dataset)} train / {len(test_loader.dataset)} test | {device} | "
        f"run dir {run_dir}" + (f" | {dist.world_size} processes" if dist.enabled else "")
    )
    run = Run(
        cfg,
        dist,
        run_dir,
        status,
        model,
        train_model,
        engine,
        optimizer,
        schedules,
        train_loader,
        test_loader,
        logger,
    )

    record: dict = {}
    outcome = "failed"
    try:
        with GracefulInterrupt() as interrupted:
            record = fit(run, progress, interrupted)
        outcome = "completed"
    except RunInterrupted:
        outcome = "interrupted"
        raise
    finally:
        logger.finish(outcome)
    status.write(
        "completed",
        epoch=progress.epoch,
        best_epoch=progress.best_epoch,
        best_test_acc1=progress.best_acc1,
    )
    log.info(
        f"final test accuracy {100 * record['test/acc1']:.2f}% after {epochs} epochs; best "
        f"{100 * progress.best_acc1:.2f}% at epoch {progress.best_epoch}; run dir {run_dir}"
    )
    return record


def restore_exports(run_dir: Path, model, progress: Progress, cfg) -> None:
    """Resuming from an epoch's ``last.pt``: write what a failed save (a full disk) may have left
    stale or missing: ``last_1bit.pt``, and ``best.pt`` / ``best_1bit.pt`` when that epoch was the
    best."""
    config = OmegaConf.to_container(cfg, resolve=True)
    export_1bit(
        model,
        run_dir / "last_1bit.pt",
        config=config,
        model_config=config["model"],
        epoch=progress.epoch,
    )
    best = run_dir / "best.pt"
    if progress.best_epoch == progress.epoch and (
        not best.is_file() or read_checkpoint(best).get("epoch") != progress.epoch
    ):
        log.warning(f"{best} did not hold the best epoch {progress.epoch}; copied from last.pt")
        for name in ("", "_1bit"):
            copy_atomic(run_dir / f"last{name}.pt", run_dir / f"best{name}.pt")


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


def _evaluate(
    cfg, run_dir: Path, status: RunStatus, checkpoint: None, dist, weights, datasets=None
) -> dict:
    """The test-set metrics of ``cfg.checkpoint`` (read as ``weights``), one record."""
    status.write("running", evaluating=str(cfg.checkpoint), error=None)
    seed_everything(cfg.seed)
    blob, saved = weights
    model, engine = build_model(cfg, dist.device)
    load_weights(model, cfg.checkpoint, blob, saved, cfg)
    _, test_loader = build_dataloaders(
        cfg.dataset, seed=cfg.seed, rank=dist.rank, world_size=dist.world_size, datasets=datasets
    )
    if dist.is_main:
        write_run_info(run_dir, cfg, dist.device, {"model_size": model_size(model).as_dict()})
    with counter_for(cfg, model, engine.T) as snn:
        metrics = evaluate(model, test_loader, engine.T, dist.device, engine.mse_weight)
    record = {
        "checkpoint": str(cfg.checkpoint),
        **{f"test/{k}": v for k, v in metrics.items()},
        **snn.record(),
    }
    MetricsFile(run_dir, enabled=dist.is_main).write(record)
    status.write("completed", evaluated=str(cfg.checkpoint))
    log.info(
        f"{cfg.checkpoint}: test loss {record['test/loss']:.4f} "
        f"acc {100 * record['test/acc1']:.2f}% (model {cfg.model.get('name')}, "
        f"{cfg.model.weights} weights, T={engine.T}, {len(test_loader.dataset)} samples)"
    )
    return record
