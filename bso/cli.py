"""Console scripts of the installed package: ``bso-train`` and ``bso-eval`` (this module) and
``bso-report`` (:mod:`bso.report.cli`).

``bso-train [group=option ...] [key=value ...]`` is ``python train.py`` and ``bso-eval
checkpoint=<path> [...]`` is ``python eval.py`` from any directory: the same Hydra entry points over
the configs shipped in the package, writing under ``./outputs`` of the current directory
(:func:`bso.configs_path.config_dir` finds the configs).
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import math
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from bso import distributed
from bso.configs_path import config_dir, visible_options
from bso.data.errors import DataError
from bso.resolvers import register_resolvers
from bso.rundir import RunRefused, hydra_value
from bso.train import RunDiverged, RunInterrupted, describe, evaluate_checkpoint
from bso.train import train as run_training
from bso.validate import ConfigError

log = logging.getLogger(__name__)

# the configs of every entry point read them (train.py and eval.py import this module, and so does
# a worker of Hydra's joblib launcher, which composes its job's config before calling it)
register_resolvers()


def run(cfg: DictConfig, task: Callable[[DictConfig], dict] = run_training) -> float:
    """Run ``task`` (training, or :func:`bso.train.evaluate_checkpoint`) on ``cfg``; returns the
    test top-1 accuracy (for Hydra sweepers).

    Exit status: 0 done (or, with resume=auto, already done), 1 refused or failed (one ``error:``
    line; HYDRA_FULL_ERROR=1 shows the traceback), 3 diverged, 130 interrupted (resume it as the
    log says)."""
    logging.raiseExceptions = False  # a full disk under train.log: no "--- Logging error ---" dumps
    try:
        return task(cfg).get("test/acc1", math.nan)  # nan: a skipped finished job
    except (RunInterrupted, KeyboardInterrupt):  # the run logged how to resume it
        sys.exit(130)
    except RunDiverged:  # the run logged where (status.json: diverged)
        sys.exit(3)
    except Exception as err:
        if not user_error(err):
            raise
        sys.exit(1)  # user_error logged it (once, on rank 0 under torchrun)


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


HYDRA_FLAGS_WITHOUT_A_RUN = ("--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "-i")


def check_command_line(entry: str, argv: list[str] | None = None) -> None:
    """Before Hydra parses the command line: an option no config group has (``dataset=cifar11``), a
    key the config lacks (``engine.Tt=4``) and any other composition error end the command with one
    ``error:`` line on stderr (exit status 1) that lists the valid options or keys, before Hydra
    creates any directory. ``HYDRA_FULL_ERROR=1`` leaves composition errors to Hydra (its full
    trace)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if os.environ.get("HYDRA_FULL_ERROR") == "1" or any(
        a.split("=")[0] in HYDRA_FLAGS_WITHOUT_A_RUN or a.startswith("--shell") for a in argv
    ):
        return
    cfg, message = compose_command_line(argv, "train" if entry == "train" else "eval")
    message = message or unwritable_log_dir(cfg, argv)
    if message:
        raise SystemExit(f"error: {message}")


def unwritable_log_dir(cfg: DictConfig, argv: list[str] = ()) -> str | None:
    """Where the command would write (``paths.log_dir``, ``hydra.run.dir`` / ``hydra.sweep.dir``
    when the command line sets them, or the run directory ``resume=`` names) when it cannot be
    written (a read-only disk, no permission); None when it can."""
    targets = []
    for key in ("paths.log_dir", "resume"):
        value = OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)
        if value and value not in ("auto", "latest") and "${" not in str(value):
            targets.append((key, str(value)))
    for item in argv:
        key, _, value = item.lstrip("+").partition("=")
        if key in ("hydra.run.dir", "hydra.sweep.dir") and value and "${" not in value:
            targets.append((key, value.strip("'\"")))
    for key, value in targets:
        path = Path(value)
        if key == "resume" and path.is_file():
            path = path.parent
        existing = next((p for p in (path, *path.parents) if p.exists()), None)
        if existing is not None and not os.access(existing, os.W_OK):
            return (
                f"{key}={value}: {existing} cannot be written (a read-only disk or no permission); "
                + (
                    "copy the run to a writable place and resume it there"
                    if key == "resume"
                    else f"set {key}=<a writable directory>"
                )
            )
    return None


