"""The GPU check (`make gpu-check`): a short device window turned into verified results. The items
run most important first, each in its own process (forked from a server that imported torch and
bso once, CUDA untouched), and each result is appended to
``<out>.jsonl`` (and ``<out>.md`` re-rendered from it) the moment it exists; a call stops when its
time budget is spent, and the next call skips what is done and continues.

    python scripts/bench/gpu_check.py                        # CUDA, full size, 480 s budget
    python scripts/bench/gpu_check.py --budget-s 300         # a shorter window
    python scripts/bench/gpu_check.py --list                 # the items and what each proves
    python scripts/bench/gpu_check.py --only flips speed --redo failed
    python scripts/bench/gpu_check.py --allow-cpu --device cpu --out /tmp/gc   # tiny, on the CPU

Items, in order (``--list`` prints them with their sizes):

a. correctness: ``train_tbso`` / ``train_bso`` run the real ``experiment=cifar10_tbso`` /
   ``cifar10_bso`` configs through train.py's entry point (Hydra's main, in a forked process, as
   ``python train.py`` runs it) on synthetic CIFAR-10 files in the real format (the
   loader with its augmentation, pinned copies, checkpoints, the 1-bit export), under
   deterministic kernels: straight, then cut by SIGINT after one batch and resumed; the resumed run
   must end bit for bit where the straight one did. ``flips``: every mode (lean / plain, eager /
   fused element-wise loops) flips the same weights as the plain mode. ``ddp``: train.py under
   torchrun, two ranks sharing the device (gloo: NCCL takes one device per rank) with
   SyncBatchNorm on CUDA. ``nccl``: a one-rank process group in torchrun's environment (NCCL on
   CUDA, gloo on the CPU), its collectives, and DDP with SyncBatchNorm flipping what the bare model
   flips.
b. headline: T-BSO, BSO (lean and plain) and BPTT-latent samples/s, ms per time step and peak CUDA
   memory at batch 128, T=6 (Table 2's setting), with the fast path's defaults.
c. Figure 4's memory points (T = 1, 2, 4, 8, 16, 35: one item per T) and the roofline at batch
   128, T=6.
d. the rest of `make bench-gpu`: the CIFAR-10 loader with workers, the fused element-wise loops,
   bf16 autocast and fast.compile timed, the other T, the roofline's other points.

Budget: no item starts once ``--budget-s`` is spent; an item still running then is stopped and
recorded as ``timeout`` (the next call runs it again). The first item of a call always runs to its
end (at most ``--item-timeout-s``), so every call makes progress. An item is done for a device and
size once it has a record (``ok``, ``failed``: a check did not hold, ``error``: it raised,
``skipped``: not on this device); ``--redo`` runs items again. Exit status 1 when an item of the call
failed or raised. Every record names the device, driver, CUDA, cuDNN, torch, Triton and
spikingjelly versions (``_common.environment``).

Without CUDA it refuses and writes nothing, unless ``--allow-cpu`` (tiny sizes: the test suite runs
it so that this script cannot rot).

This file holds the plan and the driver; what each item runs is in ``gpu_check_items.py``, the
Markdown report in ``gpu_check_report.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import multiprocessing
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from _common import METHODS, MODES, ROOT, environment, require_cuda
from gpu_check_items import child, load_records
from gpu_check_report import latest_records, record_key, render

from bso.models import VGG11

TINY_LAYERS = "8C3-AP2-16C3"

# The sizes of every item: "full" on a GPU (the paper's), "tiny" on a CPU (seconds; one instance
# of every kind of item, so that the test suite runs every code path of this script).
SIZES = {
    "full": {
        "layers": VGG11,
        "batch": 128,  # Table 2's CIFAR batch
        "T": 6,  # Table 2's T
        "iters": 10,
        "train_methods": ["tbso", "bso"],
        "train_per_file": 64,  # 5 x 64 = 320 training images: batches of 128, 128, 64
        "train_overrides": [],  # the experiment's own model, batch and T
        "flip_methods": ["tbso", "bso"],
        "flip_modes": list(MODES),
        "flip_batch": 32,
        "flip_batches": 2,
        "ranks": 2,
        "fig4_T": [1, 2, 4, 8, 16, 35],
        "roofline": [[128, 6]],
        "roofline_more": [[16, 4], [16, 6], [128, 4]],
        "roofline_modes": list(MODES),
        "loader_per_file": 2000,
        "workers": [4, 8],
        "more_T": [1, 2, 4],
        "fast_path_modes": ["lean_fused", "plain_fused"],
    },
    "tiny": {
        "layers": TINY_LAYERS,
        "batch": 4,
        "T": 2,
        "iters": 1,
        "train_methods": ["tbso"],
        "train_per_file": 2,  # 10 training images: 2 batches of 5
        "train_overrides": ["model.layers=8C3-AP2-16C3-AP2", "engine.T=2", "dataset.batch_size=5"],
        "flip_methods": ["tbso"],
        "flip_modes": ["lean", "plain"],  # the fused ones compile for long; tests/test_perf_bench
        "flip_batch": 2,
        "flip_batches": 2,
        "ranks": 1,  # a torchrun of train.py; two ranks on a CPU: tests/test_distributed
        "fig4_T": [1, 2],
        "roofline": [[4, 2]],
        "roofline_more": [],
        "roofline_modes": ["lean", "plain"],  # the fused loops: flips and speed_fast_path
        "loader_per_file": 8,
        "workers": [0],
        "more_T": [1],
        "fast_path_modes": [],  # the fused modes: in flips
    },
}


@dataclass
class Item:
    name: str
    group: str  # a: correctness, b: headline numbers, c: Figure 4 and roofline, d: the rest
    kind: str  # the function in gpu_check_items.KINDS that runs it
    params: dict
    proves: str
    cuda_only: bool = False
    key: tuple = field(init=False)

    def __post_init__(self):
        self.key = (self.name, json.dumps(self.params, sort_keys=True))


def _speed(method: str, mode: str | None, T: int, autocast=False, compile=False) -> dict:
    return {"method": method, "mode": mode, "T": T, "autocast": autocast, "compile": compile}


def plan(size: dict, device: torch.device) -> list[Item]:
    """Every item, most important first, at ``size``'s sizes."""
    cuda = device.type == "cuda"
    bench = {"layers": size["layers"], "batch": size["batch"], "iters": size["iters"]}
    T = size["T"]
    items = [
        Item(
            f"train_{method}",
            "a",
            "train",
            {
                "method": method,
                "per_file": size["train_per_file"],
                "overrides": size["train_overrides"],
            },
            f"experiment=cifar10_{method} trains through train.py on this device (loader, pinned "
            "copies, checkpoints, 1-bit export); a run cut after one batch resumes and ends bit "
            "for bit where the straight run did (deterministic kernels)",
        )
        for method in size["train_methods"]
    ]
    items += [
        Item(
            "flips",
            "a",
            "flips",
            {
                "methods": size["flip_methods"],
                "modes": size["flip_modes"],
                "layers": size["layers"],
                "T": T,
                "batch": size["flip_batch"],
                "batches": size["flip_batches"],
            },
            "lean / plain and eager / fused element-wise loops (Triton on CUDA) flip the same "
            "weights, batch by batch, and end with the same +-1 weights and optimizer state "
            "(momentum; T-BSO's second moment), deterministic kernels",
        ),
        Item(
            "ddp",
            "a",
            "ddp",
            {
                "ranks": size["ranks"],
                "per_file": size["train_per_file"],
                "overrides": size["train_overrides"],
                "sync_batchnorm": cuda and size["ranks"] > 1,
            },
            "train.py under torchrun: the ranks share the device (gloo), SyncBatchNorm on CUDA; "
            "one run directory, the epoch completed",
        ),
        Item(
            "nccl",
            "a",
            "nccl",
            {"layers": size["layers"], "T": T, "batch": size["flip_batch"], "batches": 2},
            "a one-rank process group in torchrun's environment (NCCL on CUDA, gloo on CPU): "
            "all_reduce and broadcast, and DDP with SyncBatchNorm flips what the bare model flips",
        ),
        Item(
            "speed",
            "b",
            "speed",
            {
                **bench,
                "runs": [
                    _speed(method, mode, T)
                    for method in METHODS[::-1]  # tbso, bso, bptt_latent
                    for mode in (["plain"] if method == "bptt_latent" else ["lean", "plain"])
                ],
            },
            "the headline: training samples/s, ms per time step and peak CUDA memory "
            "(allocated) of T-BSO, BSO (lean, plain) and BPTT-latent, with channels_last and "
            "cudnn.benchmark",
        ),
    ]
    items += [
        Item(
            f"fig4_T{t}",
            "c",
            "fig4",
            {"layers": size["layers"], "batch": size["batch"], "T": t},
            "Figure 4: activation memory (autograd's saved tensors) and peak CUDA memory of "
            "BPTT-latent, BSO and T-BSO (lean) at this T",
        )
        for t in size["fig4_T"]
    ]
    items += [
        Item(
            f"roofline_b{batch}_T{t}",
            "c",
            "roofline",
            {"layers": size["layers"], "points": [[batch, t]], "modes": size["roofline_modes"]},
            "an iteration against its convolutions alone, four modes, same flips (T-BSO)",
        )
        for batch, t in size["roofline"]
    ]
    items += [
        Item(
            "loader",
            "d",
            "loader",
            {
                "per_file": size["loader_per_file"],
                "workers": size["workers"],
                "batch": size["batch"],
            },
            "the CIFAR-10 training loader's samples/s (recipe augmentation, pinned, copied to the "
            "device): more than the model's, or add workers",
        ),
        Item(
            "speed_fast_path",
            "d",
            "speed",
            {
                **bench,
                "runs": [
                    *(_speed("tbso", mode, T) for mode in size["fast_path_modes"]),
                    _speed("tbso", "lean", T, autocast=True),
                ],
            },
            "backend=fused's compiled loops and fast.autocast (bf16) timed (T-BSO)",
        ),
        Item(
            "speed_compile",
            "d",
            "speed",
            {**bench, "runs": [_speed("tbso", "lean", T, compile=True)]},
            "fast.compile (torch.compile of the per-step forward) runs and is timed (T-BSO, lean)",
            cuda_only=True,
        ),
        Item(
            "speed_more_T",
            "d",
            "speed",
            {
                **bench,
                "runs": [_speed(m, None, t) for m in METHODS[::-1] for t in size["more_T"]],
            },
            "samples/s and peak memory at bench-gpu's other T (BSO/T-BSO lean, as trained)",
        ),
    ]
    if size["roofline_more"]:
        items.append(
            Item(
                "roofline_more",
                "d",
                "roofline",
                {
                    "layers": size["layers"],
                    "points": size["roofline_more"],
                    "modes": size["roofline_modes"],
                },
                "the roofline at bench-gpu's other batch and T",
            )
        )
    return items


