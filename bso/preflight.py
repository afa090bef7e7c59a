"""Everything that refuses a command, decided before its run directory is claimed and before any
work, so that a refusal leaves no trace (:func:`admit`, in this order; before Hydra runs,
:func:`bso.cli.check_command_line` has refused composition errors and an unwritable log directory):

1. the config's types, ranges and unread keys (:func:`bso.validate.validate`);
2. ``resume=``: the run to continue, its checkpoint, and a command line that changes only what a
   resumed run may change (:func:`prepare_resume`); eval.py: the checkpoint to evaluate
   (:func:`checkpoint_to_evaluate`);
3. evaluation / ``init_from``: whether the checkpoint's dataset has this run's shape
   (:func:`config_for_weights`);
4. the device, the epochs, the model, engine and optimizers the config builds, whether the
   checkpoint's weights fit the model, whether the model takes the dataset's input, and the data
   itself (:func:`check_builds`).

Then :func:`bso.train.train` takes the run directory: a second live process
(:class:`bso.runlock.RunLock`) and a fresh run in another run's directory (:func:`bso.rundir.claim`)
are its last refusals. Data-format errors are raised by the dataset code (:mod:`bso.data.errors`)
and reported here as :class:`~bso.validate.ConfigError`.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from bso import distributed
from bso.build import build_model, load_weights
from bso.checkpoint import TRAIN_FORMAT, read_checkpoint
from bso.data import IMAGE_SIZE, build_datasets, input_shape
from bso.data.errors import DataError
from bso.loop import Schedules
from bso.neurons import reset_neurons
from bso.optim import build_optimizer
from bso.rundir import (
    BEST,
    BEST_1BIT,
    LAST,
    LAST_1BIT,
    MetricsFile,
    RunStatus,
    find_resume_checkpoint,
    resume_command,
)
from bso.validate import ConfigError, validate

log = logging.getLogger(__name__)


@dataclass
class Admitted:
    """A command that passed every check: its config (typed; a resumed run's own), the run
    directory, the checkpoint it resumes (or None), the weights it evaluates or starts from
    (``(checkpoint, its config)`` or None) and the (training, test) datasets."""

    cfg: DictConfig
    run_dir: Path
    checkpoint: dict | None
    weights: tuple | None
    datasets: tuple


def admit(cfg: DictConfig, overrides: list[str], evaluating: bool, env: dict | None) -> Admitted:
    """Every check of the module docstring, in its order; the first failure raises
    (:class:`~bso.validate.ConfigError`, ValueError, OSError, :class:`AlreadyCompleted`)."""
    cfg = validate(cfg, overrides)
    if evaluating:
        checkpoint, weights_from = None, checkpoint_to_evaluate(cfg)
        run_dir = Path(cfg.paths.output_dir)
    else:
        cfg, run_dir, checkpoint = prepare_resume(cfg, overrides)
        weights_from = cfg.get("init_from")
    weights = None
    if weights_from and checkpoint is None:  # evaluation / fine-tuning: does the checkpoint fit?
        blob = read_checkpoint(weights_from)
        saved = blob.get("config") or (
            {"model": blob["model_config"]} if "model_config" in blob else None
        )
        cfg = config_for_weights(cfg, saved, overrides, weights_from, evaluate=evaluating)
        weights = (blob, saved)
    datasets = check_builds(cfg, checkpoint, weights, evaluating, env)
    return Admitted(cfg, run_dir, checkpoint, weights, datasets)


def command_line_overrides() -> list[str]:
    """The ``key=value`` overrides the user typed (empty outside a Hydra run)."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def _overridden_keys(overrides: list[str]) -> set[str]:
    return {item.split("=", 1)[0].lstrip("+~") for item in overrides}


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
        if not (run_dir / LAST).is_file():
            if RunStatus(run_dir).read().get("status") == "completed":  # save_checkpoint=false
                records = [r for r in MetricsFile(run_dir).records() if "epoch" in r]
                raise AlreadyCompleted(
                    f"resume=auto: {run_dir} already completed; nothing to do",
                    records[-1] if records else {},
                )
            return cfg, run_dir, None
        path = run_dir / LAST
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


def config_for_resume(cfg: DictConfig, saved: dict, overrides: list[str], path: Path) -> DictConfig:
    """The checkpoint's own config, with the few keys a resumed run may change taken from ``cfg``."""
    resumed = OmegaConf.create(saved)
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


def checkpoint_to_evaluate(cfg: DictConfig) -> str:
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
        choices = (BEST, LAST, BEST_1BIT, LAST_1BIT)
        found = [path / name for name in choices if (path / name).is_file()]
        if not found:
            raise ConfigError(
                f"checkpoint={path}: the directory holds none of {', '.join(choices)} (a run "
                "that stopped before its first epoch ended, or not a run directory)"
            )
        path = found[0]
        log.info(f"checkpoint={cfg.checkpoint}: evaluating {path}")
    cfg.checkpoint = str(path)
    return str(path)


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


@contextlib.contextmanager
def _quiet():
    """No info lines while :func:`check_builds` builds a throwaway model (the run logs its own)."""
    logging.disable(logging.INFO)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def check_builds(cfg: DictConfig, checkpoint: dict | None, weights, evaluating: bool, env) -> tuple:
    """What would make the run fail in its first seconds, decided before its directory is claimed:
    the device, ``dataset.epochs``, the model, engine and optimizers the config builds (impossible
    combinations raise here), whether the checkpoint's weights fit that model, whether the model
    takes the dataset's input (one sample, one time step, on the CPU: a too-small input for the
    architecture), and the data itself (missing or unreadable files). Returns the (training, test)
    datasets, which the run then uses."""
    try:
        device = distributed.resolve_device(str(cfg.device), env["local_rank"] if env else 0)
    except (ValueError, RuntimeError) as err:
        raise ConfigError(str(err)) from None
    if not evaluating and int(cfg.dataset.epochs) < 1:
        raise ConfigError(
            f"dataset.epochs must be >= 1 to train, got {cfg.dataset.epochs} "
            "(python eval.py checkpoint=... evaluates a saved model without training)"
        )
    cpu = torch.device("cpu")
    with _quiet():
        model, engine = build_model(cfg, cpu, run_on=device)
        if weights is not None:
            load_weights(model, cfg.get("checkpoint") or cfg.get("init_from"), *weights, cfg)
        if checkpoint is not None:
            load_weights(model, cfg.resume, checkpoint, checkpoint.get("config"), cfg)
        if not evaluating:
            Schedules(
                build_optimizer(model, cfg.optimizer, cfg.backend),
                cfg.optimizer,
                int(cfg.dataset.epochs),
            )
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
