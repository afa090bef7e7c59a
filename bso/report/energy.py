"""The energy report (``bso-report energy ROOT``): for every setting under ROOT, its
accuracy, firing rate, synaptic operations and energy per sample (bso.metrics.snn, the final
epoch's evaluation, mean over seeds), and the ratio to the full-precision SNN of the same
architecture; and a figure of the firing rate of each spiking layer (docs/metrics.md)."""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import OmegaConf

from bso import paper
from bso.report.figures import pyplot
from bso.report.runs import RunRecord, Summary, fmt_stats, identity, method_of, target_class

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# model keys a full-precision twin may differ in: the weights and the gate of the binary methods
NOT_ARCHITECTURE = (
    "name",
    "weights",
    "agmm",
    "agmm_num_steps",
    "agmm_statistic",
    "agmm_learnable_alpha",
)


def final_metrics(run: RunRecord) -> dict | None:
    """The SNN metrics of the run's final epoch, or None if it logged none (metrics.snn=false)."""
    if not run.records or "energy/total_uj" not in run.records[-1]:
        return None
    return {
        k: v
        for k, v in run.records[-1].items()
        if k.split("/")[0] in ("firing_rate", "spikes", "sops", "macs", "energy")
    }


def architecture(run: RunRecord) -> str:
    """The model config without its weight mode and name: what a full-precision twin shares."""
    model = OmegaConf.to_container(run.cfg.model, resolve=True)
    for key in NOT_ARCHITECTURE:
        model.pop(key, None)
    return json.dumps([run.cfg.dataset.name, model], sort_keys=True)


# overrides that say where or how a run ran, not what it trained
NOT_SETTING = (
    "seed",
    "hydra.",
    "logger",
    "device",
    "paths.",
    "save_checkpoint",
    "resume",
    "dataset.epochs",
)


def swept(run: RunRecord) -> dict[str, str]:
    """The run's command-line overrides (.hydra/overrides.yaml) that define what it trained."""
    pairs = (o.lstrip("+~").split("=", 1) for o in run.overrides if "=" in o)
    return {k: v for k, v in pairs if not k.startswith(NOT_SETTING)}


