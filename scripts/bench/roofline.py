"""How close a training iteration is to its convolutions: the measured time per iteration against the
time of the same iteration's convolutions alone (same kernels, shapes, strides and dtypes), and their
ratio ``conv_share`` -- the share of an iteration the hardware's convolution kernels bound.

    python scripts/bench/roofline.py                       # VGG-11, T-BSO, batch 16, T=4 and 6, all modes
    python scripts/bench/roofline.py --batch 16 128 --T 4 --iters 2
    python scripts/bench/roofline.py --layers 8C3-AP2-16C3 --batch 4 --T 2 --iters 1 --out /tmp/r

How: one untimed iteration per (mode, batch, T) runs under a dispatch mode that records every
``aten.convolution`` (forward) and ``aten.convolution_backward`` (input and weight gradients) with
its arguments' shapes, strides, dtypes and output masks; the roofline replays exactly these calls on
tensors of the same layout (``conv_ms``), so the kernels are the ones the iteration runs. The rest
of the iteration (``other_ms = iteration_ms - conv_ms``) is element-wise work, memory traffic,
the flip rule and Python. ``gflops`` counts 2 x MACs of every replayed call.
Timing interleaves the modes (and the conv replay) repetition by repetition and takes medians, so
that a shared machine's load hits them alike; ``lean_over_plain`` is measured that way.
Writes <out>.json (``{"meta": ..., "rows": [...]}``, one row per model, batch, T, mode) and <out>.md.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch
from _common import (
    ROOT,
    add_host_memory_flag,
    add_modes_flag,
    apply_host_memory,
    build_mode,
    cpu_name,
    sync,
    write_results,
)
from torch import nn

from bso.compat import torch_dispatch_mode
from bso.compiled import FusedAvgPool2d
from bso.distributed import resolve_device
from bso.models import VGG11
from bso.neurons import LIFNode

aten = torch.ops.aten
CONV_OPS = (aten.convolution.default, aten.convolution_backward.default)


def machine(device: torch.device) -> dict:
    meta = {
        "device": str(device),
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    if device.type == "cuda":
        meta["device_name"] = torch.cuda.get_device_name(device)
        meta["cudnn_deterministic"] = torch.backends.cudnn.deterministic
    else:
        meta["device_name"] = meta["cpu"]
    return meta


def _spec(value):
    """A call argument as a replayable spec: tensors by shape/stride/dtype/device, the rest as is."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), tuple(value.stride()), value.dtype, value.device)
    if isinstance(value, (list, tuple)):
        return type(value)(_spec(v) for v in value)
    return value


def _make(spec, generator):
    if isinstance(spec, tuple) and spec and spec[0] == "tensor":
        _, shape, stride, dtype, device = spec
        size = (
            1 + sum((n - 1) * st for n, st in zip(shape, stride, strict=True)) if all(shape) else 0
        )
        flat = torch.randn(size, generator=generator).to(device=device, dtype=dtype)
        return flat.as_strided(shape, stride)  # the same layout (expanded dims included)
    if isinstance(spec, (list, tuple)):
        return type(spec)(_make(v, generator) for v in spec)
    return spec


class ConvRecorder(torch_dispatch_mode()):
    """Records every convolution (forward and backward) dispatched while active."""

    def __init__(self):
        super().__init__()
        self.calls: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in CONV_OPS:
            self.calls.append((func, _spec(args), _spec(kwargs)))
        return func(*args, **kwargs)


def conv_flops(func, args) -> float:
    """2 x MACs of one recorded call (forward: one GEMM; backward: one per output-mask entry)."""
    if func is aten.convolution.default:
        x, w = args[0], args[1]
        out_shape = None
    else:  # convolution_backward(grad_out, input, weight, bias_sizes, stride, pad, ..., mask)
        grad_out, x, w = args[0], args[1], args[2]
        out_shape = grad_out[1]
    w_shape = w[1]
    if out_shape is None:  # forward: output spatial size from the conv arithmetic
        stride, pad, dil = args[3], args[4], args[5]
        spatial = [
            (x[1][2 + i] + 2 * pad[i] - dil[i] * (w_shape[2 + i] - 1) - 1) // stride[i] + 1
            for i in range(len(w_shape) - 2)
        ]
        out_shape = (x[1][0], w_shape[0], *spatial)
    macs = math.prod(out_shape) * math.prod(w_shape[1:])  # per output: C_in/groups * k*k MACs
    if func is aten.convolution.default:
        return 2.0 * macs
    mask = args[10]
    return 2.0 * macs * (int(mask[0]) + int(mask[1]))


class ConvReplay:
    """The recorded calls on fresh tensors of the same layout; ``__call__`` runs them all once."""

    def __init__(self, calls):
        g = torch.Generator().manual_seed(0)
        self.calls = [(f, _make(a, g), _make(k, g)) for f, a, k in calls]
        self.flops = sum(conv_flops(f, a) for f, a, _ in calls)
        self.counts = {
            "forward": sum(f is aten.convolution.default for f, _, _ in calls),
            "backward": sum(f is aten.convolution_backward.default for f, _, _ in calls),
        }

    def __call__(self) -> None:
        for f, a, k in self.calls:
            f(*a, **k)


@contextmanager
def unfused(model):
    """The release backend's eager neurons and pools for a while in place of backend=fused's
    compiled ones: torch.compile's loops cannot run under a dispatch mode (the recorder); the
    backend changes no convolution call."""
    neurons = [m for m in model.modules() if isinstance(m, LIFNode) and m.backend == "fused"]
    pools = [
        (name, m)
        for name, m in model.named_modules(remove_duplicate=False)
        if isinstance(m, FusedAvgPool2d)
    ]
    for m in neurons:
        m.backend = "release"
    for name, m in pools:
        eager = nn.AvgPool2d(
            m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad, m.divisor_override
        )
        model.set_submodule(name, eager)
    try:
        yield
    finally:
        for m in neurons:
            m.backend = "fused"
        for name, m in pools:
            model.set_submodule(name, m)


