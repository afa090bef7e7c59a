"""Run directories -> the paper's tables and figures, side by side with the paper's numbers.

A run directory is one that holds ``config.yaml`` (the resolved config) and ``metrics.jsonl`` (one
record per epoch; records without ``epoch``, from eval-only runs, are skipped). Its status:

- ``status.json`` when present: ``{"status": "running"|"completed"|"failed"|"interrupted", ...}``;
  only ``completed`` counts.
- without it (runs written before status.json existed): completed when the last record's epoch
  equals the config's ``dataset.epochs``, else ``unfinished``.

Unfinished runs are listed and counted, never averaged in. A run counts for a paper cell
(bso.paper.Cell) when the keys that define the method and its setting (IDENTITY_KEYS) equal those
of the config the cell's command composes; however the run was launched.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf

from bso import paper
from bso.configs_path import config_dir
from bso.paper import Cell

if TYPE_CHECKING:
    from matplotlib.figure import Figure

CONFIG_DIR = config_dir()  # the checkout's configs/, or the installed package's

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
# Overrides that never make a different setting: a sweep's seeds are aggregated; the rest is
# bookkeeping. `init_from` is the ImageNet pre-training's path (a placeholder in the commands).
NOT_A_SETTING = ("seed", "logger", "device", "save_checkpoint", "init_from", "checkpoint", "sweep")
AXIS_LABELS = {
    "engine.T": "time steps T",
    "optimizer.binary.gamma": "flip threshold gamma",
    "optimizer.binary.beta": "BSO momentum beta",
    "optimizer.binary.beta1": "T-BSO beta1",
    "optimizer.binary.beta2": "T-BSO beta2",
    "dataset.epochs": "epochs",
    "seed": "seed",
}


def _class(target: str | None) -> str | None:
    return target.rsplit(".", 1)[-1] if target else None


def _norm(value):
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
            value = _class(cfg.engine.get("_target_"))
        elif key == "engine.trace" and _class(cfg.engine.get("_target_")) != "OnlineEngine":
            value = None
        else:
            value = OmegaConf.select(cfg, key, default=None)
        if key == "optimizer.binary.beta" and cfg.optimizer.name != "bso":
            value = None
        values.append(_norm(value))
    return tuple(values)


def method_of(cfg: DictConfig) -> str:
    """The Table 2 method a config trains (bso.paper.METHOD_NAMES keys)."""
    weights, engine = cfg.model.get("weights"), _class(cfg.engine.get("_target_"))
    if cfg.optimizer.name in ("bso", "tbso"):
        return cfg.optimizer.name
    if weights == "latent":
        return "agmm" if cfg.model.get("agmm") else "qsnn"
    if engine == "BPTTEngine":
        return "fp_snn"
    return "ottt" if cfg.engine.get("trace") == "ottt" else "ndot"


# ---------------------------------------------------------------------------------------- runs


@dataclass
class Run:
    dir: Path
    cfg: DictConfig
    records: list[dict]
    status: str  # completed | running | failed | interrupted | diverged | unfinished
    overrides: list[str] = field(default_factory=list)  # .hydra/overrides.yaml
    size_mb: float | None = None

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


def _status(run_dir: Path, cfg: DictConfig, records: list[dict]) -> str:
    path = run_dir / "status.json"
    if path.is_file():
        return json.loads(path.read_text()).get("status", "unfinished")
    done = records and records[-1]["epoch"] == cfg.dataset.epochs
    return "completed" if done else "unfinished"


def load_run(run_dir: Path) -> Run:
    cfg = OmegaConf.load(run_dir / "config.yaml")
    metrics = run_dir / "metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.is_file() else []
    records = [json.loads(line) for line in lines if line.strip()]
    records = [r for r in records if "epoch" in r]
    overrides_file = run_dir / ".hydra" / "overrides.yaml"
    overrides = list(OmegaConf.load(overrides_file)) if overrides_file.is_file() else []
    info = run_dir / "run_info.json"
    size = json.loads(info.read_text()).get("model_size", {}) if info.is_file() else {}
    return Run(
        run_dir, cfg, records, _status(run_dir, cfg, records), overrides, size.get("size_mb")
    )


def is_evaluation(run_dir: Path) -> bool:
    """An ``engine.eval_only=true`` run: a test of a checkpoint, not a training result."""
    path = run_dir / "status.json"
    try:
        if path.is_file() and "evaluated" in json.loads(path.read_text()):
            return True
    except ValueError:
        pass
    return bool(OmegaConf.select(OmegaConf.load(run_dir / "config.yaml"), "engine.eval_only"))


def load_runs(root: Path) -> list[Run]:
    """Every training run directory below ``root`` (one with config.yaml and metrics.jsonl or
    status.json); evaluations of a checkpoint (``engine.eval_only=true``) are not training runs and
    are left out. Failed, interrupted and diverged runs are kept: they are named, never averaged."""
    if not root.exists():
        raise FileNotFoundError(f"{root} does not exist; give the directory your runs are under")
    dirs = {p.parent for p in root.rglob("config.yaml")}
    return [
        load_run(d)
        for d in sorted(dirs)
        if ((d / "metrics.jsonl").is_file() or (d / "status.json").is_file())
        and not is_evaluation(d)
    ]


# ----------------------------------------------------------------------------------- aggregate


@dataclass
class Summary:
    """Completed runs of one setting, aggregated over seeds; unfinished ones only counted."""

    runs: list[Run]

    @property
    def done(self) -> list[Run]:
        return [r for r in self.runs if r.completed]

    @property
    def unfinished(self) -> list[Run]:
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
    if stats is None:
        return "-"
    mean, std = stats
    return f"{mean:.2f} +- {std:.2f}" if n > 1 else f"{mean:.2f}"


def fmt_epochs(epochs: list[int]) -> str:
    if not epochs:
        return "-"
    return str(epochs[0]) if epochs[0] == epochs[-1] else f"{epochs[0]}-{epochs[-1]}"


# ------------------------------------------------------------------------------- paper cells


_COMPOSED: dict[tuple[str, ...], DictConfig] = {}  # overrides -> config (composing is slow)


def compose_overrides(batch: Sequence[Sequence[str]]) -> list[DictConfig]:
    """configs/train.yaml composed with each list of overrides (one Hydra initialisation)."""
    from hydra import compose, initialize_config_dir

    todo = [tuple(o) for o in batch if tuple(o) not in _COMPOSED]
    if todo:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            for overrides in todo:
                _COMPOSED[overrides] = compose(config_name="train", overrides=list(overrides))
    return [_COMPOSED[tuple(o)] for o in batch]


def compose_cells(cells: Sequence[Cell]) -> list[DictConfig]:
    """The config each cell's command composes (``init_from``, a path placeholder, left out)."""
    return compose_overrides(
        [
            [*(o for o in c.train_overrides() if not o.startswith("init_from=")), "logger=none"]
            for c in cells
        ]
    )


