"""Tables: markdown and CSV text, a wandb.Table, the runs table (one row per setting found under a
directory, the swept keys as columns) and Figure 4's table from the memory benchmark."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from bso import paper
from bso.report.runs import (
    RunRecord,
    Summary,
    fmt_epochs,
    fmt_stats,
    identity,
    method_of,
    target_class,
)


def public(row: dict) -> dict:
    """The row without its ``_``-prefixed keys (values kept for figures, not shown)."""
    return {k: v for k, v in row.items() if not k.startswith("_")}


def markdown(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    """A markdown table of ``rows`` (commands in backticks)."""
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
    """The rows' public columns as CSV text."""
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

# Overrides that never make a different setting: a sweep's seeds are aggregated; the rest is
# bookkeeping. `init_from` is the ImageNet pre-training's path (a placeholder in the commands).
NOT_A_SETTING = ("seed", "logger", "device", "save_checkpoint", "init_from", "checkpoint", "sweep")


def _override_items(run: RunRecord) -> dict[str, str]:
    items = {}
    for o in run.overrides:
        key, _, value = o.partition("=")
        key = key.lstrip("+~")
        if key.startswith("hydra.") or key in NOT_A_SETTING:
            continue
        items[key] = value
    return items


def setting_value(run: RunRecord, key: str) -> str | None:
    """What the run trained with for an overridden ``key``: the config's value (so `gamma=5e-7`
    and the default 5e-07 agree); for a config group, its `name` or class; else the override."""
    value = OmegaConf.select(run.cfg, key, default=None)
    if isinstance(value, DictConfig):
        value = value.get("name") or target_class(value.get("_target_"))
    if value is None:
        value = _override_items(run).get(key)
    if isinstance(value, float):
        return f"{value:g}"
    return None if value is None else str(value)


def swept_keys(runs: Sequence[RunRecord]) -> list[str]:
    """The overridden keys (.hydra/overrides.yaml) whose value is not the same in every run;
    the seed is not a setting (aggregated)."""
    keys = sorted({k for r in runs for k in _override_items(r)})
    return [k for k in keys if len({setting_value(r, k) for r in runs}) > 1]


def sort_value(v):
    """Numbers before text, numbers by value (``5e-07`` < ``1e-06``)."""
    try:
        return (0, float(v), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(v))


def runs_rows(
    runs: Sequence[RunRecord], env_keys: Sequence[str] = ()
) -> tuple[list[dict], list[str]]:
    """One row per distinct setting (swept keys as columns), seeds aggregated as mean +- std;
    ``env_keys`` (:meth:`RunRecord.environment_value`) add columns and split a setting's runs by
    them, so results from different environments never share a row."""
    keys = [k for k in swept_keys(runs) if k != "engine.T"]
    groups: dict[tuple, list[RunRecord]] = {}
    for run in runs:
        setting = tuple(setting_value(run, k) for k in keys)
        environment = tuple(run.environment_value(k) for k in env_keys)
        groups.setdefault((identity(run.cfg), setting, environment), []).append(run)
    rows = []
    for (_, setting, environment), members in groups.items():
        cfg = members[0].cfg
        s = Summary(members)
        n = len(s.done)
        peaks = [r.peak_mb for r in s.done if r.peak_mb is not None]
        row = {
            "dataset": cfg.dataset.name,
            "model": cfg.model.get("name") or target_class(cfg.model.get("_target_")),
            "method": method_of(cfg),
            "T": cfg.engine.T,
            **dict(zip(keys, setting, strict=True)),
            **{f"env:{k}": v for k, v in zip(env_keys, environment, strict=True)},
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
            *(sort_value(r["_setting"][k]) for k in keys),
        )
    )
    return rows, keys


# ------------------------------------------------------------------------- Figure 4's table


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
        # a role the file does not list (e.g. transient_gradients) held nothing
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
    """Figure 4's table: per measured (method, T), ours beside the paper's GB."""
    paper_at = {(mp.method, mp.T): mp.gb for mp in paper.FIG4}
    rows = []
    for p in sorted(points, key=lambda p: (p["method"], p["T"])):
        ref = paper_at.get((p["method"], p["T"]), paper_at.get((p["method"], None)))
        rows.append(
            {
                "method": paper.FIG4_METHODS.get(p["method"], p["method"]),
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
