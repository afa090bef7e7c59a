"""The run directory: everything needed to trust and repeat a run, and the one run that owns it.
This module names its files and writes and reads them; :mod:`bso.runlock` keeps a second process
out of it.

config.yaml      the resolved config             run_info.json   command, device, model size
environment.json the software environment: every installed distribution, the lock's hash and match,
                 git commit, Python, torch's CUDA / cuDNN, threads (bso/env.py); a resume in another
                 environment adds environment_<date>_<time>.json and says what changed
status.json      running / completed / failed / interrupted / diverged, last and best epoch
run.lock         while a process works in the directory: its pid and host (bso/runlock.py)
metrics.jsonl    one JSON record per epoch       last.pt best.pt  training checkpoints (resume from them)
train.log        the log                         last_1bit.pt best_1bit.pt  1-bit exports

Run directories are ``<log_dir>/runs/<date>_<time>_<6 hex digits>``, so two runs started in the same
second never share one. ``resume=<run dir | checkpoint | latest>`` continues a run inside its own
directory (Hydra's files of the resuming command go to ``.hydra/resume_<date>_<time>``). An
evaluation (eval.py) gets ``<log_dir>/evals/<date>_<time>_<6 hex digits>``: config.yaml,
run_info.json, status.json, metrics.jsonl (one record) and eval.log.

* :func:`claim` refuses a *fresh* run in a directory that already holds a run's files (its
  checkpoints, metrics or status): continue that run with ``resume=<dir>`` (or ``resume=auto``), pick
  another directory, or pass ``overwrite=true`` to delete the old run's files and start afresh.
* :func:`discard_refused` removes what Hydra created for a command that was refused before any
  work (an empty run directory, or the resuming command's ``.hydra/<time>`` folder).
* :func:`resume_command` prints a resume command that works when pasted: the path quoted for the
  shell and for Hydra's override grammar (multirun directory names hold ``=`` and ``,``), under
  ``torchrun --nproc_per_node=N`` when the run was distributed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import secrets
import shlex
import shutil
import sys
from datetime import datetime
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from bso.checkpoint import copy_atomic
from bso.env import describe, environment_changes

log = logging.getLogger(__name__)

# --- the files ----------------------------------------------------------------------------------

LAST, BEST = "last.pt", "best.pt"  # training checkpoints (bso.checkpoint.TRAIN_FORMAT)
LAST_1BIT, BEST_1BIT = "last_1bit.pt", "best_1bit.pt"  # their 1-bit exports
CHECKPOINTS = (LAST, BEST, LAST_1BIT, BEST_1BIT)
# a run's own files: a directory holding any of them belongs to a run
RUN_FILES = ("status.json", "metrics.jsonl", *CHECKPOINTS)
LOCK_NAME = "run.lock"
# what Hydra writes into a run directory before the run starts (the log: hydra.job.name + .log)
HYDRA_FILES = (".hydra", "train.log", "eval.log")


def new_run_name() -> str:
    """``<date>_<time>_<6 random hex digits>``: unique even for runs started in the same second."""
    return f"{datetime.now():%Y-%m-%d_%H-%M-%S}_{secrets.token_hex(3)}"


def copy_last_to_best(run_dir: Path) -> None:
    """``best.pt`` and ``best_1bit.pt`` as copies of the last epoch's files (not serialised again)."""
    for last, best in ((LAST, BEST), (LAST_1BIT, BEST_1BIT)):
        copy_atomic(run_dir / last, run_dir / best)


# --- what a run records -------------------------------------------------------------------------


def write_run_info(run_dir: Path, cfg: DictConfig, device: torch.device, extra: dict) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    info = {
        "command": sys.argv,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor(),
        **extra,
    }
    (run_dir / "run_info.json").write_text(json.dumps(info, indent=2))
    write_environment(run_dir)


def write_environment(run_dir: Path) -> Path | None:
    """``environment.json`` (:func:`bso.env.describe`). A run resumed in another environment keeps
    the first one, writes ``environment_<date>_<time>.json`` and says in one line what changed;
    None when nothing did."""
    env = describe()
    path = run_dir / "environment.json"
    if path.is_file():
        try:
            changes = environment_changes(json.loads(path.read_text()), env)
        except ValueError:
            changes = ["environment.json unreadable"]
        if not changes:
            return None
        path = run_dir / f"environment_{datetime.now():%Y-%m-%d_%H-%M-%S}.json"
        log.warning(
            "this process runs in another environment than the run started in (%s); recorded in %s",
            ", ".join(changes[:5]) + (f" and {len(changes) - 5} more" if len(changes) > 5 else ""),
            path.name,
        )
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(env, indent=2))
    os.replace(tmp, path)
    return path


