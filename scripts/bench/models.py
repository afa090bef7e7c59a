"""Forward+backward time per time step for each model (online engine, T-BSO step excluded), and each
model's size as the paper counts it.

    python scripts/bench/models.py                       # CPU: batch 8; CUDA: batch 128
    python scripts/bench/models.py --models vgg_tiny --batch 2 --iters 1 --out /tmp/models

Writes <out>.json and <out>.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from _common import ROOT, device_meta, write_results

from bso.distributed import resolve_device
from bso.engine import instantaneous_loss
from bso.models import VGG11, BiRealResNet18, SpikingResNet19, SpikingVGG, model_size
from bso.neurons import configure_neurons, reset_neurons

MODELS = {  # name: (constructor, input shape (C, H, W), classes)
    "vgg11": (lambda c, k: SpikingVGG(VGG11, c, k), (3, 32, 32), 10),
    "vgg11_ws": (
        lambda c, k: SpikingVGG(VGG11, c, k, norm="none", weight_standardization=True),
        (3, 32, 32),
        10,
    ),
    "resnet19": (lambda c, k: SpikingResNet19(c, k), (3, 32, 32), 10),
    "resnet18": (lambda c, k: BiRealResNet18(c, k), (3, 224, 224), 1000),
    "vgg_tiny": (lambda c, k: SpikingVGG("32C3-64C3-AP2-128C3-128C3-AP2", c, k), (1, 8, 8), 10),
}


def step_time(model, x, y, iters: int, device) -> float:
    """Seconds per online time step: forward one step, loss, backward (graph of one step)."""
    configure_neurons(model, detach_state=True, trace_rule="ndot")
    model.train()

    def one():
        out = model(x)
        instantaneous_loss(out, y, 0.05, 1).backward()

    reset_neurons(model)
    one()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        one()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / iters


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/models")
    args = parser.parse_args()
    device = resolve_device(args.device)
    batch = args.batch or (128 if device.type == "cuda" else 8)
    rows = []
    for name in args.models:
        make, shape, classes = MODELS[name]
        torch.manual_seed(0)
        model = make(shape[0], classes).to(device)
        x = torch.randn(batch, *shape, device=device)
        y = torch.randint(0, classes, (batch,), device=device)
        size = model_size(model)
        row = {
            "model": name,
            "input": list(shape),
            "batch": batch,
            "ms_per_time_step": step_time(model, x, y, args.iters, device) * 1e3,
            "binary_params": size.binary_params,
            "full_precision_params": size.full_precision_params,
            "size_mb": size.size_mb,
            "full_precision_size_mb": size.full_precision_size_mb,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    meta = device_meta(device)
    lines = [
        "| model | input | binary weights | other params | size (MB) | FP32 size (MB) "
        f"| fwd+bwd ms / time step (batch {batch}, {device.type}) |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['model']} | {'x'.join(map(str, r['input']))} | {r['binary_params']:,} "
        f"| {r['full_precision_params']:,} | {r['size_mb']:.2f} | {r['full_precision_size_mb']:.2f} "
        f"| {r['ms_per_time_step']:.1f} |"
        for r in rows
    ]
    write_results(args.out, meta, rows, lines)


if __name__ == "__main__":
    main()
