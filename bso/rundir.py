"""A run directory belongs to one run and one live process.

* :func:`claim` refuses a *fresh* run in a directory that already holds a run's files (its
  checkpoints, metrics or status): continue that run with ``resume=<dir>`` (or ``resume=auto``), pick
  another directory, or pass ``overwrite=true`` to delete the old run's files and start afresh.
* :class:`RunLock` (``<run dir>/run.lock``: owner pid, host and start time, created with
  ``O_EXCL``, touched every 30 s while held) refuses a second live process. A lock left by a process
  that no longer exists on this host, or untouched for 5 minutes (a job killed on another node), is
  taken over with a warning.
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
import shlex
import shutil
import socket
import threading
import time
from datetime import datetime
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_NAME = "run.lock"
# a run's own files: a directory holding any of them belongs to a run
RUN_FILES = (
    "status.json",
    "metrics.jsonl",
    "last.pt",
    "best.pt",
    "last_1bit.pt",
    "best_1bit.pt",
    "checkpoint.pt",
)
# what Hydra writes into a run directory before the run starts (the log: hydra.job.name + .log)
HYDRA_FILES = (".hydra", "train.log", "eval.log")


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
        if (run_dir / "last.pt").is_file():
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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """``<run_dir>/run.lock`` held while a process trains (or evaluates) in ``run_dir``.

    The holder touches the file every ``HEARTBEAT_S`` seconds (a daemon thread), so a lock that a
    killed job on another node left behind (a Slurm requeue after ``kill -9``) goes stale after
    ``STALE_S`` seconds without a touch; on the same host a lock is stale as soon as its process is
    gone."""

    HEARTBEAT_S = 30.0
    STALE_S = 300.0

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.path = Path(run_dir) / LOCK_NAME
        self.enabled = enabled
        self.held = False
        self._stop = threading.Event()

    def _stale(self, owner: dict, host: str) -> str | None:
        """Why ``owner``'s lock is stale, or None while it may still be held."""
        if owner.get("host") == host and owner.get("pid"):
            return None if _alive(owner["pid"]) else "which no longer runs"
        try:
            idle = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return "released"
        if idle > self.STALE_S:
            return (
                f"untouched for {idle:.0f} s (its holder touches it every {self.HEARTBEAT_S:.0f} s)"
            )
        return None

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.HEARTBEAT_S):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def owner(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # being written, or unreadable: treated as held

    def acquire(self) -> RunLock:
        if not self.enabled:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.now().isoformat(timespec="seconds"),
        }
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self.owner()
                if owner is None:
                    continue  # released in between
                stale = self._stale(owner, me["host"])
                if stale:
                    log.warning(
                        f"{self.path}: taking over the lock of process {owner.get('pid', '?')} "
                        f"on {owner.get('host', '?')} (started {owner.get('started', '?')}), "
                        f"{stale}"
                    )
                    self.path.unlink(missing_ok=True)
                    continue
                raise RunRefused(
                    f"{self.path.parent} is in use by process {owner.get('pid', '?')} on host "
                    f"{owner.get('host', '?')} (since {owner.get('started', '?')}); one process per run "
                    f"directory. Wait for it to end (or stop it); if it is known to be gone, delete "
                    f"{self.path} (a lock untouched for {self.STALE_S:.0f} s is taken over)"
                ) from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            threading.Thread(target=self._heartbeat, daemon=True, name="bso-run-lock").start()
            return self
        raise RunRefused(f"could not take the lock {self.path}; try again")

    def release(self) -> None:
        self._stop.set()
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


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
