"""One training run from a composed config (:func:`train`, train.py) and one evaluation of a saved
model (:func:`evaluate_checkpoint`, eval.py): refuse what would fail (:mod:`bso.preflight`), take the
run directory (:mod:`bso.rundir`, :mod:`bso.runlock`), build the run and call the epoch loop
(:func:`bso.loop.fit`), and record what became of it in ``status.json``.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import sys
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from bso import distributed, fastpath, rundir
from bso.build import build_model, load_weights, seed_everything
from bso.data import build_dataloaders
from bso.divergence import RunDiverged
from bso.engine import evaluate
from bso.loggers import NullLogger
from bso.loop import Run, Schedules, fit, restore_exports
from bso.metrics.snn import counter_for  # firing rates, SOPs, energy on the test set
from bso.models import model_size
from bso.optim import build_optimizer
from bso.preflight import Admitted, AlreadyCompleted, admit, command_line_overrides
from bso.resolvers import hydra_subdir_used
from bso.resume import GracefulInterrupt, Progress, RunInterrupted, restore
from bso.rundir import MetricsFile, RunStatus, write_run_info
from bso.runlock import RunLock

log = logging.getLogger(__name__)


def train(cfg: DictConfig, overrides: list[str] | None = None) -> dict:
    """Train ``cfg.model`` on ``cfg.dataset`` with ``cfg.optimizer`` and ``cfg.engine``; returns the
    last epoch's metrics record. ``overrides`` are the command line's (read from Hydra if None).

    The run directory's ``status.json`` says what became of the run: ``running`` while it trains,
    then ``completed``, ``failed`` (with the error), ``interrupted`` (resume it with ``resume=``) or
    ``diverged`` (non-finite loss or weights; epoch and batch). A command refused before any work
    (a bad value, a directory that holds another run or is in use, a resume that does not fit)
    raises without touching the run directory (:mod:`bso.preflight`).
    Under torchrun every rank runs this; rank 0 alone writes the run directory, checkpoints and wandb
    (:mod:`bso.distributed`; in one process all of that is a no-op)."""
    return _start(cfg, overrides, _train, evaluating=False)


def evaluate_checkpoint(cfg: DictConfig, overrides: list[str] | None = None) -> dict:
    """``eval.py checkpoint=...`` (configs/eval.yaml): the test-set metrics of a saved model (a run's
    ``best.pt`` / ``last.pt`` or a 1-bit export), no training; returns the record it writes to the
    evaluation's ``metrics.jsonl``. The model and T are the checkpoint's, and so is the dataset
    unless the command line names one (:func:`bso.preflight.config_for_weights`); a checkpoint that
    does not fit is refused before any work. Under torchrun each rank evaluates a shard of the test
    set; rank 0 writes."""
    return _start(cfg, overrides, _evaluate, evaluating=True)


def _start(cfg: DictConfig, overrides: list[str] | None, job, evaluating: bool) -> dict:
    """Everything that can refuse the command (:func:`bso.preflight.admit`, the lock, the claim of
    the run directory), then ``job`` in its run directory. A refusal leaves no trace: the directory
    Hydra made for the command is removed and an existing run's files are untouched."""
    overrides = command_line_overrides() if overrides is None else list(overrides)
    sizes = rundir.log_sizes()  # a refusal takes its lines out of an existing run's log
    hydra_dir = Path(cfg.paths.output_dir)  # what Hydra made for this command (rank > 0: temp dir)
    env = distributed.torchrun_env()
    main_rank = env is None or env["rank"] == 0
    lock = None
    try:
        admitted = admit(cfg, overrides, evaluating, env)
        lock = RunLock(
            admitted.run_dir, enabled=main_rank
        ).acquire()  # one process per run directory
        if admitted.checkpoint is None and main_rank:
            rundir.claim(
                admitted.run_dir,
                overwrite=bool(admitted.cfg.get("overwrite"))
                or _restart_allowed(admitted.cfg, admitted.run_dir),
                hydra_subdir=hydra_subdir_used(),
                reason="overwrite=true"
                if admitted.cfg.get("overwrite")
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
        return _run(job, admitted, hydra_dir)
    finally:
        lock.release()


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


def _run(job, admitted: Admitted, hydra_dir: Path) -> dict:
    """``job`` (:func:`_train` or :func:`_evaluate`) with the process group set up, and the run's
    final status written whatever happens."""
    cfg = admitted.cfg
    dist = distributed.setup(
        cfg.device, backend=cfg.distributed.backend, timeout_min=cfg.distributed.timeout_min
    )
    if not dist.is_main and hydra_dir.name.startswith("bso-rank"):
        dist.temp_dirs.append(hydra_dir)  # rank > 0's throwaway Hydra directory, removed at the end
    run_dir = distributed.agree_on_run_dir(dist, admitted.run_dir)
    status = RunStatus(run_dir, enabled=dist.is_main)
    try:
        record = job(admitted, run_dir, status, dist)
    except (RunInterrupted, KeyboardInterrupt) as err:
        state = _record_status(status, "interrupted", error=str(err) or "KeyboardInterrupt")
        if dist.is_main:
            log.error(
                f"interrupted after epoch {state.get('epoch', 0)}; "
                + (
                    f"resume with: {rundir.resume_command(run_dir, dist.world_size)}"
                    if (run_dir / rundir.LAST).is_file()
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
                if (run_dir / rundir.LAST).is_file()
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


def describe(err: BaseException) -> str:
    """``err``'s message on one line (an OSError bso raised: without its ``[Errno N]``)."""
    text = str(err)
    if isinstance(err, OSError) and err.strerror and err.filename is None:
        text = err.strerror
    return " ".join(text.split())


def _train(admitted: Admitted, run_dir: Path, status: RunStatus, dist) -> dict:
    """Build the run (model, fast path, optimizers, schedules, data, a resumed run's state, logger)
    and train it (:func:`bso.loop.fit`)."""
    cfg, checkpoint = admitted.cfg, admitted.checkpoint
    status.write("running", epochs=int(cfg.dataset.epochs), error=None)
    seed_everything(cfg.seed)
    device = dist.device
    weights_from = cfg.get("init_from")
    blob, saved = admitted.weights or (None, None)

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
    optimizer = build_optimizer(model, cfg.optimizer, cfg.backend)
    schedules = Schedules(optimizer, cfg.optimizer, epochs)
    train_loader, test_loader = build_dataloaders(
        cfg.dataset,
        seed=cfg.seed,
        rank=dist.rank,
        world_size=dist.world_size,
        datasets=admitted.datasets,
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


def _evaluate(admitted: Admitted, run_dir: Path, status: RunStatus, dist) -> dict:
    """The test-set metrics of ``cfg.checkpoint`` (read as ``admitted.weights``), one record."""
    cfg = admitted.cfg
    status.write("running", evaluating=str(cfg.checkpoint), error=None)
    seed_everything(cfg.seed)
    blob, saved = admitted.weights
    model, engine = build_model(cfg, dist.device)
    load_weights(model, cfg.checkpoint, blob, saved, cfg)
    _, test_loader = build_dataloaders(
        cfg.dataset,
        seed=cfg.seed,
        rank=dist.rank,
        world_size=dist.world_size,
        datasets=admitted.datasets,
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