def timed(fn, device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def measure(args, device, batch: int, T: int) -> list[dict]:
    """Rows (one per mode) for one (batch, T): iteration and conv-replay times, interleaved."""
    torch.manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    built, replays, flips = {}, {}, {}
    for mode in args.modes:
        model, engine, opt = build_mode(args.method, T, args.layers, device, mode)
        if args.channels_last:
            model.to(memory_format=torch.channels_last)
        built[mode] = (model, engine, opt)
        # warm-up (allocator, kernel selection, compilation); every mode starts from the same state
        flips[mode] = engine.train_batch(model, opt, x, y)[2].tolist()
        with ConvRecorder() as rec, unfused(model):  # the same convolutions, fused or not
            engine.train_batch(model, opt, x, y)
        replays[mode] = ConvReplay(rec.calls)
        if not replays[mode].counts["backward"]:
            raise RuntimeError(f"{mode}: no convolution backward was recorded; cannot time it")
        replays[mode]()  # warm-up of the replay
    same_flips = len({str(f) for f in flips.values()}) == 1
    iteration = {m: [] for m in args.modes}
    conv = {m: [] for m in args.modes}
    for _ in range(args.iters):
        for mode, (model, engine, opt) in built.items():
            iteration[mode].append(timed(partial(engine.train_batch, model, opt, x, y), device))
            conv[mode].append(timed(replays[mode], device))
    rows = []
    for mode in args.modes:
        it_ms = statistics.median(iteration[mode]) * 1e3
        conv_ms = statistics.median(conv[mode]) * 1e3
        rows.append(
            {
                "model": args.model_name,
                "method": args.method,
                "batch": batch,
                "T": T,
                "mode": mode,
                "iteration_ms": it_ms,
                "conv_ms": conv_ms,
                "other_ms": it_ms - conv_ms,
                "conv_share": conv_ms / it_ms,
                "conv_gflops_per_s": replays[mode].flops / (conv_ms * 1e-3) / 1e9,
                "conv_calls": replays[mode].counts,
                "same_flips_as_other_modes": same_flips,
                "iteration_s_all": iteration[mode],
                "conv_s_all": conv[mode],
            }
        )
    by_mode = {r["mode"]: r for r in rows}
    for r in rows:  # against the plain mode (eager), and against plain with the same fusion
        if "plain" in by_mode:
            r["over_plain"] = r["iteration_ms"] / by_mode["plain"]["iteration_ms"]
        same = by_mode.get(r["mode"].replace("lean", "plain"))
        if same is not None:
            r["over_plain_same_fusion"] = r["iteration_ms"] / same["iteration_ms"]
    for r in rows:
        print(
            f"{r['model']} {r['method']} batch {batch} T={T} {r['mode']}: iteration "
            f"{r['iteration_ms']:.0f} ms, conv {r['conv_ms']:.0f} ms, share {r['conv_share']:.3f}, "
            f"{r['conv_gflops_per_s']:.0f} GFLOP/s, x plain {r.get('over_plain', float('nan')):.3f}",
            flush=True,
        )
    return rows


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--method", default="tbso", choices=["tbso", "bso"])
    add_modes_flag(parser)
    parser.add_argument("--batch", type=int, nargs="+", default=[16])
    parser.add_argument("--T", type=int, nargs="+", default=[4, 6])
    parser.add_argument("--layers", default=VGG11)
    parser.add_argument(
        "--model-name",
        default=None,
        help="name in the results (default: VGG-11 for the VGG-11 layers, else the layer string)",
    )
    parser.add_argument("--iters", type=int, default=3, help="timed iterations per mode (median)")
    parser.add_argument("--channels-last", action="store_true", help="model in channels_last")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/roofline")
    add_host_memory_flag(parser)
    args = parser.parse_args(argv)
    if args.model_name is None:
        args.model_name = "VGG-11" if args.layers == VGG11 else args.layers
    return args


def run(args) -> tuple[dict, list[dict]]:
    device = resolve_device(args.device)
    reused = apply_host_memory(args)
    rows = []
    for batch in args.batch:
        for T in args.T:
            rows.extend(measure(args, device, batch, T))
    meta = {
        **machine(device),
        "iters": args.iters,
        "reuse_host_memory": reused,
        "layers": args.layers,
        "channels_last": args.channels_last,
    }
    return meta, rows


def markdown(meta: dict, rows: list[dict]) -> list[str]:
    lines = [
        f"{meta['device_name']} ({meta['device']}, {meta['threads']} threads, torch {meta['torch']}); "
        f"median of {meta['iters']} interleaved iterations per row",
        "",
        "| model | method | batch | T | mode | iteration (ms) | conv alone (ms) | conv share "
        "| conv GFLOP/s | other (ms) | x plain | x plain, same fusion | same flips |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['method']} | {r['batch']} | {r['T']} | {r['mode']} "
            f"| {r['iteration_ms']:.0f} | {r['conv_ms']:.0f} | {r['conv_share']:.3f} "
            f"| {r['conv_gflops_per_s']:.0f} | {r['other_ms']:.0f} "
            f"| {r.get('over_plain', float('nan')):.3f} "
            f"| {r.get('over_plain_same_fusion', float('nan')):.3f} "
            f"| {r['same_flips_as_other_modes']} |"
        )
    return lines


def main(argv=None) -> None:
    args = parse_args(argv)
    meta, rows = run(args)
    write_results(args.out, meta, rows, markdown(meta, rows))


if __name__ == "__main__":
    main()
