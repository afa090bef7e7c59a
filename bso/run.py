"""The run directory: everything needed to trust and repeat a run.

config.yaml      the resolved config             run_info.json   command, device, model size
environment.json the software environment: every installed distribution, the lock's hash and match,
                 git commit, Python, torch's CUDA / cuDNN, threads (bso/env.py); a resume in another
                 environment adds environment_<date>_<time>.json and says what changed
status.json      running / completed / failed / interrupted / diverged, last and best epoch
run.lock         while a process works in the directory: its pid and host (bso/rundir.py)
metrics.jsonl    one JSON record per epoch       last.pt best.pt  training checkpoints (resume from them)
train.log        the log                         last_1bit.pt best_1bit.pt  1-bit exports

Run directories are ``<log_dir>/runs/<date>_<time>_<6 hex digits>``, so two runs started in the same
second never share one. ``resume=<run dir | checkpoint | latest>`` continues a run inside its own
directory (Hydra's files of the resuming command go to ``.hydra/resume_<date>_<time>``). An
evaluation (eval.py) gets ``<log_dir>/evals/<date>_<time>_<6 hex digits>``: config.yaml,
run_info.json, status.json, metrics.jsonl (one record) and eval.log.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import secrets
import sys
from datetime import datetime
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from bso.distributed import run_dir_for_rank
from bso.env import describe

log = logging.getLogger(__name__)

# torchrun: Hydra's run directory of ranks > 0 goes to the temp dir (configs/hydra/default.yaml)
if not OmegaConf.has_resolver("bso_rank_dir"):
    OmegaConf.register_new_resolver("bso_rank_dir", run_dir_for_rank)


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


def environment_changes(before: dict, after: dict) -> list[str]:
    """What differs between two :func:`bso.env.describe` records: distributions (``torch 2.14.1 ->
    2.15.0``), the git commit, the lock file, torch's CUDA build."""
    changes = []
    old, new = before.get("distributions", {}), after.get("distributions", {})
    for name in sorted(set(old) | set(new)):
        if old.get(name) != new.get(name):
            changes.append(f"{name} {old.get(name, 'absent')} -> {new.get(name, 'absent')}")
    for key, field in (("git", "commit"), ("git", "dirty"), ("lock", "sha256")):
        a, b = before.get(key, {}).get(field), after.get(key, {}).get(field)
        if a != b:
            changes.append(f"{key} {field} {a} -> {b}")
    for field in ("cuda_build", "cudnn", "devices"):
        a, b = before.get("torch_build", {}).get(field), after.get("torch_build", {}).get(field)
        if a != b:
            changes.append(f"{field} {a} -> {b}")
    return changes


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
CHECKPOINT_NAMES = ("last.pt", "best.pt", "checkpoint.pt")  # checkpoint.pt: written before bso 0.2


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


def new_run_name() -> str:
    """``<date>_<time>_<6 random hex digits>``: unique even for runs started in the same second."""
    return f"{datetime.now():%Y-%m-%d_%H-%M-%S}_{secrets.token_hex(3)}"


