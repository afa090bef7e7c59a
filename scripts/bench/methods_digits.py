"""Every method of Table 2 (and AGMM) on the embedded digits at several T, trained with the recipe
the paper cells use (bso.paper.METHODS: the same overrides as the experiment files): final test
accuracy and peak training memory (autograd's saved tensors, process RSS). Each run is a fresh
process of `train.py`, so peak RSS belongs to that run alone. Accuracy is deterministic (same
seed, same float order): it does not depend on the machine's load.

    python scripts/bench/methods_digits.py                 # T = 2 and 8, every method
    python scripts/bench/methods_digits.py --T 2 --methods tbso bso --epochs 2
    python scripts/bench/methods_digits.py --timing        # also training samples/s (idle machine)

Writes benchmarks/results/methods_digits.{json,md} (or --out).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from bso import paper

ROOT = Path(__file__).resolve().parents[2]
METHODS = list(paper.METHOD_OVERRIDES)  # the methods bso trains, in Table 2's order


def run(method: str, T: int, epochs: int | None, run_dir: Path) -> dict:
    cmd = [
        sys.executable,
        "train.py",
        *paper.METHOD_OVERRIDES[method],
        f"engine.T={T}",
        "logger=none",
        "device=cpu",
        "save_checkpoint=false",
        f"hydra.run.dir={run_dir}",
    ]
    if epochs:
        cmd.append(f"dataset.epochs={epochs}")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{method} T={T} failed:\n{proc.stderr[-2000:]}")
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = records[-1]
    return {
        "method": method,
        "T": T,
        "overrides": list(paper.METHOD_OVERRIDES[method]),
        "epochs": last["epoch"],
        "test_acc1": last["test/acc1"],
        "peak_rss_mb": last["memory/peak_rss_mb"],
        "activation_peak_mb": max(r["memory/activation_peak_mb"] for r in records),
        "train_samples_per_s": sum(r["throughput/train_samples_per_s"] for r in records)
        / len(records),
        "flip_rate_last_epoch": last.get("flip_rate/all"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--T", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--epochs", type=int, default=None, help="default: the dataset's (8)")
    parser.add_argument(
        "--timing",
        action="store_true",
        help="also record training samples/s (meaningful on an otherwise idle machine only)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/methods_digits")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for T in args.T:
            for method in args.methods:
                row = run(method, T, args.epochs, Path(tmp) / f"{method}-T{T}")
                if not args.timing:
                    del row["train_samples_per_s"]
                rows.append(row)
                print(json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "device": "cpu",
        "cpu": platform.processor() or platform.machine(),
        "threads": "default",
        "recipe": "bso.paper.METHODS",
    }
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    header = "| method | T | test acc (%) | activation peak (MB) | peak RSS (MB) |"
    lines = [
        header + (" train samples/s |" if args.timing else ""),
        "|---" * (6 if args.timing else 5) + "|",
    ]
    for r in rows:
        line = (
            f"| {paper.METHOD_NAMES[r['method']]} | {r['T']} | {100 * r['test_acc1']:.2f} "
            f"| {r['activation_peak_mb']:.2f} | {r['peak_rss_mb']:.0f} |"
        )
        if args.timing:
            line += f" {r['train_samples_per_s']:.0f} |"
        lines.append(line)
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