def match(cells: Sequence[Cell], runs: Iterable[Run]) -> list[Summary]:
    """For each cell, the runs of its setting."""
    by_identity: dict[tuple, list[Run]] = {}
    for run in runs:
        by_identity.setdefault(identity(run.cfg), []).append(run)
    keys = [
        identity(cfg) if c.reproducible else None
        for c, cfg in zip(cells, compose_cells(cells), strict=True)
    ]
    return [Summary(by_identity.get(k, []) if k else []) for k in keys]


def prepare_cells(artefact: str, digits: bool = False, extra: Sequence[str] = ()) -> list[Cell]:
    """The artefact's cells, mapped onto the digits when asked, with ``extra`` overrides added."""
    cells = paper.cells(artefact)
    if digits:
        if artefact == "table2":  # one dataset's rows: CIFAR-10's six methods at the paper's T
            cells = [c for c in cells if c.dataset == "cifar10"]
        cells = [c.on_digits() for c in cells if c.method in paper.METHOD_OVERRIDES]
    return [c.with_overrides(*extra) for c in cells]


def _setting_columns(artefact: str, cell: Cell) -> dict:
    if artefact in ("table2", "table5"):
        return {
            "dataset": paper.DATASET_NAMES.get(cell.dataset, cell.dataset),
            "method": paper.METHOD_NAMES[cell.method],
            "arch": cell.arch,
            "online": "yes" if cell.method in paper.ONLINE else "no",
            "binary": "yes" if cell.method in paper.BINARY else "no",
            "T": cell.T,
        }
    if artefact == "table3":
        return {"gamma (x1e-5)": f"{cell.x / 1e-5:g}", "gamma": f"{cell.x:g}"}
    if artefact == "table4":
        return {"1 - beta1": f"{cell.x[0]:g}", "1 - beta2": f"{cell.x[1]:g}"}
    return {"method": paper.METHOD_NAMES[cell.method], "T": cell.T}


