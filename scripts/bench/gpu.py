"""GPU benchmark (`make bench-gpu`; needs CUDA): everything the paper's GPU figures rest on, in one
results file naming the device.

    python scripts/bench/gpu.py                          # VGG-11, CIFAR shapes, the paper's batch 128
    python scripts/bench/gpu.py --autocast --workers 4 8 16
    python scripts/bench/gpu.py --allow-cpu --layers 8C3-AP2-16C3 --batch 4 --T 1 --fig4-T 1 2 \
        --roofline-batch 4 --roofline-T 2 --workers 0 --cifar-per-file 16 --iters 1 --out /tmp/g
                                                         # debugging the pieces on a CPU, tiny

1. Throughput: for T-BSO, BSO (online, +-1 weights, lean mode as trained) and BPTT-latent, training
   samples/s, ms per time step and peak CUDA memory (allocated) on synthetic CIFAR-shaped batches at
   ``--batch`` (the paper's 128), with the fast path's defaults (channels_last, cudnn.benchmark;
   ``--autocast`` adds bf16-autocast rows).
2. The CIFAR-10 training loader's samples/s with the recipe's augmentation (crop, flip,
   AutoAugment, Cutout) over synthetic files in the real format, pinned memory, copied to the GPU.
3. Roofline (scripts/bench/roofline.py): time per iteration against its convolutions alone, lean
   and plain T-BSO, at ``--roofline-batch`` x ``--roofline-T``.
4. Figure 4's memory sweep (scripts/bench/memory_vs_T.py, one process per point): BPTT-latent, BSO
   and T-BSO at ``--fig4-T``, peak CUDA memory and activation memory.
5. Lean against plain mode on the device: ``--flip-batches`` T-BSO and BSO batches with
   deterministic kernels (torch.use_deterministic_algorithms, cuDNN deterministic, no benchmark,
   CUBLAS_WORKSPACE_CONFIG=:4096:8); the flips of every batch and the final +-1 weights must be
   equal bit for bit (the results record it; a difference makes the command fail after writing).

Writes <out>.json and <out>.md. Refuses to run (and writes nothing) without CUDA, unless
``--allow-cpu`` (debugging the pieces on a CPU; the results then name the CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import (
    METHODS,
    MODES,
    ROOT,
    build_mode,
    build_run,
    dataset_config,
    device_meta,
    method_overrides,
    require_cuda,
    sync,
    write_results,
)
from roofline import parse_args as roofline_args
from roofline import run as roofline_run

from bso import fastpath
from bso.data import build_dataloaders
from bso.data.synthetic import write_cifar
from bso.layers import binary_weight_values
from bso.models import VGG11


def train_speed(
    method: str,
    T: int,
    batch: int,
    iters: int,
    device,
    autocast: bool,
    layers: str = VGG11,
    mode: str | None = None,
    compile: bool = False,
) -> dict:
    """Samples/s, ms per time step and peak CUDA memory of ``method`` in ``mode`` (one of MODES;
    default: lean for BSO/T-BSO, as trained, plain for BPTT-latent) with the fast path's defaults on
    CUDA (channels_last, cudnn.benchmark), ``autocast`` (bf16) and ``compile`` (fast.compile)."""
    mode = mode or ("plain" if method == "bptt_latent" else "lean")
    lean, backend = MODES[mode]
    overrides = method_overrides(method, T, layers, lean=lean, backend=backend)
    overrides += [f"fast.autocast={autocast}", f"fast.compile={compile}"]
    model, engine, optimizer, cfg = build_run(overrides, device)
    trained = fastpath.apply(model, cfg.fast, device)
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    for _ in range(2):  # warm-up: cuDNN's algorithm search, allocator
        engine.train_batch(trained, optimizer, x, y)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(iters):
        engine.train_batch(trained, optimizer, x, y)
    sync(device)
    seconds = (time.perf_counter() - start) / iters
    peak = torch.cuda.max_memory_allocated(device) / 1e6 if device.type == "cuda" else None
    return {
        "method": method,
        "T": T,
        "batch": batch,
        "autocast": autocast,
        "compile": compile,
        "mode": mode,
        "lean": mode.startswith("lean"),
        "samples_per_s": batch / seconds,
        "ms_per_time_step": seconds / T * 1e3,
        "peak_cuda_allocated_mb": peak,
    }


def deterministic() -> None:
    """Deterministic kernels for the bitwise check of every mode against plain (cuBLAS needs its workspace
    setting before the first cuBLAS call: set in main before any CUDA work). An operation without a
    deterministic CUDA kernel warns (``does not have a deterministic implementation``) instead of
    raising, so that the check still runs and says which operation may have moved a flip."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def flip_check(
    method: str, T: int, batch: int, batches: int, layers: str, device, modes=MODES
) -> dict:
    """Every mode (lean / plain, eager / fused element-wise steps) from the same seed on the same
    batches: flips of every batch, the final +-1 weights and the flip optimizer's state (momentum;
    T-BSO's second moment), compared bit for bit with the plain mode's."""
    runs = {}
    for mode in modes:
        model, engine, optimizer = build_mode(method, T, layers, device, mode)
        gen = torch.Generator(device="cpu").manual_seed(1)
        flips = []
        for _ in range(batches):
            x = torch.randn(batch, 3, 32, 32, generator=gen).to(device)
            y = torch.randint(0, 10, (batch,), generator=gen).to(device)
            flips.append(engine.train_batch(model, optimizer, x, y)[2].cpu())
        state = optimizer.state_dict()["binary"]["state"]  # BSO/T-BSO's momentum (and v_l[t])
        momenta = [v.cpu() for k in sorted(state) for v in state[k].values() if torch.is_tensor(v)]
        runs[mode] = (flips, [w.cpu() for _, w in binary_weight_values(model)], momenta)
    plain_flips, plain_weights, plain_momenta = runs["plain"]

    def same(a: list, b: list) -> bool:
        return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))

    same_flips = {mode: same(plain_flips, run[0]) for mode, run in runs.items()}
    same_weights = {mode: same(plain_weights, run[1]) for mode, run in runs.items()}
    same_momenta = {mode: same(plain_momenta, run[2]) for mode, run in runs.items()}
    return {
        "method": method,
        "T": T,
        "batch": batch,
        "batches": batches,
        "flips_per_batch": [f.sum().item() for f in plain_flips],
        "same_flips_as_plain": same_flips,
        "same_final_weights_as_plain": same_weights,
        "same_momentum_as_plain": same_momenta,
        "same_flips": all(same_flips.values()),
        "same_final_weights": all(same_weights.values()),
        "same_momentum": all(same_momenta.values()),
    }


