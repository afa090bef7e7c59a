"""Run directories: what each trained (its setting and method), its records, its status, and the
runs of one setting aggregated over seeds.

A run directory is one that holds ``config.yaml`` (the resolved config) and ``metrics.jsonl`` (one
record per epoch; records without ``epoch``, from evaluations, are skipped). Its status:

- ``status.json`` when present: ``{"status": "running"|"completed"|"failed"|"interrupted"|
  "diverged", ...}``; only ``completed`` counts.
- without it: completed when the last record's epoch equals the config's ``dataset.epochs``, else
  ``unfinished``.

Unfinished runs are listed and counted, never averaged in. Two runs train the same setting when
the keys that define the method and its setting (IDENTITY_KEYS) are equal.
"""

from __future__ import annotations

import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from bso.env import canonical

# The config keys that make two runs the same setting (besides the seed).
IDENTITY_KEYS = (
    "dataset.name",
    "dataset.epochs",
    "model",  # the whole model config except its name (layers, norm, weights, ...)
    "model.layers",
    "model.weights",
    "model.agmm",
    "optimizer.name",
    "engine",  # class of engine._target_
    "engine.trace",  # online engines only
    "engine.update",
    "engine.T",
    "optimizer.binary.gamma",
    "optimizer.binary.beta",
    "optimizer.binary.beta1",
    "optimizer.binary.beta2",
)


def target_class(target: str | None) -> str | None:
    """``bso.engine.OnlineEngine`` -> ``OnlineEngine``."""
    return target.rsplit(".", 1)[-1] if target else None


def _normalised(value):
    if isinstance(value, float):
        return float(f"{value:.10g}")
    return value


def identity(cfg: DictConfig) -> tuple:
    """The setting a config trains (see IDENTITY_KEYS)."""
    values = []
    for key in IDENTITY_KEYS:
        if key == "model":  # all of the model's config but its `name` (a label)
            model = OmegaConf.to_container(cfg.model, resolve=True)
            model.pop("name", None)
            value = json.dumps(model, sort_keys=True)
        elif key == "engine":
            value = target_class(cfg.engine.get("_target_"))
        elif key == "engine.trace" and target_class(cfg.engine.get("_target_")) != "OnlineEngine":
            value = None
        else:
            value = OmegaConf.select(cfg, key, default=None)
        if key == "optimizer.binary.beta" and cfg.optimizer.name != "bso":
            value = None
        values.append(_normalised(value))
    return tuple(values)


def method_of(cfg: DictConfig) -> str:
    """The Table 2 method a config trains (a key of bso.paper.METHODS)."""
    weights, engine = cfg.model.get("weights"), target_class(cfg.engine.get("_target_"))
    if cfg.optimizer.name in ("bso", "tbso"):
        return cfg.optimizer.name
    if weights == "latent":
        return "agmm" if cfg.model.get("agmm") else "qsnn"
    if engine == "BPTTEngine":
        return "fp_snn"
    return "ottt" if cfg.engine.get("trace") == "ottt" else "ndot"


# ---------------------------------------------------------------------------------------- runs


