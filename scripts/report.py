"""Turn run directories into the paper's tables and figures.

    python scripts/report.py outputs/                      # every run below outputs/
    python scripts/report.py outputs/multirun/<sweep> --by engine.T --figure acc_vs_T.png

Reads each run's config.yaml and metrics.jsonl and prints a markdown table, one row per run, with
the method (dataset, model, weights, optimizer, engine, T), final and best test top-1, model size,
and peak memory. ``--by KEY`` also plots final test accuracy against that config key (e.g.
``engine.T`` for Figure 5, ``optimizer.binary.gamma`` for Table 3), one line per optimizer and
dataset. ``--out FILE.md`` writes the table too.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from omegaconf import OmegaConf


def load_runs(root: Path) -> list[dict]:
    runs = []
    for metrics in sorted(root.rglob("metrics.jsonl")):
        run_dir = metrics.parent
        if not (run_dir / "config.yaml").is_file():
            continue
        cfg = OmegaConf.load(run_dir / "config.yaml")
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        records = [r for r in records if "epoch" in r]
        if not records:
            continue
        info = run_dir / "run_info.json"
        size = json.loads(info.read_text()).get("model_size", {}) if info.is_file() else {}
        runs.append({"dir": run_dir, "cfg": cfg, "records": records, "size": size})
    return runs


def row(run: dict) -> dict:
    cfg, last = run["cfg"], run["records"][-1]
    return {
        "run": str(run["dir"]),
        "dataset": cfg.dataset.name,
        "model": cfg.model._target_.rsplit(".", 1)[-1],
        "weights": cfg.model.weights + ("+agmm" if cfg.model.get("agmm") else ""),
        "optimizer": cfg.optimizer.name,
        "engine": cfg.engine._target_.rsplit(".", 1)[-1].replace("Engine", "").lower()
        + (f"/{cfg.engine.trace}" if "trace" in cfg.engine else ""),
        "T": cfg.engine.T,
        "epochs": last["epoch"],
        "final_acc": 100 * last["test/acc1"],
        "best_acc": 100 * max(r["test/acc1"] for r in run["records"]),
        "size_mb": run["size"].get("size_mb", float("nan")),
        "peak_mb": max(
            r.get("memory/cuda_peak_allocated_mb", r.get("memory/peak_rss_mb", 0.0))
            for r in run["records"]
        ),
    }


def table(rows: list[dict]) -> str:
    head = (
        "| dataset | model | weights | optimizer | engine | T | epochs | final acc (%) "
        "| best acc (%) | size (MB) | peak memory (MB) |"
    )
    lines = [head, "|" + "---|" * 11]
    for r in sorted(rows, key=lambda r: (r["dataset"], r["optimizer"], r["engine"], r["T"])):
        lines.append(
            f"| {r['dataset']} | {r['model']} | {r['weights']} | {r['optimizer']} | {r['engine']} "
            f"| {r['T']} | {r['epochs']} | {r['final_acc']:.2f} | {r['best_acc']:.2f} "
            f"| {r['size_mb']:.2f} | {r['peak_mb']:.0f} |"
        )
    return "\n".join(lines)


def figure(runs: list[dict], key: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[float, float]]] = {}
    for run in runs:
        value = OmegaConf.select(run["cfg"], key)
        if value is None:
            continue
        label = f"{run['cfg'].optimizer.name} ({run['cfg'].dataset.name})"
        series.setdefault(label, []).append((float(value), 100 * run["records"][-1]["test/acc1"]))
    fig, ax = plt.subplots(figsize=(5, 4))
    for label, points in sorted(series.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=label)
    ax.set_xlabel(key)
    ax.set_ylabel("test top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("root", type=Path, nargs="?", default=Path("outputs"))
    parser.add_argument("--by", help="config key for the x axis of --figure, e.g. engine.T")
    parser.add_argument("--figure", type=Path, help="PNG path for the accuracy plot")
    parser.add_argument("--out", type=Path, help="also write the table to this markdown file")
    args = parser.parse_args()
    runs = load_runs(args.root)
    if not runs:
        raise SystemExit(f"no run directories (config.yaml + metrics.jsonl) under {args.root}")
    text = table([row(r) for r in runs])
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    if args.by and args.figure:
        figure(runs, args.by, args.figure)
        print(f"wrote {args.figure}")


if __name__ == "__main__":
    main()