class MetricsFile:
    """Appends one JSON line per record to ``<run_dir>/metrics.jsonl`` (``enabled=False``: on ranks
    other than 0 under torchrun, writes nothing)."""

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled

    def write(self, record: dict) -> None:
        """Append ``record`` and flush it to disk (fsync): an epoch's record is on disk before its
        checkpoint is written. A failed write (disk full) leaves no partial line behind."""
        if not self.enabled:
            return
        size = self.path.stat().st_size if self.path.is_file() else 0
        try:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError:
            with contextlib.suppress(OSError):
                os.truncate(self.path, size)
            raise

    def records(self) -> list[dict]:
        """The records on disk; a line cut short by a crash is skipped."""
        if not self.path.is_file():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def truncate_after(self, epoch: int, record: dict | None = None) -> None:
        """Drop the records of epochs after ``epoch`` (written after the checkpoint a run resumes
        from), so that a resumed run never records an epoch twice; ``record``: the checkpoint's own
        copy of epoch ``epoch``'s record, appended when the file lacks it (lost to a full disk)."""
        if not self.path.is_file() and record is None:
            return
        records = self.records()
        kept = [r for r in records if r.get("epoch", 0) <= epoch]
        if (
            record is not None
            and record.get("epoch") == epoch
            and not any(r.get("epoch") == epoch for r in kept)
        ):
            kept.append(record)
        lines = [json.dumps(r) for r in kept]
        on_disk = self.path.read_text().splitlines() if self.path.is_file() else []
        if lines != on_disk:
            tmp = self.path.with_name(".metrics.jsonl.tmp")
            tmp.write_text("".join(line + "\n" for line in lines))
            os.replace(tmp, self.path)


STATUSES = ("running", "completed", "failed", "interrupted", "diverged")