@dataclass
class RunRecord:
    """One run directory: its config, its per-epoch records and its status."""

    dir: Path
    cfg: DictConfig
    records: list[dict]
    status: str  # completed | running | failed | interrupted | diverged | unfinished
    overrides: list[str] = field(default_factory=list)  # .hydra/overrides.yaml
    size_mb: float | None = None
    environment: dict = field(default_factory=dict)  # environment.json (bso.env.describe)

    def environment_value(self, key: str) -> str:
        """What ``bso-report runs --env KEY`` shows: ``lock`` (the lock file's hash, ``*`` where the
        environment differed from it), ``git`` (the commit, ``+dirty``), ``python``, or an installed
        distribution's version (``torch``); ``-`` where the run recorded none."""
        env = self.environment
        if key == "lock":
            lock = env.get("lock", {})
            sha = lock.get("sha256")
            return "-" if not sha else sha[:12] + ("" if lock.get("matches") else "*")
        if key == "git":
            git = env.get("git", {})
            commit = git.get("commit")
            return "-" if not commit else commit[:12] + ("+dirty" if git.get("dirty") else "")
        if key == "python":
            return env.get("python", "-")
        return env.get("distributions", {}).get(canonical(key), "-")

    @property
    def completed(self) -> bool:
        return self.status == "completed" and bool(self.records)

    @property
    def epoch(self) -> int:
        return self.records[-1]["epoch"] if self.records else 0

    @property
    def epochs(self) -> int:
        return int(self.cfg.dataset.epochs)

    @property
    def final_acc(self) -> float | None:
        return 100 * self.records[-1]["test/acc1"] if self.records else None

    @property
    def best(self) -> tuple[float, int] | tuple[None, None]:
        """(best test top-1 %, its epoch): the records' `best/*` keys when logged, else computed."""
        if not self.records:
            return None, None
        last = self.records[-1]
        if "best/test_acc1" in last and "best/epoch" in last:
            return 100 * last["best/test_acc1"], int(last["best/epoch"])
        top = max(self.records, key=lambda r: r["test/acc1"])
        return 100 * top["test/acc1"], int(top["epoch"])

    @property
    def peak_mb(self) -> float | None:
        peaks = [
            r.get("memory/cuda_peak_allocated_mb", r.get("memory/peak_rss_mb"))
            for r in self.records
        ]
        peaks = [p for p in peaks if p is not None]
        return max(peaks) if peaks else None

    def state(self) -> str:
        """`completed`, or e.g. `running (epoch 3/400)`."""
        return (
            self.status if self.completed else f"{self.status} (epoch {self.epoch}/{self.epochs})"
        )


def warn(message: str) -> None:
    """One ``warning:`` line on stderr: the report goes on without what it names."""
    print(f"warning: {message}", file=sys.stderr)


def _read_json(path: Path) -> dict | None:
    """``path``'s JSON object; None (with a warning naming it) when it cannot be read."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        warn(f"{path}: unreadable ({type(err).__name__}: {err}); ignored")
        return None
    if not isinstance(value, dict):
        warn(f"{path}: not a JSON object; ignored")
        return None
    return value


def _status(run_dir: Path, cfg: DictConfig, records: list[dict]) -> str:
    path = run_dir / "status.json"
    if path.is_file():
        record = _read_json(path)
        if record is not None:
            return str(record.get("status", "unfinished"))
    done = records and records[-1]["epoch"] == cfg.dataset.epochs
    return "completed" if done else "unfinished"


def read_records(metrics: Path) -> list[dict]:
    """The epoch records of ``metrics`` (metrics.jsonl); a line that is not a JSON record (cut short
    by a crash, garbage) is skipped with one warning naming the file and its line numbers."""
    if not metrics.is_file():
        return []
    records, bad = [], []
    for number, line in enumerate(metrics.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict) or not _is_record(record):
            bad.append(number)
            continue
        if "epoch" in record:
            records.append(record)
    if bad:
        shown = ", ".join(map(str, bad[:5])) + (" ..." if len(bad) > 5 else "")
        warn(f"{metrics}: skipped {len(bad)} unreadable line(s) (line {shown})")
    return records


def _is_record(record: dict) -> bool:
    """An epoch record has an integer epoch and a numeric test/acc1; an evaluation's has no epoch."""
    if "epoch" not in record:
        return True
    return isinstance(record["epoch"], int) and isinstance(record.get("test/acc1"), int | float)