def fig4_sweep(args, device) -> dict:
    """memory_vs_T.py's points (one process each) on this device; its JSON, read back."""
    with tempfile.TemporaryDirectory() as tmp:
        return _fig4_sweep(args, device, Path(tmp) / "fig4")


def _fig4_sweep(args, device, out: Path) -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__).parent / "memory_vs_T.py"),
        "--T",
        *map(str, args.fig4_T),
        "--batch",
        str(args.batch),
        "--layers",
        args.layers,
        "--device",
        str(device),
        "--out",
        str(out),
    ]
    subprocess.run(cmd, check=True, cwd=ROOT)
    return json.loads(out.with_suffix(".json").read_text())


def loader_speed(root: Path, workers: int, batch: int, device) -> dict:
    cfg = dataset_config(
        "cifar10",
        root=root,
        num_workers=workers,
        batch_size=batch,
        pin_memory=device.type == "cuda",
    )
    train, _ = build_dataloaders(cfg)

    def one_pass() -> tuple[int, float]:
        start, n = time.perf_counter(), 0
        for x, _ in train:
            x = x.to(device, non_blocking=True)
            n += len(x)
        sync(device)
        return n, time.perf_counter() - start

    one_pass()  # start the workers, warm the page cache
    n, seconds = one_pass()
    return {"workers": workers, "batch": batch, "samples": n, "samples_per_s": n / seconds}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--T", type=int, nargs="+", default=[1, 2, 4, 6])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--batch", type=int, default=128, help="the paper's CIFAR batch")
    parser.add_argument("--layers", default=VGG11)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--autocast", action="store_true", help="also time bf16 autocast")
    parser.add_argument("--workers", type=int, nargs="+", default=[4, 8])
    parser.add_argument(
        "--cifar-per-file", type=int, default=2000, help="5 train files of this size"
    )
    parser.add_argument("--roofline-batch", type=int, nargs="+", default=[16, 128])
    parser.add_argument("--roofline-T", type=int, nargs="+", default=[4, 6])
    parser.add_argument("--fig4-T", type=int, nargs="+", default=[1, 2, 4, 8, 16, 35])
    parser.add_argument("--flip-batches", type=int, default=3)
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--allow-cpu",
        action="store_true",
        help="debugging only: run the pieces on a non-CUDA --device (tiny sizes)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/gpu")
    args = parser.parse_args(argv)
    device = require_cuda(
        args.device,
        args.allow_cpu,
        "bench-gpu",
        "use `make bench-throughput` / `make bench-data` / `make bench-roofline` for the CPU figures",
    )
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before any cuBLAS call

    rows = []
    for autocast in (False, True) if args.autocast else (False,):
        for method in args.methods:
            for T in args.T:
                row = train_speed(method, T, args.batch, args.iters, device, autocast, args.layers)
                rows.append(row)
                print(json.dumps(row), flush=True)
    loader_rows = []
    with tempfile.TemporaryDirectory() as tmp:
        write_cifar(Path(tmp), "cifar10", per_file=args.cifar_per_file)
        for workers in args.workers:
            row = loader_speed(Path(tmp), workers, args.batch, device)
            loader_rows.append(row)
            print(json.dumps({"loader": row}), flush=True)
    roofline_argv = ["--batch", *map(str, args.roofline_batch), "--T", *map(str, args.roofline_T)]
    roofline_argv += ["--layers", args.layers, "--device", str(device), "--iters", "3"]
    roofline_meta, roofline_rows = roofline_run(roofline_args(roofline_argv))
    fig4 = fig4_sweep(args, device)
    deterministic()
    flips = [
        flip_check(method, T, args.batch, args.flip_batches, args.layers, device)
        for method in ("tbso", "bso")
        for T in (args.roofline_T[0],)
    ]
    for f in flips:
        print(json.dumps({"flip_check": f}), flush=True)

    meta = {**device_meta(device), "torch": torch.__version__, "layers": args.layers}
    lines = [
        f"Device: {meta['device_name']} (torch {torch.__version__}), layers `{args.layers}`, CIFAR "
        f"shapes, batch {args.batch}; throughput with channels_last + cudnn.benchmark",
        "",
        "| method | T | autocast | samples/s | ms per time step | peak CUDA allocated (MB) |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['method']} | {r['T']} | {'bf16' if r['autocast'] else 'off'} "
        f"| {r['samples_per_s']:.0f} | {r['ms_per_time_step']:.2f} "
        f"| {'-' if r['peak_cuda_allocated_mb'] is None else round(r['peak_cuda_allocated_mb'])} |"
        for r in rows
    ]
    lines += [
        "",
        "CIFAR-10 training loader (crop, flip, AutoAugment, Cutout; pinned, copied to the device):",
        "",
        "| workers | batch | samples/s |",
        "|---|---|---|",
    ]
    lines += [f"| {r['workers']} | {r['batch']} | {r['samples_per_s']:.0f} |" for r in loader_rows]
    lines += ["", "Roofline (T-BSO; iteration vs its convolutions alone):", ""]
    lines += [
        f"- batch {r['batch']}, T={r['T']}, {r['mode']}: {r['iteration_ms']:.1f} ms per iteration, "
        f"conv {r['conv_ms']:.1f} ms, share {r['conv_share']:.3f}, x plain {r.get('over_plain', 1):.3f}"
        for r in roofline_rows
    ]
    lines += ["", "Figure 4 memory (peak per point; see memory_vs_T.py):", ""]
    for p in fig4["points"]:
        peak = p.get("cuda_peak_allocated_bytes", p.get("peak_rss_bytes", 0))
        lines.append(
            f"- {p['method']} T={p['T']}: activation {p['activation_peak_bytes'] / 1e6:.1f} MB, "
            f"peak {peak / 1e6:.1f} MB"
        )
    lines += ["", "Every mode (lean / plain, eager / fused) vs plain, deterministic kernels:", ""]
    lines += [
        f"- {f['method']} T={f['T']} batch {f['batch']}, {f['batches']} batches: same flips "
        f"{f['same_flips_as_plain']}, same final weights {f['same_final_weights_as_plain']}"
        for f in flips
    ]
    results = [
        *({"throughput": r} for r in rows),
        *({"loader": r} for r in loader_rows),
        *({"roofline": r} for r in roofline_rows),
        *({"fig4": p} for p in fig4["points"]),
        *({"flip_check": f} for f in flips),
    ]
    write_results(args.out, {**meta, "roofline": roofline_meta}, results, lines)
    if not all(f["same_flips"] and f["same_final_weights"] and f["same_momentum"] for f in flips):
        sys.exit("a mode flipped differently from the plain mode on this device (see the results)")


if __name__ == "__main__":
    main()