def built_size_mb(cell: Cell) -> float | None:
    """The model size (MB: 1-bit binary weights + 32-bit others) of the model the cell's command
    builds, without training it (bso.models.model_size)."""
    if not cell.reproducible:
        return None
    from hydra.utils import instantiate

    from bso.models import model_size

    (cfg,) = compose_cells([cell])
    key = OmegaConf.to_yaml(cfg.model, resolve=True)  # the same model at every T
    if key not in _SIZES:
        _SIZES[key] = model_size(instantiate(cfg.model)).as_dict()["size_mb"]
    return _SIZES[key]


_SIZES: dict[str, float] = {}


def cell_rows(artefact: str, cells: Sequence[Cell], summaries: Sequence[Summary]) -> list[dict]:
    """One row per cell: the setting, the paper's value, ours, the difference, the command."""
    rows = []
    for cell, s in zip(cells, summaries, strict=True):
        n = len(s.done)
        final, best = s.final, s.best
        row = _setting_columns(artefact, cell)
        if artefact in ("table2", "table5"):
            row["size paper (MB)"] = f"{cell.size_mb:.2f}"
            size = s.size_mb if s.size_mb is not None else built_size_mb(cell)
            row["size ours (MB)"] = f"{size:.2f}" if size is not None else "-"
        row.update(
            {
                "paper": f"{cell.value:.2f}",
                "ours final": fmt_stats(final, n),
                "ours best": fmt_stats(best, n),
                "best epoch": fmt_epochs(s.best_epochs),
                "final - paper": f"{final[0] - cell.value:+.2f}"
                if final and cell.dataset != "digits"
                else "-",
                "runs": s.runs_text(),
                "command": "" if n else cell.command,
            }
        )
        row["_final_mean"] = final[0] if final else None
        row["_final_std"] = final[1] if final else None
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------ output


def public(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith("_")}


