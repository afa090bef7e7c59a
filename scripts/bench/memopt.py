"""Activation memory and time of the lean mode against spikingjelly 2.0's ``memopt`` (spike
compression + checkpointing) on the same VGG: online T-BSO (plain, plain + memopt, lean, lean +
recompute_binary_convs) and the BPTT baseline (plain, + memopt).

    python scripts/bench/memopt.py                  # VGG-11, batch 16, T=4 (CPU: a few minutes)
    python scripts/bench/memopt.py --layers 8C3-AP2-16C3 --batch 4 --T 2 --iters 1 --out /tmp/m

memopt as its documentation applies it: every conv block (conv, BatchNorm, LIF, pool) wrapped in
``memopt.checkpoint_module`` -- its output recomputed in backward, the neuron state committed once --
with ``BitSpikeCompressor`` (1 bit per entry) on the blocks whose input is 0/1 spikes and no
compression where it is not (the image; averages after an average pool, which the bit compressor
would round). Flips and outputs are checked equal to the unwrapped model's.

Memory, each configuration in a fresh process: ``tensor_peak_bytes``, the most bytes malloc held
during one training iteration above what it held before it (all CPU tensors; sampled at every
dispatched operator, glibc's mallinfo2) -- the measure that also counts what checkpointing keeps
outside autograd's saved tensors --, and ``saved_tensor_peak_bytes`` (bso.metrics.memory's
SavedTensorMeter). On CUDA: ``torch.cuda.max_memory_allocated`` above the start of the iteration.
Time: all configurations in one process, interleaved, median of ``--iters`` iterations.
Writes <out>.json, <out>.md and <out>.png.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from _common import ROOT, build_method, device_meta, timed_batch, write_results

from bso.compat import torch_dispatch_mode
from bso.distributed import resolve_device
from bso.metrics.memory import SavedTensorMeter
from bso.models import VGG11

CONFIGS = {  # name: (method, lean, recompute_binary_convs, memopt)
    "tbso_plain": ("tbso", False, False, False),
    "tbso_plain_memopt": ("tbso", False, False, True),
    "tbso_lean": ("tbso", True, False, False),
    "tbso_lean_recompute": ("tbso", True, True, False),
    "bptt_plain": ("bptt_latent", False, False, False),
    "bptt_memopt": ("bptt_latent", False, False, True),
}


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def malloc_in_use() -> int:
    """Bytes glibc's malloc hands out now (heap + mmapped chunks)."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


class MallocPeak(torch_dispatch_mode()):
    """Peak of :func:`malloc_in_use` over every operator dispatched while active, above the start."""

    def __enter__(self):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        self._mallinfo = libc.mallinfo2
        self.start = self._now()
        self.peak = self.start
        return super().__enter__()

    def _now(self) -> int:
        info = self._mallinfo()
        return info.uordblks + info.hblkhd

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, self._now())
        return out

    @property
    def peak_bytes(self) -> int:
        return self.peak - self.start


def apply_memopt(model) -> None:
    """Every conv block in ``memopt.checkpoint_module``; the bit compressor where its input is 0/1."""
    from spikingjelly.activation_based.memopt import BitSpikeCompressor, checkpoint_module

    for i, block in enumerate(model.blocks):
        compressor = BitSpikeCompressor() if block.input_levels == 1 else None
        model.blocks[i] = checkpoint_module(block, compressor=compressor)


def build(name: str, T: int, layers: str, device):
    method, lean, recompute, memopt = CONFIGS[name]
    model, engine, opt = build_method(
        method, T, layers, device, lean=lean, recompute_binary_convs=recompute
    )
    if memopt:
        apply_memopt(model)
    return model, engine, opt


def measure_memory(name: str, T: int, batch: int, layers: str, device_name: str) -> dict:
    """One configuration's memory, in this (fresh) process."""
    device = torch.device(device_name)
    model, engine, opt = build(name, T, layers, device)
    torch.manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    engine.train_batch(model, opt, x, y)  # warm-up: optimizer state
    with SavedTensorMeter() as saved:
        engine.train_batch(model, opt, x, y)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        flips = engine.train_batch(model, opt, x, y)[2]
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - start
    else:
        with MallocPeak() as meter:
            flips = engine.train_batch(model, opt, x, y)[2]
        peak = meter.peak_bytes
    return {
        "config": name,
        "tensor_peak_bytes": peak,
        "saved_tensor_peak_bytes": saved.peak_bytes,
        "flips_third_batch": flips.tolist(),
    }


