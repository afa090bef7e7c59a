"""The OmegaConf resolvers that configs/hydra/*.yaml read, registered by :func:`register_resolvers`:
the entry points (train.py, eval.py, bso-train, bso-eval through :mod:`bso.cli`) and
:func:`bso.compose.compose_configs` call it before Hydra composes a config.

``bso_run_dir``      ``hydra.run.dir``: a new run directory, or the resumed run's
``bso_rank_dir``     under torchrun, ranks > 0 get a throwaway temp dir (:mod:`bso.distributed`)
``bso_hydra_subdir`` ``hydra.output_subdir``: ``.hydra``, or ``.hydra/<kind>_<time>`` where it exists
``bso_sweep_dir``    ``hydra.sweep.dir``; with ``resume=auto``, the previous sweep of the command line
``bso_config_groups`` ``--help``'s list of config groups
"""

from __future__ import annotations

import secrets
import sys
from datetime import datetime
from pathlib import Path

from omegaconf import OmegaConf

from bso.configs_path import visible_options
from bso.distributed import run_dir_for_rank
from bso.rundir import find_resume_checkpoint, new_run_name


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


def config_groups_help() -> str:
    """``--help``'s list of config groups and their options (configs/hydra/default.yaml's help
    template), without Hydra's own groups and the internal ``_*`` files."""
    from bso.validate import config_dirs

    groups: dict[str, set[str]] = {}
    for root in config_dirs():
        for path in root.rglob("*.yaml"):
            group = path.parent.relative_to(root).as_posix()
            if group != "." and group.split("/")[0] != "hydra":
                groups.setdefault(group, set()).add(path.stem)
    return "\n".join(f"{g}: {', '.join(visible_options(o))}" for g, o in sorted(groups.items()))


RESOLVERS = {
    "bso_run_dir": run_dir_resolver,
    "bso_rank_dir": run_dir_for_rank,
    "bso_hydra_subdir": hydra_subdir_resolver,
    "bso_sweep_dir": sweep_dir_resolver,
    "bso_config_groups": config_groups_help,
}
# cached: every read of the run directory in one process gives the same answer
CACHED = ("bso_run_dir", "bso_hydra_subdir", "bso_sweep_dir")


def register_resolvers() -> None:
    """Make the ``${bso_...:}`` resolvers known to OmegaConf (idempotent)."""
    for name, fn in RESOLVERS.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn, use_cache=name in CACHED)
