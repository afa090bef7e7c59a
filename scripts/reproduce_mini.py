"""The paper's tables and figures, reproduced small on the embedded digits (`make reproduce-mini`).

Trains, on the digits with vgg_tiny and a few epochs (CPU), one run per seed (--seeds), the cells
of Table 2 (CIFAR-10's six methods at the paper's T), Figure 5 (BSO / T-BSO vs T, up to --max-T),
Table 3 (T-BSO's gamma sweep at T=2) and Table 4 (its betas), each group of cells as one Hydra
multirun of train.py, skipping cells that already have a completed run with that seed under --runs;
then renders them with bso-report (bso.report) into --out: <artefact>.md, <artefact>.csv and, for the
figures, <artefact>.png. Training seconds per artefact go to <out>/meta.json.
Figure 4 is rendered from the memory benchmark (benchmarks/results/memory_vs_T.json, `make fig4`);
`energy` (firing rates, SOPs, energy per sample and a per-layer firing-rate figure) from Table 2's
runs (docs/metrics.md).

    python scripts/reproduce_mini.py                                  # ~ a few minutes, 2 cores
    python scripts/reproduce_mini.py --epochs 1 --seeds 0 --artefacts table3 \\
        --gammas 5e-07 2e-06 --runs /tmp/mini/runs --out /tmp/mini/results   # a cut-down check
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bso.report import cli as report_cli
from bso.report.matching import match, prepare_cells
from bso.report.runs import load_runs
from bso.report.tables import sort_value

ROOT = Path(__file__).resolve().parents[1]
FIG4_JSON = ROOT / "benchmarks/results/memory_vs_T.json"

# fig4: the memory benchmark's JSON; energy: firing rates, SOPs and energy of Table 2's runs
ARTEFACTS = ("table2", "fig5", "table3", "table4", "fig4", "energy")
FIXED = ("logger=none", "device=cpu", "save_checkpoint=false")


def cells_to_train(artefact: str, args: argparse.Namespace):
    artefact = "table2" if artefact == "energy" else artefact  # the energy table reads its runs
    cells = prepare_cells(
        artefact, digits=True, extra=[f"dataset.epochs={args.epochs}", *args.extra]
    )
    if artefact == "fig5":
        cells = [c for c in cells if c.T <= args.max_T]
    if artefact == "table3" and args.gammas:
        cells = [c for c in cells if f"{c.x:g}" in {f"{float(g):g}" for g in args.gammas}]
    return cells


def multiruns(cells) -> list[list[str]]:
    """Cells of one method whose overrides form a product -> one multirun's overrides each."""
    groups: dict[tuple, list] = {}
    for cell in cells:
        keys = tuple(o.split("=", 1)[0] for o in cell.overrides)
        groups.setdefault((cell.method, keys), []).append(cell)
    out = []
    for (_, keys), members in groups.items():
        values = [
            sorted({c.overrides[i].split("=", 1)[1] for c in members}, key=sort_value)
            for i in range(len(keys))
        ]
        if len(list(itertools.product(*values))) == len(members):
            out.append([f"{k}={','.join(v)}" for k, v in zip(keys, values, strict=True)])
        else:
            out.extend(list(c.overrides) for c in members)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=8)  # the digits recipe (dataset=digits)
    parser.add_argument("--artefacts", nargs="+", default=list(ARTEFACTS), choices=ARTEFACTS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="one run per seed")
    parser.add_argument("--max-T", type=int, default=8, help="Figure 5: train T up to this")
    parser.add_argument("--gammas", nargs="+", help="Table 3: only these gammas (default: all 8)")
    report_cli.add_with_option(
        parser, "an override added to every run (e.g. a narrower model for a quick check)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="OMP/torch threads per run (1 keeps runs steady on a busy machine)",
    )
    parser.add_argument("--runs", type=Path, default=ROOT / "outputs/mini")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/mini")
    args = parser.parse_args()
    if args.epochs < 1 or args.max_T < 1:
        parser.error("--epochs and --max-T must be at least 1")

    start = time.perf_counter()
    args.runs.mkdir(parents=True, exist_ok=True)
    timings = {}
    for artefact in [a for a in args.artefacts if a != "fig4"]:
        cells = cells_to_train(artefact, args)
        summaries = match(cells, load_runs(args.runs))
        t0, trained = time.perf_counter(), 0
        for seed in args.seeds:  # the cells that lack a completed run with this seed
            todo = [c for c, s in zip(cells, summaries, strict=True)
                    if seed not in {r.cfg.seed for r in s.done}]  # fmt: skip
            for i, overrides in enumerate(multiruns(todo)):
                sweep_dir = args.runs / artefact / f"seed{seed}_{int(time.time())}_{i}"
                cmd = [sys.executable, "train.py", "-m", *overrides, f"seed={seed}", *FIXED,
                       f"hydra.sweep.dir={sweep_dir}"]  # fmt: skip
                print("+", " ".join(cmd[1:]), flush=True)
                env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
                proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
                if proc.returncode != 0:
                    raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
            trained += len(todo)
        if not trained:
            continue  # every cell already has its completed runs: keep the recorded timing
        timings[artefact] = {"runs": trained, "seconds": round(time.perf_counter() - t0, 1)}

    args.out.mkdir(parents=True, exist_ok=True)
    for artefact in args.artefacts:
        argv = [
            artefact,
            str(args.runs),
            "--digits",
            f"--with=dataset.epochs={args.epochs}",
            *(f"--with={e}" for e in args.extra),
            "--out",
            str(args.out / f"{artefact}.md"),
            "--csv",
            str(args.out / f"{artefact}.csv"),
        ]
        if artefact in ("fig4", "energy"):  # fig4: measured by `make fig4`, not trained here
            argv = [
                artefact,
                *([str(args.runs / "table2")] if artefact == "energy" else []),  # Table 2's runs
                "--out",
                str(args.out / f"{artefact}.md"),
                "--csv",
                str(args.out / f"{artefact}.csv"),
            ]
        if artefact in report_cli.FIGURES:
            argv += ["--figure", str(args.out / f"{artefact}.png")]
        report_cli.main(argv, fig4_json=FIG4_JSON)
    # Training time per artefact, summed over invocations with the same epochs and overrides.
    meta_path = args.out / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    setup = {"epochs": args.epochs, "extra": args.extra}
    if any(meta.get(k) != v for k, v in setup.items()):
        meta = {**setup, "train": {}}
    meta["seeds"] = sorted(set(meta.get("seeds", [])) | set(args.seeds))
    for artefact, t in timings.items():  # accumulated over calls (e.g. one per added seed)
        done = meta["train"].get(artefact, {"runs": 0, "seconds": 0.0, "load_avg_max": 0.0})
        meta["train"][artefact] = {
            "runs": done["runs"] + t["runs"],
            "seconds": round(done["seconds"] + t["seconds"], 1),
            "threads": args.threads,
            "cpus": os.cpu_count(),
            "load_avg_max": round(max(done["load_avg_max"], *os.getloadavg()[:2]), 1),
        }
    meta["train_seconds_total"] = round(sum(t["seconds"] for t in meta["train"].values()), 1)
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    took = round(time.perf_counter() - start, 1)
    print(f"\nmini reproduction: {took:.0f} s in this call; training recorded: {meta['train']}")


if __name__ == "__main__":
    main()