def markdown(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    if not rows:
        return "(no rows)"
    columns = list(columns or public(rows[0]))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for c in columns:
            value = row.get(c, "")
            text = "" if value is None else str(value)
            if c == "command" and text and not text.startswith("not reproducible"):
                text = f"`{text}`"
            cells.append(text.replace("|", "\\|"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def to_csv(rows: Sequence[dict]) -> str:
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(public(rows[0])))
        writer.writeheader()
        for row in rows:
            writer.writerow(public(row))
    return buf.getvalue()


def log_wandb(
    name: str,
    rows: Sequence[dict],
    images: Sequence[Path] = (),
    mode: str = "offline",
    project: str = "bso",
    run_dir: Path | None = None,
) -> str:
    """Log ``rows`` as a ``wandb.Table`` (and ``images``) in a new wandb run; offline by default."""
    import wandb

    if mode not in ("offline", "online", "disabled"):
        raise ValueError(f"unknown wandb mode {mode!r}; choose offline, online or disabled")
    columns = list(public(rows[0])) if rows else []
    data = [[str(public(r)[c]) for c in columns] for r in rows]
    kwargs = {"dir": str(run_dir)} if run_dir else {}
    run = wandb.init(project=project, job_type="report", name=name, mode=mode, **kwargs)
    payload = {name: wandb.Table(columns=columns, data=data)}
    for image in images:
        payload[f"{name}/{Path(image).stem}"] = wandb.Image(str(image))
    run.log(payload)
    where = run.dir if mode != "disabled" else "(disabled)"
    run.finish()
    return where


# ------------------------------------------------------------------------------ the runs table


def _override_items(run: Run) -> dict[str, str]:
    items = {}
    for o in run.overrides:
        key, _, value = o.partition("=")
        key = key.lstrip("+~")
        if key.startswith("hydra.") or key in NOT_A_SETTING:
            continue
        items[key] = value
    return items


def setting_value(run: Run, key: str) -> str | None:
    """What the run trained with for an overridden ``key``: the config's value (so `gamma=5e-7`
    and the default 5e-07 agree); for a config group, its `name` or class; else the override."""
    value = OmegaConf.select(run.cfg, key, default=None)
    if isinstance(value, DictConfig):
        value = value.get("name") or _class(value.get("_target_"))
    if value is None:
        value = _override_items(run).get(key)
    if isinstance(value, float):
        return f"{value:g}"
    return None if value is None else str(value)


def swept_keys(runs: Sequence[Run]) -> list[str]:
    """The overridden keys (.hydra/overrides.yaml) whose value is not the same in every run;
    the seed is not a setting (aggregated)."""
    keys = sorted({k for r in runs for k in _override_items(r)})
    return [k for k in keys if len({setting_value(r, k) for r in runs}) > 1]


def _sort_value(v):
    try:
        return (0, float(v), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(v))


def runs_rows(runs: Sequence[Run]) -> tuple[list[dict], list[str]]:
    """One row per distinct setting (swept keys as columns), seeds aggregated as mean +- std."""
    keys = [k for k in swept_keys(runs) if k != "engine.T"]
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        setting = tuple(setting_value(run, k) for k in keys)
        groups.setdefault((identity(run.cfg), setting), []).append(run)
    rows = []
    for (_, setting), members in groups.items():
        cfg = members[0].cfg
        s = Summary(members)
        n = len(s.done)
        peaks = [r.peak_mb for r in s.done if r.peak_mb is not None]
        row = {
            "dataset": cfg.dataset.name,
            "model": cfg.model.get("name") or _class(cfg.model.get("_target_")),
            "method": method_of(cfg),
            "T": cfg.engine.T,
            **dict(zip(keys, setting, strict=True)),
            "epochs": cfg.dataset.epochs,
            "final": fmt_stats(s.final, n),
            "best": fmt_stats(s.best, n),
            "best epoch": fmt_epochs(s.best_epochs),
            "seeds": ",".join(str(r.cfg.get("seed")) for r in s.done) or "-",
            "runs": s.runs_text(),
            "size (MB)": f"{s.size_mb:.2f}" if s.size_mb is not None else "-",
            "peak memory (MB)": f"{max(peaks):.0f}" if peaks else "-",
            "_final_mean": s.final[0] if s.final else None,
            "_final_std": s.final[1] if s.final else None,
            "_setting": dict(zip(keys, setting, strict=True)),
            "_cfg": cfg,
        }
        rows.append(row)
    rows.sort(
        key=lambda r: (
            r["dataset"],
            r["method"],
            r["T"],
            *(_sort_value(r["_setting"][k]) for k in keys),
        )
    )
    return rows, keys


# ----------------------------------------------------------------------------------- figures


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _style_x(ax, xs: Sequence[float], log: bool) -> None:
    """Log axis with decade ticks, or integer ticks at the values when they are integers; never
    a linear-axis offset label."""
    from matplotlib.ticker import ScalarFormatter

    if log:
        ax.set_xscale("log")
    else:
        if all(float(x).is_integer() for x in xs):
            ax.set_xticks(sorted(set(xs)))
        ax.xaxis.set_major_formatter(ScalarFormatter(useOffset=False))
    ax.yaxis.set_major_formatter(ScalarFormatter(useOffset=False))
    ax.grid(alpha=0.3)


def _is_log(xs: Sequence[float]) -> bool:
    xs = [x for x in xs if x is not None]
    return bool(xs) and min(xs) > 0 and max(xs) / min(xs) >= 20


def plot_lines(
    series: dict[str, list[tuple[float, float, float | None]]],
    path: Path,
    *,
    xlabel: str,
    title: str,
    paper_series: dict[str, list[tuple[float, float]]] | None = None,
    paper_title: str | None = None,
    ylabel: str = "test top-1 (%)",
) -> Figure:
    """One line per series (x, mean, std); the paper's points overlaid on the same axes, or in a
    second panel (``paper_title``) when they were measured on other data."""
    plt = _pyplot()
    two = bool(paper_series) and paper_title is not None
    outside = not two and len(series) > 4  # many lines: the legend goes right of the axes
    width = 10 if two else (9.5 if outside else 5.5)
    fig, axes = plt.subplots(1, 2 if two else 1, figsize=(width, 4.2), squeeze=False)
    ours_ax, paper_ax = axes[0][0], axes[0][1] if two else axes[0][0]
    xs_all = [p[0] for pts in series.values() for p in pts]
    xs_all += [p[0] for pts in (paper_series or {}).values() for p in pts]
    log = _is_log(xs_all)
    colors = {}
    labels = sorted(set(series) | set(paper_series or {}))
    palette = plt.get_cmap("tab20").colors if len(labels) > 10 else [f"C{i}" for i in range(10)]
    for i, label in enumerate(labels):
        colors[label] = palette[i % len(palette)]
    for label, points in sorted(series.items()):
        points = sorted(points)
        ys = [p[1] for p in points]
        errs = [p[2] or 0.0 for p in points]
        ours_ax.errorbar(
            [p[0] for p in points],
            ys,
            yerr=errs,
            marker="o",
            capsize=3,
            color=colors[label],
            label=f"{label} (ours)" if paper_series else label,
        )
    for label, points in sorted((paper_series or {}).items()):
        points = sorted(points)
        paper_ax.plot(
            [p[0] for p in points],
            [p[1] for p in points],
            "s--",
            mfc="none",
            color=colors[label],
            label=f"{label} (paper)",
        )
    for ax in {id(ours_ax): ours_ax, id(paper_ax): paper_ax}.values():
        _style_x(ax, xs_all, log)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if ax.get_legend_handles_labels()[0] and outside:
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
        elif ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    ours_ax.set_title(title, fontsize=10)
    if two:
        paper_ax.set_title(paper_title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return fig


def plot_heatmap(
    grids: dict[str, dict[tuple[float, float], float | None]],
    path: Path,
    *,
    title: str,
    xlabel: str,
    ylabel: str,
) -> Figure:
    """Table 4: one small heat map per source (paper, ours) over the two betas, values written in."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(grids), figsize=(4.2 * len(grids), 3.4), squeeze=False)
    for ax, (name, grid) in zip(axes[0], grids.items(), strict=True):
        rows = sorted({k[0] for k in grid})
        cols = sorted({k[1] for k in grid})
        values = [[grid.get((r, c)) for c in cols] for r in rows]
        shown = [[math.nan if v is None else v for v in line] for line in values]
        image = ax.imshow(shown, cmap="viridis", aspect="auto")
        known = [v for line in values for v in line if v is not None]
        middle = (min(known) + max(known)) / 2 if known else 0.0
        for i, line in enumerate(values):
            for j, v in enumerate(line):
                text, color = ("no run", "black") if v is None else (f"{v:.2f}", "black")
                if v is not None and v < middle:
                    color = "white"  # viridis is dark at the low end
                ax.text(j, i, text, ha="center", va="center", color=color, fontsize=9)
        ax.set_xticks(range(len(cols)), [f"{c:g}" for c in cols])
        ax.set_yticks(range(len(rows)), [f"{r:g}" for r in rows])
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(name, fontsize=10)
        if any(v is not None for line in values for v in line):
            fig.colorbar(image, ax=ax, label="test top-1 (%)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return fig


# ---------------------------------------------------------------------------------- Figure 4

MEMORY_LABELS = {"bptt_latent": "BPTT (latent weights)", "bso": "BSO", "tbso": "T-BSO"}


def memory_points(path: Path) -> tuple[dict, list[dict]]:
    """scripts/bench/memory_vs_T.py's JSON: its meta and, per (method, T), the training memory in
    GB: the tensors training holds (persistent state by role, 1-bit export excluded, plus the peak
    of autograd's saved tensors), and CUDA's peak allocation when measured on a GPU."""
    from bso.metrics.memory import PERSISTENT_ROLES

    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; run `{paper.FIG4_COMMAND}` first")
    data = json.loads(path.read_text())
    held = [r for r in PERSISTENT_ROLES if r != "binary_weights_1bit"]
    points = []
    for p in data["points"]:
        # a role the benchmark file predates (transient_gradients: the lean mode) held nothing
        accounted = sum(p["persistent"].get(r, 0) for r in held) + p["activation_peak_bytes"]
        points.append(
            {
                "method": p["method"],
                "T": p["T"],
                "batch": p["batch"],
                "device": p.get("device", data["meta"].get("device")),
                "accounted_gb": accounted / 1e9,
                "cuda_peak_gb": p["cuda_peak_allocated_bytes"] / 1e9
                if "cuda_peak_allocated_bytes" in p
                else None,
            }
        )
    return data["meta"], points


def fig4_rows(points: list[dict]) -> list[dict]:
    paper_at = {}
    for mp in paper.FIG4:
        paper_at[(mp.method, mp.T)] = mp.gb
    rows = []
    for p in sorted(points, key=lambda p: (p["method"], p["T"])):
        ref = paper_at.get((p["method"], p["T"]), paper_at.get((p["method"], None)))
        rows.append(
            {
                "method": MEMORY_LABELS.get(p["method"], p["method"]),
                "T": p["T"],
                "batch": p["batch"],
                "device": p["device"],
                "ours: tensors (GB)": f"{p['accounted_gb']:.3f}",
                "ours: CUDA peak (GB)": f"{p['cuda_peak_gb']:.3f}"
                if p["cuda_peak_gb"] is not None
                else "-",
                "paper (GB)": "-" if ref is None else ref,
            }
        )
    return rows


def plot_fig4(meta: dict, points: list[dict], path: Path) -> Figure:
    """Memory vs T, one line per method (ours), the paper's points overlaid; log y axis (GB).
    The paper gives BPTT's two end points only (drawn as points) and one value for every T for
    BSO / T-BSO (drawn as a flat dashed line)."""
    from matplotlib.ticker import FormatStrFormatter

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8.4, 4.4))
    Ts = sorted({p["T"] for p in points})
    markers = {"bptt_latent": ("o", 7), "bso": ("s", 8), "tbso": ("^", 5)}  # BSO = T-BSO here
    for i, method in enumerate(MEMORY_LABELS):
        mine = sorted(
            (p["T"], p["cuda_peak_gb"] or p["accounted_gb"])
            for p in points
            if p["method"] == method
        )
        marker, size = markers[method]
        if mine:
            ax.plot([t for t, _ in mine], [g for _, g in mine], marker=marker, ms=size,
                    color=f"C{i}", label=f"{MEMORY_LABELS[method]}, ours")  # fmt: skip
        ref = [mp for mp in paper.FIG4 if mp.method == method]
        if ref and ref[0].T is None:
            ax.plot([min(Ts), max(Ts)], [ref[0].gb] * 2, "--", color=f"C{i}",
                    label=f"{MEMORY_LABELS[method]}, paper (every T)")  # fmt: skip
        elif ref:
            ax.plot([mp.T for mp in ref], [mp.gb for mp in ref], linestyle="none", marker=marker,
                    ms=9, mfc="none", mew=1.5, color=f"C{i}",
                    label=f"{MEMORY_LABELS[method]}, paper")  # fmt: skip
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.set_xticks(Ts)
    ax.set_xlabel("time steps T")
    ax.set_ylabel("training memory (GB, log scale)")
    device = meta.get("device_name") or meta.get("device")
    mode = "BSO/T-BSO lean" if meta.get("lean") else "BSO/T-BSO plain"
    ax.set_title(
        f"Figure 4: training memory vs T, VGG-11 on 32x32 input\nours: {meta.get('device')} "
        f"({device}), batch {meta.get('batch')}, {mode}, weights + grads + optimizer state + "
        "activations; paper: GPU",
        fontsize=9,
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return fig


# ------------------------------------------------------------------------ artefact figures


def artefact_figure(
    artefact: str, cells: Sequence[Cell], rows: Sequence[dict], path: Path
) -> Figure:
    """Figure 5 / Table 3 / Table 4 from the cells' rows (ours) and the cells (paper)."""
    digits = cells[0].dataset == "digits"
    where = "digits, vgg_tiny" if digits else paper.DATASET_NAMES[cells[0].dataset]
    paper_where = paper.DATASET_NAMES[paper.cells(artefact)[0].dataset] + ", VGG-11"
    if artefact == "table4":
        ours = {c.x: r["_final_mean"] for c, r in zip(cells, rows, strict=True)}
        ref = {c.x: c.value for c in cells}
        return plot_heatmap(
            {f"paper ({paper_where})": ref, f"ours ({where})": ours},
            path,
            title="Table 4: T-BSO at T=2, gamma 5e-7: test top-1 (%) over (1 - beta1, 1 - beta2)",
            xlabel="1 - beta2",
            ylabel="1 - beta1",
        )
    series: dict[str, list] = {}
    paper_series: dict[str, list] = {}
    for cell, row in zip(cells, rows, strict=True):
        label = paper.METHOD_NAMES[cell.method]
        x = cell.T if artefact == "fig5" else cell.x
        if row["_final_mean"] is not None:
            series.setdefault(label, []).append((x, row["_final_mean"], row["_final_std"]))
        paper_series.setdefault(label, []).append((x, cell.value))
    xlabel = "time steps T" if artefact == "fig5" else "flip threshold gamma (log scale)"
    title = (
        f"{paper.TITLES[artefact].split(':')[0]}: ours ({where})"
        if digits
        else f"{paper.TITLES[artefact]}\nours: solid, mean +- std over seeds; the paper: dashed"
    )
    return plot_lines(
        series,
        path,
        xlabel=xlabel,
        title=title,
        paper_series=paper_series,
        paper_title=f"paper ({paper_where})" if digits else None,
    )


def runs_figure(rows: Sequence[dict], keys: Sequence[str], by: str, path: Path) -> Figure:
    """Final test top-1 against config key ``by``: one line per setting of everything else that
    varies between the rows (dataset, method, T, the other swept keys), seeds as error bars."""
    if by != "engine.T" and by not in keys:
        raise ValueError(f"{by!r} was not swept in these runs; swept keys: {['engine.T', *keys]}")
    others = ["method"] + [k for k in ("dataset", "T") if k != by.replace("engine.", "")]
    others = [k for k in others if k == "method" or len({r[k] for r in rows}) > 1]

    def says_more_than_the_method(key: str) -> bool:  # e.g. not engine=bptt next to FP-SNN
        per_method: dict[str, set] = {}
        for r in rows:
            per_method.setdefault(r["method"], set()).add(r["_setting"][key])
        return any(len(values) > 1 for values in per_method.values())

    other_keys = [k for k in keys if k != by and says_more_than_the_method(k)]
    series: dict[str, list] = {}
    for row in rows:
        value = row["T"] if by == "engine.T" else row["_setting"][by]
        if row["_final_mean"] is None or value is None:
            continue
        parts = [
            paper.METHOD_NAMES.get(row[k], row[k]) if k == "method" else f"{k}={row[k]}"
            for k in others
        ]
        parts += [f"{k.rsplit('.', 1)[-1]}={row['_setting'][k]}" for k in other_keys
                  if row["_setting"][k] is not None]  # fmt: skip
        label = ", ".join(str(p) for p in parts) or "all runs"
        series.setdefault(label, []).append((float(value), row["_final_mean"], row["_final_std"]))
    if not series:
        raise ValueError("no completed run to plot")
    name = AXIS_LABELS.get(by, by)
    xlabel = name + (" (log scale)" if _is_log([p[0] for v in series.values() for p in v]) else "")
    return plot_lines(series, path, xlabel=xlabel, title=f"test top-1 vs {name}")