def find_resume_checkpoint(resume: str, log_dir: str | Path = "outputs") -> Path:
    """The checkpoint that ``resume=`` names: a run directory (its ``last.pt``), a checkpoint file,
    or ``latest`` (the newest run under ``<log_dir>`` that has a ``last.pt`` and did not complete)."""
    if str(resume) == "latest":
        candidates = [
            path
            for path in Path(log_dir).glob("**/last.pt")
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
        for name in CHECKPOINT_NAMES:
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(
            f"resume={resume}: the run directory has no last.pt (the run stopped before finishing "
            "its first epoch, or it is not a bso run directory)"
        )
    if not path.is_file():
        raise FileNotFoundError(f"resume={resume}: no such run directory or checkpoint file")
    return path


def run_dir_resolver(log_dir: str, resume: str | None, kind: str = "runs") -> str:
    """``hydra.run.dir``: a new unique directory under ``<log_dir>/<kind>`` (``runs``: training,
    ``evals``: eval.py), or the directory of the run being resumed."""
    if resume in (None, "", "auto"):
        return f"{log_dir}/{kind}/{new_run_name()}"
    try:
        return str(find_resume_checkpoint(resume, log_dir).parent)
    except FileNotFoundError as err:
        # Hydra resolves this before train() runs: one line and exit 1 (SystemExit passes through
        # Hydra and OmegaConf untouched), not a trace through both; nothing is created
        raise SystemExit(f"error: {err}") from None


_SUBDIRS: dict[tuple, str] = {}


def hydra_subdir_resolver(resume: str | None, run_dir: str | None = None) -> str:
    """``hydra.output_subdir``: Hydra's own files. A command in a directory that already has them
    (a resume, a requeue, a refused second run) writes its own ``.hydra/<kind>_<time>`` and keeps the
    original ones; the answer is remembered, so every read in one process agrees."""
    key = (resume, run_dir)
    if key not in _SUBDIRS:
        kind = "run" if resume in (None, "", "auto") else "resume"
        if resume in (None, "", "auto") and not (run_dir and (Path(run_dir) / ".hydra").exists()):
            _SUBDIRS[key] = ".hydra"
        else:
            kind = "resume" if resume else kind  # the hex: two commands in the same second
            _SUBDIRS[key] = (
                f".hydra/{kind}_{datetime.now():%Y-%m-%d_%H-%M-%S}_{secrets.token_hex(2)}"
            )
    return _SUBDIRS[key]


def _sweep_overrides(argv: list[str]) -> list[str]:
    """What identifies a sweep on its command line: the overrides but resume= and hydra.sweep.dir=."""
    return sorted(
        a
        for a in argv
        if not a.startswith("-") and not a.lstrip("+~").startswith(("resume=", "hydra.sweep.dir="))
    )


def previous_sweep(log_dir: str | Path, argv: list[str]) -> Path | None:
    """The newest sweep directory under ``<log_dir>/multirun`` whose command line
    (``multirun.yaml``'s overrides) was ``argv``'s, resume= and hydra.sweep.dir= aside."""
    wanted = _sweep_overrides(argv)
    found = []
    for saved in Path(log_dir).glob("multirun/*/multirun.yaml"):
        try:
            task = OmegaConf.load(saved).hydra.overrides.task
        except Exception:  # noqa: BLE001 - an unreadable sweep record is not this sweep
            continue
        if _sweep_overrides([str(item) for item in task]) == wanted:
            found.append(saved.parent)
    return max(found, key=lambda path: path.stat().st_mtime) if found else None


def sweep_dir_resolver(log_dir: str, resume: str | None) -> str:
    """``hydra.sweep.dir``: ``<log_dir>/multirun/<date>_<time>``; with ``resume=auto``, the previous
    sweep of the same command line if there is one, so that a relaunched sweep (a requeue, a
    crashed launcher) finds its jobs' run directories and continues them."""
    if resume == "auto":
        previous = previous_sweep(log_dir, sys.argv[1:])
        if previous is not None:
            return str(previous)
    return f"{log_dir}/multirun/{datetime.now():%Y-%m-%d_%H-%M-%S}"


def hydra_subdir_used() -> str | None:
    """The ``.hydra`` subdirectory this process's Hydra wrote (None outside a Hydra run)."""
    return list(_SUBDIRS.values())[-1] if _SUBDIRS else None


def register_resolvers() -> None:
    """Make ``${bso_run_dir:...}`` and ``${bso_hydra_subdir:...}`` known to OmegaConf (idempotent);
    cached, so every read of the run directory in one process gives the same answer."""
    from omegaconf import OmegaConf

    for name, fn in (
        ("bso_run_dir", run_dir_resolver),
        ("bso_hydra_subdir", hydra_subdir_resolver),
        ("bso_sweep_dir", sweep_dir_resolver),
    ):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn, use_cache=True)


register_resolvers()