class RunStatus:
    """``<run_dir>/status.json``: what became of the run, rewritten atomically at every change
    (``enabled=False``: on ranks other than 0 under torchrun, only remembered, never written)."""

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.path = Path(run_dir) / "status.json"
        self.enabled = enabled
        self._record: dict = {}

    def read(self) -> dict:
        if not self.enabled:
            return dict(self._record)
        return json.loads(self.path.read_text()) if self.path.is_file() else {}

    def write(self, status: str, **fields) -> dict:
        if status not in STATUSES:
            raise ValueError(f"unknown run status {status!r}; one of {STATUSES}")
        try:
            previous = self.read()
        except ValueError:  # an unreadable status.json (cut short, garbage): replaced
            previous = {}
        record = {**previous, **fields, "status": status, "updated": _now()}
        self._record = record
        if not self.enabled:
            return record
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(".status.json.tmp")
        text = json.dumps(record, indent=2)
        try:
            with tmp.open("w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            if not self._write_in_place(text):
                raise OSError(err.errno, f"could not write {self.path}: {err.strerror}") from err
        return record

    def _write_in_place(self, text: str) -> bool:
        """A full disk has no block for a new file, but the old status.json has its own: overwrite
        it in place (the status stays one small file; not atomic, the last resort)."""
        if not self.path.is_file() or len(text.encode()) > 4096:
            return False
        try:
            with self.path.open("r+") as f:
                f.write(text)
                f.truncate()
                f.flush()
                os.fsync(f.fileno())
        except OSError:
            return False
        return True


def _now() -> str:
    return datetime.now().isoformat(timespec="seconds")


# --- one run per directory ---------------------------------------------------------------------


class RunRefused(Exception):
    """The command was refused before any work; the run directory is as it was."""


def holds_a_run(run_dir: Path) -> list[str]:
    """The run files ``run_dir`` holds (empty: no run lives there)."""
    return [name for name in RUN_FILES if (run_dir / name).exists()]


def claim(
    run_dir: Path, overwrite: bool, hydra_subdir: str | None = None, reason: str = "overwrite=true"
) -> None:
    """A fresh run in ``run_dir``: refuse the directory of another run unless ``overwrite``
    (``hydra_subdir``: where Hydra put this command's files, moved up to ``.hydra/`` then;
    ``reason``: why the old files go, for the log)."""
    found = holds_a_run(run_dir)
    if not found:
        return
    if not overwrite:
        status = _read_status(run_dir)
        if (run_dir / LAST).is_file():
            how = (
                f"Continue it with {resume_command(run_dir)} (resume=auto does the same for "
                "requeued jobs), choose another hydra.run.dir, or pass overwrite=true to delete its "
                "files and start afresh"
            )
        else:
            how = (
                "It has no last.pt to continue from (it stopped before its first epoch ended, or "
                "saved none): pass overwrite=true (or resume=auto) to delete its files and start "
                "it afresh, or choose another hydra.run.dir"
            )
        raise RunRefused(
            f"{run_dir} already holds a run ({status or 'no status'}; {', '.join(found)}). {how}"
        )
    for name in HYDRA_FILES[1:]:  # the old run's log (appended to by this command's handler)
        if (run_dir / name).is_file():
            os.truncate(run_dir / name, 0)
    log.warning(f"{reason}: deleting the run files of {run_dir} ({', '.join(found)})")
    for name in found:
        (run_dir / name).unlink()
    shutil.rmtree(run_dir / "wandb", ignore_errors=True)
    own = run_dir / hydra_subdir if hydra_subdir and hydra_subdir.startswith(".hydra/") else None
    if own is not None and own.is_dir():  # this run's Hydra files replace the old run's
        for path in own.iterdir():
            os.replace(path, run_dir / ".hydra" / path.name)
        own.rmdir()


def _read_status(run_dir: Path) -> str | None:
    try:
        record = json.loads((run_dir / "status.json").read_text())
    except (OSError, ValueError):
        return None
    epoch = record.get("epoch")
    return record.get("status", "?") + (f" after epoch {epoch}" if epoch is not None else "")


def log_sizes() -> dict[str, int]:
    """The size of each log file the root logger writes to (Hydra's ``train.log``), so that a
    refused command can take its lines out of an existing run's log (:func:`discard_refused`)."""
    sizes = {}
    for handler in logging.getLogger().handlers:
        path = getattr(handler, "baseFilename", None)
        if path:
            with contextlib.suppress(OSError):
                sizes[path] = os.path.getsize(path)
    return sizes


def discard_refused(
    hydra_dir: Path | None, subdir: str | None = None, sizes: dict[str, int] | None = None
) -> None:
    """Remove what Hydra made for a refused command: a run directory holding nothing but Hydra's
    own files, or (a command in an existing run directory) its own ``.hydra/<kind>_<time>``
    folder ``subdir`` and its lines in the run's log (``sizes``: :func:`log_sizes` before them)."""
    if hydra_dir is None or not hydra_dir.is_dir():
        return
    root = logging.getLogger()
    inside = str(hydra_dir.resolve()) + os.sep
    for handler in list(root.handlers):  # the log stays as it was: no line of a refused command
        path = str(getattr(handler, "baseFilename", ""))
        if path.startswith(inside):
            handler.close()
            root.removeHandler(handler)
            size = (sizes or {}).get(path, 0)
            with contextlib.suppress(OSError):
                if size:
                    os.truncate(path, size)
                else:
                    os.unlink(path)
    if {p.name for p in hydra_dir.iterdir()} <= set(HYDRA_FILES):
        shutil.rmtree(hydra_dir, ignore_errors=True)
        for parent in list(hydra_dir.resolve().parents)[
            :2
        ]:  # runs/ and the log dir, if it made them
            if parent == Path.cwd() or any(parent.iterdir()):
                break
            parent.rmdir()
    elif subdir and subdir.startswith(".hydra/"):
        shutil.rmtree(hydra_dir / subdir, ignore_errors=True)
        with contextlib.suppress(OSError):  # .hydra itself when this command made it
            (hydra_dir / ".hydra").rmdir()


# --- resuming -----------------------------------------------------------------------------------


def find_resume_checkpoint(resume: str, log_dir: str | Path = "outputs") -> Path:
    """The checkpoint that ``resume=`` names: a run directory (its ``last.pt``), a checkpoint file,
    or ``latest`` (the newest run under ``<log_dir>`` that has a ``last.pt`` and did not complete)."""
    if str(resume) == "latest":
        candidates = [
            path
            for path in Path(log_dir).glob(f"**/{LAST}")
            if RunStatus(path.parent).read().get("status") != "completed"
        ]
        if not candidates:
            raise FileNotFoundError(
                f"resume=latest: no unfinished run with a last.pt under {log_dir}/ "
                "(completed runs are not resumed; pass resume=<run dir> to extend one)"
            )
        return max(candidates, key=lambda path: path.stat().st_mtime)
    path = Path(resume)
    if path.is_dir():
        if (path / LAST).is_file():
            return path / LAST
        raise FileNotFoundError(
            f"resume={resume}: the run directory has no last.pt (the run stopped before finishing "
            "its first epoch, or it is not a bso run directory)"
        )
    if not path.is_file():
        raise FileNotFoundError(f"resume={resume}: no such run directory or checkpoint file")
    return path


def hydra_value(text: str) -> str:
    """``text`` as one value of Hydra's override grammar (quoted when it holds special characters)."""
    if all(c.isalnum() or c in "/._-~+:@" for c in text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def resume_command(run_dir: Path, world_size: int = 1) -> str:
    """The command that resumes ``run_dir``, ready to paste into a shell."""
    launcher = (
        f"torchrun --nproc_per_node={world_size} train.py" if world_size > 1 else "python train.py"
    )
    arg = "resume=" + hydra_value(str(run_dir))
    if arg != shlex.quote(arg) and not any(c in arg for c in '"$`\\!'):
        return f'{launcher} "{arg}"'  # reads better than shlex's '"'"' for Hydra's single quotes
    return f"{launcher} {shlex.quote(arg)}"
