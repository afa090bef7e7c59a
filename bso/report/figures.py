"""The report's three kinds of figure: lines of accuracy against a swept value (Figure 5, Table 3,
the runs table against any key), a heat map over two swept values (Table 4), and memory against T
(Figure 4); each with the paper's points beside ours."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from bso import paper
from bso.paper import Cell

if TYPE_CHECKING:
    from matplotlib.figure import Figure

AXIS_LABELS = {
    "engine.T": "time steps T",
    "optimizer.binary.gamma": "flip threshold gamma",
    "optimizer.binary.beta": "BSO momentum beta",
    "optimizer.binary.beta1": "T-BSO beta1",
    "optimizer.binary.beta2": "T-BSO beta2",
    "dataset.epochs": "epochs",
    "seed": "seed",
}


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
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
    plt = pyplot()
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
    plt = pyplot()
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


def plot_fig4(meta: dict, points: list[dict], path: Path) -> Figure:
    """Memory vs T, one line per method (ours), the paper's points overlaid; log y axis (GB).
    The paper gives BPTT's two end points only (drawn as points) and one value for every T for
    BSO / T-BSO (drawn as a flat dashed line)."""
    from matplotlib.ticker import FormatStrFormatter

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8.4, 4.4))
    Ts = sorted({p["T"] for p in points})
    markers = {"bptt_latent": ("o", 7), "bso": ("s", 8), "tbso": ("^", 5)}  # BSO = T-BSO here
    for i, method in enumerate(paper.FIG4_METHODS):
        mine = sorted(
            (p["T"], p["cuda_peak_gb"] or p["accounted_gb"])
            for p in points
            if p["method"] == method
        )
        marker, size = markers[method]
        if mine:
            ax.plot([t for t, _ in mine], [g for _, g in mine], marker=marker, ms=size,
                    color=f"C{i}", label=f"{paper.FIG4_METHODS[method]}, ours")  # fmt: skip
        ref = [mp for mp in paper.FIG4 if mp.method == method]
        if ref and ref[0].T is None:
            ax.plot([min(Ts), max(Ts)], [ref[0].gb] * 2, "--", color=f"C{i}",
                    label=f"{paper.FIG4_METHODS[method]}, paper (every T)")  # fmt: skip
        elif ref:
            ax.plot([mp.T for mp in ref], [mp.gb for mp in ref], linestyle="none", marker=marker,
                    ms=9, mfc="none", mew=1.5, color=f"C{i}",
                    label=f"{paper.FIG4_METHODS[method]}, paper")  # fmt: skip
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
