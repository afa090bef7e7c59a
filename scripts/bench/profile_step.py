"""Where a training iteration's time goes: torch.profiler's self time of every operator in one
iteration, grouped into what bounds it (convolution kernels, element-wise passes, BatchNorm,
memory copies, bit packing, reductions, the rest) -- the profile behind `make bench-roofline`'s
``other_ms``.

    python scripts/bench/profile_step.py                      # VGG-11, T-BSO, batch 16, T=4, all modes
    python scripts/bench/profile_step.py --batch 128 --T 4
    python scripts/bench/profile_step.py --layers 8C3-AP2-16C3 --batch 4 --T 2 --out /tmp/p

One untimed warm-up iteration per mode, then ``--iters`` rounds, each an unprofiled iteration per
mode (its wall time: ``iteration_ms``, the median) and a profiled one (modes interleaved); self
times are summed over the profiled iterations and divided by ``--iters``. Self time is the time an
operator spends outside the operators it calls, so the categories add up to the profiled
operators' time (``profiled_ms``). The profiler's own cost per operator makes ``profiled_ms``
exceed ``iteration_ms``; compare categories by their share. Writes <out>.json (meta, per mode:
categories and the top operators) and <out>.md.
"""

from __future__ import annotations

import argparse
import re
import statistics
from pathlib import Path

import torch
from _common import (
    ROOT,
    add_host_memory_flag,
    add_modes_flag,
    apply_host_memory,
    build_mode,
    device_meta,
    sync,
    timed_batch,
    write_results,
)
from torch.profiler import ProfilerActivity, profile

from bso.distributed import resolve_device
from bso.models import VGG11

# operator name (aten:: or mkldnn/cudnn kernel) -> category; the first pattern that matches wins
CATEGORIES = (
    ("compiled loops", r"CompiledFxGraph|Torch-Compiled Region|triton_"),  # backend=fused
    ("convolution", r"conv|mkldnn_convolution|cudnn_convolution|slow_conv|thnn_conv"),
    ("batchnorm", r"batch_norm"),
    ("pooling", r"pool"),
    ("bit packing", r"bitwise|__lshift__|__rshift__|packbits|index_select|take"),
    (
        "memory copies",
        r"copy_|clone|contiguous|_to_copy|^aten::to$|empty_like|cat|stack|zeros|fill_",
    ),
    ("reductions", r"sum|mean|norm|amax|max|min|all_reduce|count_nonzero"),
    (
        "element-wise",
        r"add|sub|mul|div|sigmoid|ge|gt|lt|le|eq|where|sqrt|neg|abs|sign|clamp|pow|"
        r"exp|rsub|reciprocal|heaviside|xor|logical|masked|addcmul|addcdiv|lerp",
    ),
)


def category(name: str) -> str:
    short = name.split("::")[-1]
    for label, pattern in CATEGORIES:
        if re.search(pattern, short):
            return label
    return "other operators"


def profiled(args, device, batch: int, T: int) -> dict:
    torch.manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    built = {}
    for mode in args.modes:
        model, engine, opt = build_mode(args.method, T, args.layers, device, mode)
        engine.train_batch(model, opt, x, y)  # warm-up
        built[mode] = (model, engine, opt)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    totals = {m: {} for m in args.modes}
    wall = {m: [] for m in args.modes}
    for _ in range(args.iters):
        for mode, (model, engine, opt) in built.items():
            wall[mode].append(timed_batch(engine, model, opt, x, y, device) * 1e3)  # unprofiled
            sync(device)
            with profile(activities=activities) as prof:
                engine.train_batch(model, opt, x, y)
                sync(device)
            events = prof.key_averages()
            for e in events:
                key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
                totals[mode][e.key] = totals[mode].get(e.key, 0.0) + getattr(e, key, 0.0) / 1e3
    out = {}
    for mode in args.modes:
        ops = {k: v / args.iters for k, v in totals[mode].items()}
        cats: dict[str, float] = {}
        for name, ms in ops.items():
            cats[category(name)] = cats.get(category(name), 0.0) + ms
        profiled_ms = sum(ops.values())
        top = sorted(ops.items(), key=lambda kv: -kv[1])[: args.top]
        out[mode] = {
            "batch": batch,
            "T": T,
            "iteration_ms": statistics.median(wall[mode]),
            "profiled_ms": profiled_ms,
            "categories_ms": dict(sorted(cats.items(), key=lambda kv: -kv[1])),
            "top_ops_ms": top,
        }
    return out


def markdown(meta: dict, results: dict) -> list[str]:
    lines = [
        f"{meta['device_name']} ({meta['device']}, {meta['threads']} threads, torch {meta['torch']}); "
        f"{meta['method']}, layers {meta['layers']}; self time per iteration, mean of {meta['iters']}",
        "",
    ]
    for key, modes in results.items():
        names = list(modes)
        cats = sorted(
            {c for m in modes.values() for c in m["categories_ms"]},
            key=lambda c: -max(m["categories_ms"].get(c, 0.0) for m in modes.values()),
        )
        lines += [
            f"### {key}",
            "",
            "| category | " + " | ".join(f"{n} (ms) | {n} share" for n in names) + " |",
            "|---|" + "---|---|" * len(names),
        ]
        for c in cats:
            cells = []
            for n in names:
                ms = modes[n]["categories_ms"].get(c, 0.0)
                cells.append(f"{ms:.1f} | {ms / modes[n]['profiled_ms']:.3f}")
            lines.append(f"| {c} | " + " | ".join(cells) + " |")
        lines.append(
            "| all profiled operators | "
            + " | ".join(f"{modes[n]['profiled_ms']:.1f} | 1.000" for n in names)
            + " |"
        )
        lines.append(
            "| iteration, unprofiled (median) | "
            + " | ".join(f"{modes[n]['iteration_ms']:.1f} | " for n in names)
            + " |"
        )
        for n in names:
            lines += [
                "",
                f"Top operators, {n}:",
                "",
                "| operator | ms | category |",
                "|---|---|---|",
            ]
            lines += [
                f"| `{op}` | {ms:.1f} | {category(op)} |" for op, ms in modes[n]["top_ops_ms"]
            ]
        lines.append("")
    return lines


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--method", default="tbso", choices=["tbso", "bso"])
    add_modes_flag(parser)
    parser.add_argument("--batch", type=int, nargs="+", default=[16])
    parser.add_argument("--T", type=int, nargs="+", default=[4])
    parser.add_argument("--layers", default=VGG11)
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--top", type=int, default=15, help="operators listed per mode")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/profile")
    add_host_memory_flag(parser)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    device = resolve_device(args.device)
    reused = apply_host_memory(args)
    meta = {
        "reuse_host_memory": reused,
        **device_meta(device),
        "torch": torch.__version__,
        "method": args.method,
        "layers": args.layers,
        "iters": args.iters,
    }
    results = {}
    for batch in args.batch:
        for T in args.T:
            results[f"batch {batch}, T={T}"] = profiled(args, device, batch, T)
    write_results(
        args.out, meta, [{"setting": k, **v} for k, v in results.items()], markdown(meta, results)
    )


if __name__ == "__main__":
    main()