def load_run(run_dir: Path) -> RunRecord:
    """The run in ``run_dir`` (config.yaml, metrics.jsonl, status.json, .hydra/overrides.yaml,
    run_info.json's model size, environment.json; each but config.yaml optional)."""
    cfg = OmegaConf.load(run_dir / "config.yaml")
    records = read_records(run_dir / "metrics.jsonl")
    overrides_file = run_dir / ".hydra" / "overrides.yaml"
    overrides = list(OmegaConf.load(overrides_file)) if overrides_file.is_file() else []
    info = run_dir / "run_info.json"
    size = json.loads(info.read_text()).get("model_size", {}) if info.is_file() else {}
    env_file = run_dir / "environment.json"
    environment = (_read_json(env_file) or {}) if env_file.is_file() else {}
    status = _status(run_dir, cfg, records)
    return RunRecord(run_dir, cfg, records, status, overrides, size.get("size_mb"), environment)


def is_evaluation(run_dir: Path) -> bool:
    """An evaluation of a checkpoint (its status.json says ``evaluated``): a test of trained
    weights, not a training result."""
    path = run_dir / "status.json"
    try:
        return path.is_file() and "evaluated" in json.loads(path.read_text())
    except (OSError, ValueError, TypeError):
        return False


def load_runs(root: Path) -> list[RunRecord]:
    """Every training run directory below ``root`` (one with config.yaml and metrics.jsonl or
    status.json); evaluations of a checkpoint (is_evaluation) are not training runs and are left
    out. Failed, interrupted and diverged runs are kept: they are named, never averaged. A run
    whose config.yaml cannot be read is skipped with one warning naming it."""
    if not root.exists():
        raise FileNotFoundError(f"{root} does not exist; give the directory your runs are under")
    dirs = {p.parent for p in root.rglob("config.yaml")}
    runs = []
    for d in sorted(dirs):
        if not ((d / "metrics.jsonl").is_file() or (d / "status.json").is_file()):
            continue
        try:
            if not is_evaluation(d):
                runs.append(load_run(d))
        except Exception as err:  # noqa: BLE001 - one bad run directory never stops the report
            warn(
                f"{d}: skipped, it cannot be read ({type(err).__name__}: {' '.join(str(err).split())[:300]})"
            )
    return runs


# ----------------------------------------------------------------------------------- aggregate


@dataclass
class Summary:
    """Completed runs of one setting, aggregated over seeds; unfinished ones only counted."""

    runs: list[RunRecord]

    @property
    def done(self) -> list[RunRecord]:
        return [r for r in self.runs if r.completed]

    @property
    def unfinished(self) -> list[RunRecord]:
        return [r for r in self.runs if not r.completed]

    @staticmethod
    def _stats(values: list[float]) -> tuple[float, float] | None:
        if not values:
            return None
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    @property
    def final(self) -> tuple[float, float] | None:
        return self._stats([r.final_acc for r in self.done])

    @property
    def best(self) -> tuple[float, float] | None:
        return self._stats([r.best[0] for r in self.done])

    @property
    def best_epochs(self) -> list[int]:
        return sorted(r.best[1] for r in self.done)

    @property
    def size_mb(self) -> float | None:
        sizes = [r.size_mb for r in self.runs if r.size_mb is not None]
        return sizes[0] if sizes else None

    def runs_text(self) -> str:
        text = str(len(self.done))
        if self.unfinished:
            text += " (+" + ", ".join(r.state() for r in self.unfinished) + ")"
        return text


def fmt_stats(stats: tuple[float, float] | None, n: int) -> str:
    """``mean +- std`` over ``n`` runs (the mean alone for one run; ``-`` for none)."""
    if stats is None:
        return "-"
    mean, std = stats
    return f"{mean:.2f} +- {std:.2f}" if n > 1 else f"{mean:.2f}"


def fmt_epochs(epochs: list[int]) -> str:
    """The best epochs of a setting's runs: ``7``, or the range ``5-7``."""
    if not epochs:
        return "-"
    return str(epochs[0]) if epochs[0] == epochs[-1] else f"{epochs[0]}-{epochs[-1]}"
