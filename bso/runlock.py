"""One live process per run directory: :class:`RunLock` (``<run dir>/run.lock``: owner pid, host
and start time, created with ``O_EXCL``, touched every 30 s while held) refuses a second one. A lock
left by a process that no longer exists on this host, or untouched for 5 minutes (a job killed on
another node), is taken over with a warning."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from datetime import datetime
from pathlib import Path

from bso.rundir import LOCK_NAME, RunRefused

log = logging.getLogger(__name__)


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