def _expand(argv: list[str]) -> tuple[list[str], str | None]:
    """The overrides of ``argv`` with each sweep reduced to one value (the first), and every value of
    the group sweeps as extra compositions' overrides; or an error message."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    multirun = any(a in ("-m", "--multirun") for a in argv)
    items = [a for a in argv if not a.startswith("-")]
    try:
        parsed = OverridesParser.create().parse_overrides(items)
    except HydraException as err:
        return [], _one_line(str(err))
    overrides = []
    for item, override in zip(items, parsed, strict=True):
        if not override.is_sweep_override():
            overrides.append(item)
            continue
        if not multirun:
            return [], (
                f"{item} sweeps over several values: add -m (--multirun) to run one job per value, "
                "or give one value"
            )
        values = list(override.sweep_string_iterator())
        key = override.get_key_element()
        overrides.append(f"{key}={hydra_value(values[0])}" if values else item)
    return overrides, None


def _group_sweeps(argv: list[str]) -> list[list[str]]:
    """For ``-m dataset=a,b``: ``[[dataset=b]]``, one more composition per further group option."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    groups = {p.relative_to(config_dir()).as_posix() for p in config_dir().rglob("*") if p.is_dir()}
    items = [a for a in argv if not a.startswith("-")]
    extra = []
    for override in OverridesParser.create().parse_overrides(items):
        if override.is_sweep_override() and override.key_or_group in groups:
            key = override.get_key_element()
            extra += [[f"{key}={v}"] for v in list(override.sweep_string_iterator())[1:]]
    return extra


def compose_command_line(
    argv: list[str], config_name: str = "train"
) -> tuple[DictConfig | None, str | None]:
    """``config_name`` composed with the command line ``argv`` (sweeps: each group option, the first
    value of the rest): (the config, None), or (None, what is wrong as one line)."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from bso.compose import compose_configs

    overrides, message = _expand(argv)
    if message:
        return None, message
    try:
        (cfg,) = compose_configs([overrides], config_name)
        for extra in _group_sweeps(argv):
            compose_configs([[*overrides, *extra]], config_name)
    except (HydraException, OmegaConfBaseException) as err:
        return None, _explain(err, overrides, config_name)
    return cfg, None


def _explain(err: Exception, overrides: list[str], config_name: str) -> str:
    from hydra.errors import MissingConfigException

    from bso.compose import compose_configs

    text = str(err)
    if isinstance(err, MissingConfigException) and err.missing_cfg_file:
        group, _, name = err.missing_cfg_file.rpartition("/")
        where = re.match(r"In '([^']+)'", text)
        given = any(o.lstrip("+~").split("=")[0] in (group, f"/{group}") for o in overrides)
        head = f"{group}={name}"
        if not given:  # a defaults list names it
            head = f"configs/{where.group(1) if where else config_name}.yaml selects {head}"
        options = visible_options(err.options or [])
        return (
            f"{head}: configs/{group}/ has no option {name}"
            + (f"; choose one of: {', '.join(options)}" if options else "")
            + (
                f" (did you mean {group}={close[0]}?)"
                if (close := difflib.get_close_matches(name, options, 1))
                else ""
            )
        )
    unknown = re.match(r"Could not (?:override|delete from config\.) '([^']+)'", text)
    if unknown:
        key = unknown.group(1)
        rest = [o for o in overrides if o.lstrip("+~").split("=")[0] != key]
        item = next((o for o in overrides if o.lstrip("+~").split("=")[0] == key), key)
        try:
            (cfg,) = compose_configs([rest], config_name)
        except Exception:  # noqa: BLE001 - another override fails too: Hydra's first line
            cfg = None
        if cfg is not None:
            return f"{item}: {_missing_key(cfg, key)}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    lines = [line for line in lines if "HYDRA_FULL_ERROR" not in line and "provider=" not in line]
    return _one_line(" ".join(lines)) + " (HYDRA_FULL_ERROR=1 shows Hydra's full message)"


def _missing_key(cfg: DictConfig, key: str) -> str:
    """Why ``key`` is not in ``cfg``, with the keys its closest existing parent has."""
    parts = key.split(".")
    depth = len(parts) - 1
    while depth > 0 and not isinstance(OmegaConf.select(cfg, ".".join(parts[:depth])), DictConfig):
        depth -= 1
    parent = ".".join(parts[:depth])
    node = OmegaConf.select(cfg, parent) if parent else cfg
    keys = sorted(str(k) for k in node.keys() if k not in ("_target_", "hydra"))
    full = [f"{parent}.{k}" if parent else k for k in keys]
    close = difflib.get_close_matches(key, full, n=2, cutoff=0.6)
    return (
        f"{parent or 'the config'} has no key {parts[depth]}"
        + (f" (did you mean {' or '.join(close)}?)" if close else "")
        + f"; its keys: {', '.join(keys)}"
    )


def _one_line(text: str) -> str:
    return " ".join(text.split())


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
def _train(cfg: DictConfig) -> float:
    return run(cfg)


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="eval")
def _evaluate(cfg: DictConfig) -> float:
    return run(cfg, evaluate_checkpoint)


def train() -> None:
    """``bso-train``: train a binary spiking network (``bso-train --help`` lists the configs)."""
    check_command_line("train")
    _train()


def evaluate() -> None:
    """``bso-eval checkpoint=<path>``: a saved model's test-set metrics (configs/eval.yaml)."""
    check_command_line("eval")
    _evaluate()
