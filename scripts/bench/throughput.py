"""Training speed per method and T: samples/s, ms per time step, and the binary optimizer step's own
cost (the flip rule over all binary weights; T-BSO runs it T times per batch).

    python scripts/bench/throughput.py                              # VGG-11, CIFAR-shaped, T = 1 2 4 6
    python scripts/bench/throughput.py --layers 8C3-AP2-16C3 --T 2 --batch 4 --iters 2 --out /tmp/tp

Synthetic CIFAR-shaped tensors (data loading is measured separately). Writes <out>.json and <out>.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from functools import partial
from pathlib import Path

import torch

from bso.engine import BPTTEngine, OnlineEngine
from bso.layers import named_binary_parameters
from bso.models import VGG11, SpikingVGG
from bso.optim import BSO, TBSO, PlainOptimizer, build_router

ROOT = Path(__file__).resolve().parents[2]
METHODS = ("bptt_latent", "bso", "tbso")


def build(method: str, T: int, layers: str, device):
    torch.manual_seed(0)
    weights = "latent" if method == "bptt_latent" else "binary"
    model = SpikingVGG(layers, in_channels=3, num_classes=10, weights=weights).to(device)
    if method == "bptt_latent":
        engine = BPTTEngine(T=T)
        opt = PlainOptimizer(
            torch.optim.Adam(model.parameters(), lr=1e-3), named_binary_parameters(model, "latent")
        )
    else:
        engine = OnlineEngine(T=T)
        binary = partial(BSO) if method == "bso" else partial(TBSO, num_steps=T)
        opt = build_router(model, binary, partial(torch.optim.SGD, lr=0.1))
    engine.prepare(model)
    model.train()
    return model, engine, opt


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
    if opt.binary is None:
        return float("nan")
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
    parser.add_argument("--batch", type=int, default=None, help="default: 128 on CUDA, 16 on CPU")
    parser.add_argument("--layers", default=VGG11)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/throughput")
    args = parser.parse_args()
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    batch = args.batch or (128 if device.type == "cuda" else 16)
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)

    rows = []
    for method in args.methods:
        for T in args.T:
            model, engine, opt = build(method, T, args.layers, device)
            seconds = time_batches(engine, model, opt, x, y, args.iters, device)
            row = {
                "method": method,
                "T": T,
                "batch": batch,
                "samples_per_s": batch / seconds,
                "ms_per_time_step": seconds / T * 1e3,
                "binary_step_ms": time_binary_step(opt, device, max(args.iters, 5)),
                "binary_weights": sum(p.numel() for _, p in named_binary_parameters(model))
                or sum(p.numel() for _, p in named_binary_parameters(model, "latent")),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    meta = {
        "device": str(device),
        "device_name": name or platform.machine(),
        "threads": torch.get_num_threads(),
        "layers": args.layers,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [
        "| method | T | batch | samples/s | ms per time step | flip-rule step (ms) |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['method']} | {r['T']} | {r['batch']} | {r['samples_per_s']:.1f} "
        f"| {r['ms_per_time_step']:.1f} | {r['binary_step_ms']:.2f} |"
        for r in rows
    ]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