def _name_settings(rows: list[dict]) -> None:
    """Rows of the same dataset, model, method and T (e.g. a gamma sweep) get a ``setting``: the
    overrides in which they differ; every other row gets "-"."""
    cells: dict[tuple, list[dict]] = {}
    for row in rows:
        cells.setdefault((row["dataset"], row["model"], row["method"], row["T"]), []).append(row)
    for members in cells.values():
        keys = sorted({k for r in members for k in r["_swept"]})
        differ = [k for k in keys if len({r["_swept"].get(k) for r in members}) > 1]
        for r in members:
            r["setting"] = ", ".join(f"{k}={r['_swept'].get(k, 'default')}" for k in differ) or "-"


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def energy_rows(runs: Sequence[RunRecord]) -> list[dict]:
    """One row per setting (seeds aggregated: metrics averaged over its completed runs that logged
    them), sorted by dataset, architecture, method and T."""
    groups: dict[tuple, list[RunRecord]] = {}
    for run in runs:
        groups.setdefault(identity(run.cfg), []).append(run)
    rows = []
    for members in groups.values():
        cfg = members[0].cfg
        summary = Summary(members)
        measured = [m for m in (final_metrics(r) for r in summary.done) if m is not None]
        mean = (
            {k: _mean([m[k] for m in measured if k in m]) for k in measured[0]} if measured else {}
        )
        layers = [
            k.split("/", 1)[1]
            for k in mean
            if k.startswith("firing_rate/") and k != "firing_rate/all"
        ]
        rows.append(
            {
                "dataset": cfg.dataset.name,
                "model": cfg.model.get("name") or target_class(cfg.model.get("_target_")),
                "method": paper.METHOD_NAMES.get(method_of(cfg), method_of(cfg)),
                "T": int(cfg.engine.T),
                "accuracy (%)": fmt_stats(summary.final, len(summary.done)),
                "firing rate (%)": _fmt(mean.get("firing_rate/all"), 100, ".2f"),
                "spikes / sample": _fmt(mean.get("spikes/per_sample"), 1, ".0f"),
                "SOPs (M)": _fmt(mean.get("sops/total"), 1e-6, ".3f"),
                "MACs (M)": _fmt(mean.get("macs/total"), 1e-6, ".3f"),
                "energy (uJ)": _fmt(mean.get("energy/total_uj"), 1, ".3f"),
                "vs FP-SNN": "-",
                "runs": f"{len(measured)}/{len(summary.done)}"
                + (f" (+{len(summary.unfinished)} unfinished)" if summary.unfinished else ""),
                "_method": method_of(cfg),
                "_swept": swept(members[0]),
                "_arch": architecture(members[0]),
                "_energy": mean.get("energy/total_uj"),
                "_firing": {layer: mean[f"firing_rate/{layer}"] for layer in layers},
            }
        )
    for row in rows:  # the full-precision SNN of the same architecture: same T, else the nearest
        twins = [
            r
            for r in rows
            if r["_method"] == "fp_snn" and r["_arch"] == row["_arch"] and r["_energy"]
        ]
        if twins and row["_energy"] is not None:
            twin = min(twins, key=lambda r: (abs(r["T"] - row["T"]), r["T"]))
            ratio = row["_energy"] / twin["_energy"]
            row["vs FP-SNN"] = f"{ratio:.2f}x" + (
                "" if twin["T"] == row["T"] else f" (T={twin['T']})"
            )
    _name_settings(rows)
    if all(r["setting"] == "-" for r in rows):
        for r in rows:
            del r["setting"]
    else:  # the column after T
        rows = [
            {k: r[k] for k in (*list(r)[: list(r).index("T") + 1], "setting")}
            | {k: v for k, v in r.items() if k not in ("setting",)}
            for r in rows
        ]
    rows.sort(
        key=lambda r: (
            r["dataset"],
            r["_arch"],
            r["_method"] != "fp_snn",
            r["method"],
            r["T"],
            r.get("setting", ""),
        )
    )
    return rows


def _fmt(value: float | None, scale: float, spec: str) -> str:
    return "-" if value is None else format(value * scale, spec)


def firing_rate_figure(rows: Sequence[dict], path: Path) -> Figure:
    """Firing rate (%) of each spiking layer, one line per setting, written to ``path``."""
    plt = pyplot()
    plotted = [r for r in rows if r["_firing"]]
    if not plotted:
        raise ValueError("no run logged firing rates (metrics.snn=true); nothing to plot")
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    markers = "osD^vPX*<>"
    for i, row in enumerate(plotted):
        layers = list(row["_firing"])
        short = [layer.removesuffix(".neuron") for layer in layers]
        label = f"{row['method']} T={row['T']}"
        if row.get("setting", "-") != "-":
            label += f", {row['setting']}"
        if len({r["model"] for r in plotted}) > 1 or len({r["dataset"] for r in plotted}) > 1:
            label += f" ({row['dataset']}, {row['model']})"
        ax.plot(
            short,
            [100 * row["_firing"][k] for k in layers],
            marker=markers[i % len(markers)],
            linestyle="-" if i < 10 else "--",
            label=label,
        )
    ax.set_xlabel("spiking layer (in forward order)")
    ax.set_ylabel("firing rate (% of neurons x time steps)")
    ax.set_title("Per-layer firing rate on the test set (final epoch)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    return fig


ENERGY_TITLE = (
    "Energy at inference per test sample (final epoch; mean over seeds): firing rate = spikes / "
    "(neurons x T); SOPs = accumulates caused by spikes (binary and spike-driven layers), MACs = "
    "multiply-accumulates of real-valued inputs (first conv, classifier); energy = SOPs x E_AC + "
    "MACs x E_MAC with each run's metrics.energy (default 0.9 pJ and 4.6 pJ: 45 nm, Horowitz "
    "2014); vs FP-SNN = energy / that of the full-precision SNN of the same architecture "
    "(docs/metrics.md)"
)