def memory_in_subprocess(name, args) -> dict:
    bench, dev = str(Path(__file__).parent), str(resolve_device(args.device))
    call = f"m.measure_memory({name!r}, {args.T}, {args.batch}, {args.layers!r}, {dev!r})"
    code = f"import json, sys; sys.path.insert(0, {bench!r}); import memopt as m; "
    code += f"print('RESULT', json.dumps({call}))"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, cwd=ROOT
    )
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode or not lines:
        raise RuntimeError(f"memory of {name} failed:\n{done.stdout}\n{done.stderr}")
    return json.loads(lines[-1][len("RESULT ") :])


def measure_time(args, device) -> dict:
    """Median seconds per iteration of every configuration, interleaved, in this process; and
    whether each memopt-wrapped model gives the flips and outputs of its unwrapped twin."""
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    built = {name: build(name, args.T, args.layers, device) for name in args.configs}
    results = {}
    for name, (model, engine, opt) in built.items():  # warm-up, and what each computes
        out, _, flips = engine.train_batch(model, opt, x, y)
        results[name] = (out, flips)
    same = {}
    for name in args.configs:
        base = ("tbso" if CONFIGS[name][0] == "tbso" else "bptt") + "_plain"
        if CONFIGS[name][3] and base in results:
            same[name] = bool(
                torch.equal(results[name][0], results[base][0])
                and torch.equal(results[name][1], results[base][1])
            )
    seconds = {name: [] for name in args.configs}
    for _ in range(args.iters):
        for name, (model, engine, opt) in built.items():
            seconds[name].append(timed_batch(engine, model, opt, x, y, device))
    return {name: statistics.median(s) for name, s in seconds.items()}, same, seconds


def figure(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(11, 4))
    names = [r["config"] for r in rows]
    colors = ["tab:blue" if r["config"].startswith("tbso") else "tab:red" for r in rows]
    ax_mem.barh(names, [r["tensor_peak_bytes"] / 1e6 for r in rows], color=colors)
    ax_mem.set_xlabel("tensor memory peak during one iteration (MB)")
    ax_time.barh(names, [r["iteration_ms"] for r in rows], color=colors)
    ax_time.set_xlabel("time per iteration (ms, median, interleaved)")
    for ax in (ax_mem, ax_time):
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    ax_time.set_yticklabels([])
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--T", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--layers", default=VGG11)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/memopt")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    memory = {name: memory_in_subprocess(name, args) for name in args.configs}
    for name, m in memory.items():
        print(f"{name}: tensor peak {m['tensor_peak_bytes'] / 1e6:.1f} MB", flush=True)
    median_s, same, seconds = measure_time(args, device)
    rows = []
    for name in args.configs:
        method, lean, recompute, memopt = CONFIGS[name]
        base = "tbso_plain" if method == "tbso" else "bptt_plain"
        row = {
            **memory[name],
            "method": method,
            "lean": lean,
            "recompute_binary_convs": recompute,
            "memopt": memopt,
            "iteration_ms": median_s[name] * 1e3,
            "iteration_s_all": seconds[name],
        }
        if name in same:
            row["same_flips_and_outputs_as_unwrapped"] = same[name]
        if base in memory:
            row["memory_over_plain"] = row["tensor_peak_bytes"] / memory[base]["tensor_peak_bytes"]
            row["time_over_plain"] = median_s[name] / median_s[base]
        rows.append(row)
    meta = {
        **device_meta(device),
        "layers": args.layers,
        "T": args.T,
        "batch": args.batch,
        "iters": args.iters,
    }
    lines = [
        f"{meta['device_name']} ({meta['device']}, {meta['threads']} threads), VGG layers "
        f"`{args.layers}`, batch {args.batch}, T={args.T}; time: median of {args.iters} "
        "interleaved iterations",
        "",
        "| configuration | tensor peak (MB) | x its plain | autograd saved peak (MB) "
        "| ms / iteration | x its plain | same as unwrapped |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['tensor_peak_bytes'] / 1e6:.1f} "
            f"| {r.get('memory_over_plain', float('nan')):.2f} "
            f"| {r['saved_tensor_peak_bytes'] / 1e6:.1f} | {r['iteration_ms']:.0f} "
            f"| {r.get('time_over_plain', float('nan')):.2f} "
            f"| {r.get('same_flips_and_outputs_as_unwrapped', '')} |"
        )
    write_results(args.out, meta, rows, lines)
    figure(
        rows,
        args.out.with_suffix(".png"),
        f"VGG ({'VGG-11' if args.layers == VGG11 else args.layers}), batch {args.batch}, T={args.T}: "
        "lean mode vs spikingjelly memopt",
    )


if __name__ == "__main__":
    main()
