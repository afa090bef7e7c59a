"""The lean mode against the plain mode, in one run: persistent bytes per binary weight, activation
peak (autograd's saved tensors) and time per time step, for BSO / T-BSO online per-step training of
VGG-11 on CIFAR-shaped input.

    python scripts/bench/lean.py          # T-BSO and BSO, T=6, batch 128 (CPU: ~9 min)
    python scripts/bench/lean.py --batch 4 --T 2 --layers 8C3-AP2-16C3 --iters 1 --out /tmp/lean

Plain: float32 +-1 weights with a gradient each, update after backward. Lean (engine.lean): packed
1-bit weights, the flip rule inside backward, no stored binary-weight gradient. Recompute: the lean
mode with engine.recompute_binary_convs=true (each binary conv's output recomputed in backward).
All modes are built from the same seed; their flips are checked equal on the measured batches.
Timing interleaves the modes batch by batch (median of ``--iters``) so that the shared machine's load
hits them alike.
Writes <out>.json and <out>.md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from _common import ROOT, build_method, device_meta, sync, write_results

from bso.distributed import resolve_device
from bso.metrics.memory import SavedTensorMeter, persistent_state_bytes
from bso.models import VGG11

MODES = ("plain", "lean", "recompute")  # recompute: lean + engine.recompute_binary_convs=true


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--T", type=int, default=6)
    parser.add_argument("--methods", nargs="+", default=["tbso", "bso"], choices=["bso", "tbso"])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--layers", default=VGG11)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/lean")
    args = parser.parse_args()
    device = resolve_device(args.device)
    batch = args.batch
    torch.manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)

    rows = []
    for method in args.methods:
        built = {
            mode: build_method(
                method,
                args.T,
                args.layers,
                device,
                lean=mode != "plain",
                recompute_binary_convs=mode == "recompute",
            )
            for mode in MODES
        }
        result = {mode: {"seconds": []} for mode in MODES}
        flips = {}
        for mode, (model, engine, opt) in built.items():  # warm-up batch, with the meter
            with SavedTensorMeter() as meter:
                flips[mode] = engine.train_batch(model, opt, x, y)[2].tolist()
            result[mode]["activation_peak_bytes"] = meter.peak_bytes
            mem = persistent_state_bytes(model, opt)
            result[mode]["persistent"] = mem
            result[mode]["bytes_per_binary_weight"] = sum(mem["per_binary_weight"].values())
        assert flips["plain"] == flips["lean"] == flips["recompute"], (method, flips)
        for _ in range(args.iters):
            for mode, (model, engine, opt) in built.items():
                sync(device)
                start = time.perf_counter()
                engine.train_batch(model, opt, x, y)
                sync(device)
                result[mode]["seconds"].append(time.perf_counter() - start)
        for mode in MODES:
            seconds = statistics.median(result[mode]["seconds"])
            result[mode]["ms_per_time_step"] = seconds / args.T * 1e3
        row = {"method": method, "T": args.T, "batch": batch, "same_flips": True}
        for key in ("bytes_per_binary_weight", "activation_peak_bytes", "ms_per_time_step"):
            row[key] = {mode: result[mode][key] for mode in MODES}
            row[key]["ratio"] = result["lean"][key] / result["plain"][key]
            row[key]["recompute_ratio"] = result["recompute"][key] / result["plain"][key]
        row["persistent"] = {mode: result[mode]["persistent"] for mode in MODES}
        row["seconds"] = {mode: result[mode]["seconds"] for mode in MODES}
        rows.append(row)
        print(
            f"{method}: B/weight {row['bytes_per_binary_weight']}, "
            f"activation MB {[round(v / 1e6, 1) for v in row['activation_peak_bytes'].values()]}, "
            f"ms/step {row['ms_per_time_step']}",
            flush=True,
        )
    meta = {**device_meta(device), "layers": args.layers, "iters": args.iters}
    lines = [
        f"{meta['device_name']} ({meta['device']}, {meta['threads']} threads), batch {batch}, "
        f"T={args.T}, median of {args.iters} batches per mode",
        "",
        "| method | quantity | plain | lean | lean / plain "
        "| lean + recompute_binary_convs | its / plain |",
        "|---|---|---|---|---|---|---|",
    ]
    quantities = (
        ("bytes_per_binary_weight", "persistent bytes per binary weight", 1, ".3f"),
        ("activation_peak_bytes", "activation peak (MB)", 1e6, ".1f"),
        ("ms_per_time_step", "time per time step (ms)", 1, ".1f"),
    )
    for r in rows:
        for key, label, unit, f in quantities:
            q = r[key]
            lines.append(
                f"| {r['method']} | {label} | {q['plain'] / unit:{f}} | {q['lean'] / unit:{f}} "
                f"| {q['ratio']:.3f} | {q['recompute'] / unit:{f}} | {q['recompute_ratio']:.3f} |"
            )
    write_results(args.out, meta, rows, lines)


if __name__ == "__main__":
    main()