# --- the driver: plan, budget, results ----------------------------------------------------------


PRELOAD = ["_common", "gpu_check_items", "gpu", "memory_vs_T", "roofline", "bso.data.synthetic"]


def _child_entry(kind: str, params: dict, device_name: str, out: str) -> None:
    os.setsid()  # a process group of its own: a timeout ends it and whatever it started
    child(kind, params, device_name, Path(out))


def children():
    """Items run in processes forked from a server that imported torch and bso once (seconds per
    item saved) and never touched CUDA, so every item starts with a fresh CUDA context."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def done_items(records: list[dict], redo: list[str]) -> dict[tuple, str]:
    """The items whose latest record counts as done (by key: name, sizes, device), with its status:
    every status but ``timeout``, unless ``redo`` names the item, ``failed`` (failed or error) or
    ``all``."""
    done = {}
    for r in latest_records(records):
        again = {"all", r["item"]} & set(redo) or (
            "failed" in redo and r["status"] in ("failed", "error")
        )
        if r["status"] != "timeout" and not again:
            done[record_key(r)] = r["status"]
    return done


def run_item(item: Item, device: torch.device, timeout: float, env: dict, ctx) -> dict:
    """The item in a child process, ended with its process group at ``timeout``; its record."""
    start = time.perf_counter()
    base = {"item": item.name, "group": item.group, "kind": item.kind, "params": item.params}
    if item.cuda_only and device.type != "cuda":
        return {**base, "status": "skipped", "seconds": 0.0, "env": env, "error": "CUDA only"}
    with tempfile.TemporaryDirectory(prefix="gpu_check_item_") as tmp:
        out = Path(tmp) / "outcome.json"
        proc = ctx.Process(
            target=_child_entry, args=(item.kind, item.params, str(device), str(out))
        )
        proc.start()
        proc.join(timeout)
        if proc.is_alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the child and what it started
            proc.join()
            return {
                **base,
                "status": "timeout",
                "seconds": round(time.perf_counter() - start, 1),
                "env": env,
                "error": f"stopped after {timeout:.0f} s (the budget); the next call runs it again",
            }
        outcome = json.loads(out.read_text()) if out.is_file() else None
    if outcome is None:
        outcome = {
            "status": "error",
            "env": env,
            "error": f"the item's process ended with {proc.exitcode}",
        }
    return {**base, **outcome, "seconds": round(time.perf_counter() - start, 1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--budget-s", type=float, default=480, help="wall-time budget (s)")
    parser.add_argument("--item-timeout-s", type=float, default=300, help="at most, per item")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--allow-cpu", action="store_true", help="run on a CPU --device (tiny)")
    parser.add_argument("--size", choices=sorted(SIZES), help="default: full on CUDA, else tiny")
    parser.add_argument("--only", nargs="+", metavar="ITEM", help="run only these items")
    parser.add_argument(
        "--redo", nargs="+", default=[], metavar="ITEM", help="run again: names, failed, all"
    )
    parser.add_argument("--list", action="store_true", help="print the items and exit")
    parser.add_argument(
        "--out",
        type=Path,
        help="results: <out>.jsonl and <out>.md (default: benchmarks/results/gpu_check, or "
        "gpu_check_cpu on a CPU)",
    )
    args = parser.parse_args(argv)

    # CUDA's availability asked through NVML: the driver stays uninitialised in the processes that
    # fork the items' processes (a forked child cannot use CUDA once its parent initialised it)
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    device = torch.device(args.device)
    if not args.list:  # the plan can be listed anywhere
        device = require_cuda(
            args.device,
            args.allow_cpu,
            "gpu-check",
            "pass --allow-cpu --device cpu for the tiny CPU run",
        )
    size = SIZES[args.size or ("full" if device.type == "cuda" else "tiny")]
    if args.out is None:
        args.out = (
            ROOT
            / "benchmarks/results"
            / ("gpu_check" if device.type == "cuda" else "gpu_check_cpu")
        )
    items = everything = plan(size, device)
    names = [i.name for i in items]
    if args.only:
        unknown = sorted(set(args.only) - set(names))
        if unknown:
            sys.exit(f"error: unknown item(s) {unknown} in --only; the items: {' '.join(names)}")
        items = [i for i in items if i.name in args.only]
    if args.list:
        for i in items:
            print(f"{i.group}. {i.name}: {i.proves}\n     {json.dumps(i.params)}")
        return 0

    env = environment(device)
    jsonl = args.out.with_suffix(".jsonl")
    records = load_records(jsonl)
    unknown = sorted(set(args.redo) - set(names) - {"all", "failed"})
    if unknown:
        sys.exit(f"error: unknown item(s) {unknown} in --redo; give items, failed or all")
    done = done_items(records, args.redo)
    pending = []
    for item in items:
        status = done.get((*item.key, env["device_name"]))
        if status:
            print(f"gpu-check: {item.name}: done earlier ({status})")
        else:
            pending.append(item)
    deadline = time.monotonic() + args.budget_s
    ran: list[dict] = []
    ctx = children()
    for n, item in enumerate(pending):
        left = deadline - time.monotonic()
        if ran and left <= 0:
            rest = " ".join(i.name for i in pending[n:])
            print(
                f"gpu-check: the {args.budget_s:.0f} s budget is spent; results so far in "
                f"{args.out.with_suffix('.md')}; left for the next call (the same command): {rest}"
            )
            break
        timeout = args.item_timeout_s if not ran else min(left, args.item_timeout_s)
        print(f"gpu-check: {item.group}. {item.name} ...", flush=True)
        record = run_item(item, device, timeout, env, ctx)
        record["finished"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        jsonl.parent.mkdir(parents=True, exist_ok=True)
        with jsonl.open("a") as f:  # appended at once: a cut-off call keeps what is done
            f.write(json.dumps(record, default=str) + "\n")
        records.append(record)
        args.out.with_suffix(".md").write_text(render(records, everything))
        ran.append(record)
        bad = {k: v for k, v in record.get("checks", {}).items() if not v}
        print(
            f"gpu-check: {item.name}: {record['status']} in {record['seconds']:.0f} s"
            + (f"; failed checks: {sorted(bad)}" if bad else "")
            + (f"; {record['error']}" if record.get("error") else ""),
            flush=True,
        )
    else:
        args.out.with_suffix(".md").write_text(render(records, everything))
        print(f"gpu-check: every item is done; {args.out.with_suffix('.md')}")
    return int(any(r["status"] in ("failed", "error") for r in ran))


if __name__ == "__main__":
    sys.exit(main())
