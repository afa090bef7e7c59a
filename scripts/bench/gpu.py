"""GPU benchmark: is the model or the data loader the bottleneck? (`make bench-gpu`; needs CUDA)

    python scripts/bench/gpu.py                          # VGG-11, CIFAR shapes, batch 128, T = 1 2 4 6
    python scripts/bench/gpu.py --autocast --workers 4 8 16

For T-BSO, BSO (online, +-1 weights) and BPTT-latent: training samples/s, ms per time step and peak
CUDA memory (allocated) on synthetic CIFAR-shaped batches, with the fast path's defaults
(channels_last, cudnn.benchmark; ``--autocast`` adds bf16-autocast rows). Then the CIFAR-10 training
loader's samples/s with the recipe's augmentation (crop, flip, AutoAugment, Cutout) over synthetic
files in the real format (bso.data.synthetic), pinned memory, copied to the GPU. Writes <out>.json and
<out>.md with the device name. Refuses to run (and writes nothing) without CUDA.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import METHODS, ROOT, build_method, device_meta, write_results
from omegaconf import OmegaConf

from bso import fastpath
from bso.data import build_dataloaders
from bso.data.synthetic import write_cifar
from bso.models import VGG11


def train_speed(method: str, T: int, batch: int, iters: int, device, autocast: bool) -> dict:
    fast = OmegaConf.create(
        {"channels_last": True, "cudnn_benchmark": True, "autocast": autocast, "compile": False}
    )
    model, engine, optimizer = build_method(method, T, VGG11, device)
    trained = fastpath.apply(model, fast, device)
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    for _ in range(2):  # warm-up: cuDNN's algorithm search, allocator
        engine.train_batch(trained, optimizer, x, y)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(iters):
        engine.train_batch(trained, optimizer, x, y)
    torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - start) / iters
    return {
        "method": method,
        "T": T,
        "batch": batch,
        "autocast": autocast,
        "samples_per_s": batch / seconds,
        "ms_per_time_step": seconds / T * 1e3,
        "peak_cuda_allocated_mb": torch.cuda.max_memory_allocated(device) / 1e6,
    }


def loader_speed(root: Path, workers: int, batch: int, device) -> dict:
    cfg = OmegaConf.load(ROOT / "configs" / "dataset" / "cifar10.yaml")
    cfg.root, cfg.num_workers, cfg.batch_size, cfg.pin_memory = str(root), workers, batch, True
    train, _ = build_dataloaders(cfg)

    def one_pass() -> tuple[int, float]:
        start, n = time.perf_counter(), 0
        for x, _ in train:
            x = x.to(device, non_blocking=True)
            n += len(x)
        torch.cuda.synchronize(device)
        return n, time.perf_counter() - start

    one_pass()  # start the workers, warm the page cache
    n, seconds = one_pass()
    return {"workers": workers, "batch": batch, "samples": n, "samples_per_s": n / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--T", type=int, nargs="+", default=[1, 2, 4, 6])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--autocast", action="store_true", help="also time bf16 autocast")
    parser.add_argument("--workers", type=int, nargs="+", default=[4, 8])
    parser.add_argument(
        "--cifar-per-file", type=int, default=2000, help="5 train files of this size"
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/gpu")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit(
            "bench-gpu measures CUDA training and needs a GPU, but torch.cuda.is_available() is "
            f"False here (torch {torch.__version__}); nothing was written. Run it on a CUDA machine, "
            "or use `make bench-throughput` / `make bench-data` for the CPU figures."
        )
    device = torch.device(args.device)
    if device.type != "cuda":
        sys.exit(f"--device must be a CUDA device, got {args.device!r}")

    rows = []
    for autocast in (False, True) if args.autocast else (False,):
        for method in args.methods:
            for T in args.T:
                row = train_speed(method, T, args.batch, args.iters, device, autocast)
                rows.append(row)
                print(json.dumps(row), flush=True)
    loader_rows = []
    with tempfile.TemporaryDirectory() as tmp:
        write_cifar(Path(tmp), "cifar10", per_file=args.cifar_per_file)
        for workers in args.workers:
            row = loader_speed(Path(tmp), workers, args.batch, device)
            loader_rows.append(row)
            print(json.dumps({"loader": row}), flush=True)

    meta = {**device_meta(device), "torch": torch.__version__, "layers": VGG11}
    lines = [
        f"Device: {meta['device_name']} (torch {torch.__version__}), VGG-11, CIFAR shapes, "
        f"batch {args.batch}, channels_last + cudnn.benchmark",
        "",
        "| method | T | autocast | samples/s | ms per time step | peak CUDA allocated (MB) |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['method']} | {r['T']} | {'bf16' if r['autocast'] else 'off'} "
        f"| {r['samples_per_s']:.0f} | {r['ms_per_time_step']:.2f} "
        f"| {r['peak_cuda_allocated_mb']:.0f} |"
        for r in rows
    ]
    lines += [
        "",
        "CIFAR-10 training loader (crop, flip, AutoAugment, Cutout; pinned, copied to the GPU):",
        "",
        "| workers | batch | samples/s |",
        "|---|---|---|",
    ]
    lines += [f"| {r['workers']} | {r['batch']} | {r['samples_per_s']:.0f} |" for r in loader_rows]
    write_results(args.out, meta, [*rows, *({"loader": r} for r in loader_rows)], lines)


if __name__ == "__main__":
    main()
