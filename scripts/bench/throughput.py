"""Training speed per method, mode and T: samples/s, ms per time step, and the binary optimizer step's
own cost (the flip rule over all binary weights; T-BSO runs it T times per batch).

    python scripts/bench/throughput.py                              # VGG-11, CIFAR-shaped, T = 1 2 4 6
    python scripts/bench/throughput.py --layers 8C3-AP2-16C3 --T 2 --batch 4 --iters 2 --out /tmp/tp

BSO / T-BSO run in ``--modes`` (default: the lean mode, as train.py trains them, eager and with
backend=fused); BPTT-latent in its only mode (plain). Synthetic CIFAR-shaped tensors (data
loading is measured separately). Writes <out>.json and <out>.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from _common import (
    METHODS,
    ROOT,
    add_host_memory_flag,
    add_modes_flag,
    apply_host_memory,
    build_mode,
    device_meta,
    sync,
    write_results,
)

from bso.distributed import resolve_device
from bso.layers import BINARY_AT_INFERENCE, named_binary_parameters
from bso.models import VGG11


def time_batches(engine, model, opt, x, y, iters, device) -> float:
    engine.train_batch(model, opt, x, y)  # warm-up
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        engine.train_batch(model, opt, x, y)
    sync(device)
    return (time.perf_counter() - start) / iters


def time_binary_step(opt, device, iters: int) -> float:
    """The flip optimizer alone, with gradients in place (ms per call)."""
    for p in opt.binary.binary_weights():
        p.grad = torch.randn_like(p) * 1e-3
    opt.binary.step(0)
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        opt.binary.step(0)
    sync(device)
    return (time.perf_counter() - start) / iters * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--T", type=int, nargs="+", default=[1, 2, 4, 6])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    add_modes_flag(parser, default=["lean", "lean_fused"])  # BSO / T-BSO; BPTT runs plain
    parser.add_argument("--batch", type=int, default=None, help="default: 128 on CUDA, 16 on CPU")
    parser.add_argument("--layers", default=VGG11)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/throughput")
    add_host_memory_flag(parser)
    args = parser.parse_args()
    device = resolve_device(args.device)
    reused = apply_host_memory(args)
    batch = args.batch or (128 if device.type == "cuda" else 16)
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)

    rows = []
    for method in args.methods:
        for T in args.T:
            # the flip rule alone, on stored +-1 weights with a .grad (the same rule in every mode)
            flip_rule_ms = float("nan")
            if method != "bptt_latent":
                _, _, plain_opt = build_mode(method, T, args.layers, device, "plain")
                flip_rule_ms = time_binary_step(plain_opt, device, max(args.iters, 5))
                del plain_opt
            for mode in ["plain"] if method == "bptt_latent" else args.modes:
                model, engine, opt = build_mode(method, T, args.layers, device, mode)
                seconds = time_batches(engine, model, opt, x, y, args.iters, device)
                row = {
                    "method": method,
                    "mode": mode,
                    "T": T,
                    "batch": batch,
                    "samples_per_s": batch / seconds,
                    "ms_per_time_step": seconds / T * 1e3,
                    "binary_step_ms": flip_rule_ms,
                    "binary_weights": sum(
                        p.numel() for _, p in named_binary_parameters(model, BINARY_AT_INFERENCE)
                    ),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    meta = {**device_meta(device), "layers": args.layers, "reuse_host_memory": reused}
    lines = [
        "| method | mode | T | batch | samples/s | ms per time step | flip-rule step (ms) |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['method']} | {r['mode']} | {r['T']} | {r['batch']} | {r['samples_per_s']:.1f} "
        f"| {r['ms_per_time_step']:.1f} | {r['binary_step_ms']:.2f} |"
        for r in rows
    ]
    write_results(args.out, meta, rows, lines)


if __name__ == "__main__":
    main()
