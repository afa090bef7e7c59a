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
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import multiprocessing
import os
import runpy
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from _common import METHODS, MODES, ROOT, build_mode, environment, require_cuda

from bso.models import VGG11

DETERMINISTIC_CUBLAS = ":4096:8"  # CUBLAS_WORKSPACE_CONFIG for deterministic cuBLAS
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
    kind: str  # the function in KINDS that runs it
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


# --- the items (each in a child process) ---------------------------------------


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _train_entry(overrides: list[str], interrupt_after: int | None, log: str) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)  # the run's output, for the record when it fails
    os.dup2(fd, 2)
    as_train(interrupt_after, overrides)


def _train_py(overrides: list[str], log: Path, interrupt_after: int | None = None) -> dict:
    """train.py's entry point on ``overrides`` in a process forked from this one (imports done,
    CUDA untouched): what ``python train.py <overrides>`` runs; its exit status and output."""
    start = time.perf_counter()
    proc = multiprocessing.get_context("fork").Process(
        target=_train_entry, args=(overrides, interrupt_after, str(log))
    )
    proc.start()
    proc.join()
    text = log.read_text() if log.is_file() else ""
    return {
        "rc": proc.exitcode,
        "seconds": round(time.perf_counter() - start, 1),
        "output": text[-4000:],
        "log": text,
    }


def _run(cmd: list[str], env: dict) -> dict:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    return {
        "rc": proc.returncode,
        "seconds": round(time.perf_counter() - start, 1),
        "output": proc.stdout[-2000:] + proc.stderr[-4000:],
    }


def _status(run_dir: Path) -> str | None:
    path = run_dir / "status.json"
    return json.loads(path.read_text())["status"] if path.is_file() else None


def _records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _checkpoint(path: Path) -> dict | None:
    return torch.load(path, weights_only=False, map_location="cpu") if path.is_file() else None


def item_train(p: dict, device: torch.device, work: Path) -> tuple[dict, dict]:
    """Straight; cut by SIGINT after one batch; resumed: the resumed run ends where the straight
    one did (model tensors and the epoch's record)."""
    from bso.data.synthetic import write_cifar

    data = write_cifar(work / "data", "cifar10", per_file=p["per_file"])
    common = [
        f"experiment=cifar10_{p['method']}",
        f"dataset.root={data}",
        "dataset.epochs=1",
        "dataset.num_workers=0",  # exact resume (docs/long-runs.md); pinned copies still run
        "fast.cudnn_benchmark=false",  # deterministic kernels, the same in every process
        "logger=none",
        f"device={device}",
        *p["overrides"],
    ]
    straight, cut = work / "straight", work / "cut"
    runs = {
        "straight": _train_py([*common, f"hydra.run.dir={straight}"], work / "straight.log"),
        "cut": _train_py([*common, f"hydra.run.dir={cut}"], work / "cut.log", interrupt_after=1),
    }
    runs["resumed"] = _train_py([f"resume={cut}"], work / "resumed.log")
    a, b = _checkpoint(straight / "last.pt"), _checkpoint(cut / "last.pt")
    rec_a, rec_b = _records(straight), _records(cut)
    log = (cut / "train.log").read_text() if (cut / "train.log").is_file() else ""
    checks = {
        "straight_completed": runs["straight"]["rc"] == 0 and _status(straight) == "completed",
        "straight_finite": bool(rec_a)
        and all(math.isfinite(rec_a[-1].get(k, math.nan)) for k in ("train/loss", "test/loss")),
        "weights_are_pm1": a is not None
        and all(set(a["model"][k].unique().tolist()) <= {-1.0, 1.0} for k in a["binary_weights"]),
        "export_1bit_written": (straight / "last_1bit.pt").is_file(),
        "cut_after_one_batch": runs["cut"]["rc"] == 130 and "and 1 batches" in log,
        "resumed_completed": runs["resumed"]["rc"] == 0 and _status(cut) == "completed",
    }
    differing = []
    if a is not None and b is not None:
        theirs = b["model"]
        differing = [
            k for k, v in a["model"].items() if k not in theirs or not torch.equal(v, theirs[k])
        ]
    checks["resume_bitwise"] = (
        a is not None
        and b is not None
        and not differing
        and bool(rec_a and rec_b)
        and rec_a[-1]["train/loss"] == rec_b[-1]["train/loss"]
    )
    info = json.loads((straight / "run_info.json").read_text()) if a is not None else {}
    record = rec_a[-1] if rec_a else {}
    result = {
        "method": p["method"],
        "device": info.get("device"),
        "train_images": 5 * p["per_file"],
        "train_loss": record.get("train/loss"),
        "test_acc1": record.get("test/acc1"),
        "flip_rate": record.get("flip_rate/all"),
        "train_samples_per_s": record.get("throughput/train_samples_per_s"),
        "cuda_peak_allocated_mb": record.get("memory/cuda_peak_allocated_mb"),
        "seconds": {k: r["seconds"] for k, r in runs.items()},
        "differing_tensors": differing[:10],
        "nondeterministic_ops": nondeterministic_ops(
            line for r in runs.values() for line in r["log"].splitlines()
        ),
    }
    failed = {k: r["output"] for k, r in runs.items() if r["rc"] != (130 if k == "cut" else 0)}
    if failed:
        result["failed_runs"] = failed
    return result, checks


def item_flips(p: dict, device: torch.device, work: Path) -> tuple[dict, dict]:
    import gpu

    gpu.deterministic()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = [
            gpu.flip_check(
                method, p["T"], p["batch"], p["batches"], p["layers"], device, p["modes"]
            )
            for method in p["methods"]
        ]
    for r in rows:
        r["nondeterministic_ops"] = nondeterministic_ops(str(w.message) for w in caught)
    checks = {}
    for r in rows:
        checks[f"{r['method']}_same_flips"] = r["same_flips"]
        checks[f"{r['method']}_same_final_weights"] = r["same_final_weights"]
        checks[f"{r['method']}_same_momentum"] = r["same_momentum"]
    return {"rows": rows}, checks


NONDETERMINISTIC = "does not have a deterministic implementation"


def nondeterministic_ops(lines) -> list[str]:
    """The operations torch warned about under ``use_deterministic_algorithms(True,
    warn_only=True)``: those that may break a bitwise comparison on this device."""
    return sorted(
        {line.split(NONDETERMINISTIC)[0].split()[-1] for line in lines if NONDETERMINISTIC in line}
    )


def _torchrun(nproc: int, args: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        *args,
    ]


def item_ddp(p: dict, device: torch.device, work: Path) -> tuple[dict, dict]:
    """train.py under torchrun, ``ranks`` processes sharing this device over gloo."""
    from bso.data.synthetic import write_cifar

    data = write_cifar(work / "data", "cifar10", per_file=p["per_file"])
    run_dir = work / "run"
    dev = "cuda:0" if device.type == "cuda" else "cpu"  # every rank on the one device
    overrides = [
        "experiment=cifar10_tbso",
        f"dataset.root={data}",
        "dataset.epochs=1",
        "dataset.num_workers=0",
        "logger=none",
        f"device={dev}",
        f"distributed.backend={'gloo' if p['ranks'] > 1 else 'auto'}",
        f"distributed.sync_batchnorm={str(p['sync_batchnorm']).lower()}",
        f"hydra.run.dir={run_dir}",
        *p["overrides"],
    ]
    tmp = work / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp), "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    run = _run(_torchrun(p["ranks"], ["train.py", *overrides]), env)
    records = _records(run_dir)
    log = (run_dir / "train.log").read_text() if (run_dir / "train.log").is_file() else ""
    checks = {
        "completed": run["rc"] == 0 and _status(run_dir) == "completed",
        "one_record": len(records) == 1 and math.isfinite(records[0].get("train/loss", math.nan)),
        "all_ranks": p["ranks"] == 1 or f"{p['ranks']} processes" in log,
    }
    result = {
        "ranks": p["ranks"],
        "backend": "gloo" if p["ranks"] > 1 else "none (one process)",
        "sync_batchnorm": p["sync_batchnorm"],
        "seconds": run["seconds"],
        "train_loss": records[0].get("train/loss") if records else None,
    }
    if run["rc"] != 0:
        result["output"] = run["output"]
    return result, checks


def item_nccl(p: dict, device: torch.device, work: Path) -> tuple[dict, dict]:
    """:func:`nccl_worker` as rank 0 of 1, in a forked process given torchrun's environment."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}
    env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    out = work / "worker.json"
    start = time.perf_counter()
    proc = multiprocessing.get_context("fork").Process(
        target=nccl_worker, args=(p, str(device), out, env)
    )
    proc.start()
    proc.join()
    result = json.loads(out.read_text()) if out.is_file() else {}
    checks = {
        "worker_completed": proc.exitcode == 0 and bool(result),
        "collectives": bool(result.get("collectives")),
        "ddp_same_flips": bool(result.get("same_flips")),
    }
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result, checks


def nccl_worker(p: dict, device_name: str, out: Path, env: dict) -> None:
    """Rank 0 of a one-rank process group (NCCL on CUDA, gloo on CPU; ``env``: torchrun's
    variables): two collectives, then T-BSO wrapped in DDP (with SyncBatchNorm on CUDA), plain and
    lean (whose flips inside backward average the gradient over the ranks: an all_reduce in
    backward), against the bare plain model, from the same seed on the same batches."""
    os.environ.update(env)
    import gpu
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    device = torch.device(device_name)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    backend = "nccl" if cuda else "gloo"
    dist.init_process_group(backend, **({"device_id": device} if cuda else {}))
    try:
        world = dist.get_world_size()
        t = torch.arange(4.0, device=device)
        dist.all_reduce(t)
        box = torch.full((2,), 7.0, device=device)
        dist.broadcast(box, 0)
        collectives = torch.equal(t.cpu(), torch.arange(4.0) * world) and bool((box == 7).all())
        gpu.deterministic()
        flips = {}
        for run in ("bare", "plain", "lean"):  # bare: no DDP; plain / lean: DDP (engine.lean)
            mode = "plain" if run == "bare" else run
            model, engine, optimizer = build_mode("tbso", p["T"], p["layers"], device, mode)
            trained = model
            if run != "bare":
                if cuda:
                    trained = torch.nn.SyncBatchNorm.convert_sync_batchnorm(trained)
                trained = DistributedDataParallel(
                    trained, device_ids=[device.index or 0] if cuda else None
                )
            gen = torch.Generator().manual_seed(1)
            flips[run] = []
            for _ in range(p["batches"]):
                x = torch.randn(p["batch"], 3, 32, 32, generator=gen).to(device)
                y = torch.randint(0, 10, (p["batch"],), generator=gen).to(device)
                flips[run].append(engine.train_batch(trained, optimizer, x, y)[2].cpu())
        same = {
            run: all(torch.equal(a, b) for a, b in zip(flips["bare"], flips[run], strict=True))
            for run in ("plain", "lean")
        }
        result = {
            "backend": backend,
            "world_size": world,
            "collectives": collectives,
            "sync_batchnorm": cuda,
            "same_flips_as_bare": same,
            "same_flips": all(same.values()),
            "flips_per_batch": [f.sum().item() for f in flips["bare"]],
        }
        out.write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def item_speed(p: dict, device: torch.device, work: Path) -> tuple[dict, dict]:
    import gpu

    rows = []
    for run in p["runs"]:
        row = gpu.train_speed(
            run["method"],
            run["T"],
            p["batch"],
            p["iters"],
            device,
            run["autocast"],
            p["layers"],
            mode=run["mode"],
            compile=run["compile"],
        )
        rows.append(row)
        print(json.dumps(row), flush=True)
        _free(device)
    checks = {"finite": all(math.isfinite(r["samples_per_s"]) for r in rows)}
    return {"rows": rows}, checks


def item_fig4(p: dict, device: torch.device, work: Path) -> tuple[dict, dict]:
    import memory_vs_T

    points = []
    for method in METHODS:
        points.append(memory_vs_T.measure(method, p["T"], p["batch"], p["layers"], str(device)))
        _free(device)
    return {"points": points}, {"measured": all(pt["activation_peak_bytes"] > 0 for pt in points)}


def item_roofline(p: dict, device: torch.device, work: Path) -> tuple[dict, dict]:
    import roofline

    argv = [
        "--layers",
        p["layers"],
        "--device",
        str(device),
        "--iters",
        "3",
        "--modes",
        *p["modes"],
    ]
    rows, meta = [], {}
    for batch, T in p["points"]:
        args = roofline.parse_args([*argv, "--batch", str(batch), "--T", str(T)])
        if device.type == "cuda":  # as training runs: NHWC, cuDNN's fastest algorithms
            args.channels_last = True
            torch.backends.cudnn.benchmark = True
        meta, point_rows = roofline.run(args)
        rows += point_rows
        _free(device)
    for r in rows:  # the per-repetition lists stay in roofline's own results
        r.pop("iteration_s_all", None)
        r.pop("conv_s_all", None)
    # the modes' flips are compared under deterministic kernels by the flips item; here cuDNN picks
    # its algorithms per model, which may round differently: their flips are shown, not checked
    return {"meta": meta, "rows": rows}, {"timed": all(r["conv_ms"] > 0 for r in rows)}


def item_loader(p: dict, device: torch.device, work: Path) -> tuple[dict, dict]:
    import gpu

    from bso.data.synthetic import write_cifar

    root = write_cifar(work / "data", "cifar10", per_file=p["per_file"])
    rows = [gpu.loader_speed(root, w, p["batch"], device) for w in p["workers"]]
    return {"rows": rows}, {"every_sample": all(r["samples"] == 5 * p["per_file"] for r in rows)}


KINDS = {
    "train": item_train,
    "flips": item_flips,
    "ddp": item_ddp,
    "nccl": item_nccl,
    "speed": item_speed,
    "fig4": item_fig4,
    "roofline": item_roofline,
    "loader": item_loader,
}
DETERMINISTIC_KINDS = ("train", "flips", "nccl")  # cuBLAS needs its workspace setting up front


def child(kind: str, params: dict, device_name: str, out: Path) -> None:
    """Run one item in this process; its outcome as JSON in ``out``. The item's files go to a
    folder beside ``out``, which the parent removes even when it had to kill this process."""
    if kind in DETERMINISTIC_KINDS:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", DETERMINISTIC_CUBLAS)
    device = torch.device(device_name)
    outcome: dict = {}
    try:  # the item first: it may fork processes, which needs CUDA untouched here
        work = out.parent / "work"
        work.mkdir()
        result, checks = KINDS[kind](params, device, work)
        outcome.update(
            status="ok" if all(checks.values()) else "failed", result=result, checks=checks
        )
    except Exception as err:
        outcome.update(status="error", error=f"{type(err).__name__}: {err}"[:2000])
        outcome["traceback"] = traceback.format_exc()[-4000:]
        traceback.print_exc()
    outcome["env"] = environment(device)
    out.write_text(json.dumps(outcome, default=str))


def as_train(interrupt_after: int | None, overrides: list[str]) -> None:
    """``python train.py <overrides>`` under deterministic kernels; with ``interrupt_after``, a
    SIGINT after that many batches (the run saves a mid-epoch checkpoint and exits 130)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", DETERMINISTIC_CUBLAS)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    if interrupt_after:
        from bso.engine import OnlineEngine

        original, calls = OnlineEngine.train_batch, []

        def train_batch(self, *args, **kwargs):
            result = original(self, *args, **kwargs)
            calls.append(1)
            if len(calls) == interrupt_after:
                signal.raise_signal(signal.SIGINT)
            return result

        OnlineEngine.train_batch = train_batch
    sys.argv = [str(ROOT / "train.py"), *overrides]
    runpy.run_path(str(ROOT / "train.py"), run_name="__main__")


# --- the driver: plan, budget, results ----------------------------------------------------------


def load_records(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def record_key(record: dict) -> tuple:
    return (
        record["item"],
        json.dumps(record["params"], sort_keys=True),
        record["env"]["device_name"],
    )


PRELOAD = ["_common", "gpu", "memory_vs_T", "roofline", "bso.data.synthetic"]


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
    for r in _latest(records):
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


# --- the report ---------------------------------------------------------------------------------


def _latest(records: list[dict]) -> list[dict]:
    latest: dict = {}
    for r in records:
        latest[record_key(r)] = r
    return list(latest.values())


def _env_line(env: dict) -> str:
    parts = [
        f"{env['device_name']} ({env['device']})",
        f"driver {env.get('driver') or '-'}",
        f"CUDA {env.get('cuda') or '-'}",
        f"cuDNN {env.get('cudnn') or '-'}",
        f"torch {env.get('torch')}",
        f"Triton {env.get('triton') or '-'}",
        f"spikingjelly {env.get('spikingjelly') or '-'}",
    ]
    return ", ".join(parts)


def _mb(value) -> str:
    return "-" if value is None else f"{value:.0f}"


def _summary(r: dict) -> str:
    res = r.get("result") or {}
    if r["status"] in ("error", "timeout", "skipped"):
        return (r.get("error") or "").splitlines()[0][:160] if r.get("error") else ""
    bad = sorted(k for k, v in r.get("checks", {}).items() if not v)
    if bad:
        ops = {op for x in [res, *res.get("rows", [])] for op in x.get("nondeterministic_ops", [])}
        suspects = f" (ops without a deterministic kernel: {', '.join(sorted(ops))})" if ops else ""
        return "failed: " + ", ".join(bad) + suspects
    kind = r["kind"]
    if kind == "train":
        return (
            f"{res['train_images']} images, train loss {res['train_loss']:.4f}, resumed bit for bit "
            f"(straight / cut / resumed {res['seconds']['straight']:.0f} / "
            f"{res['seconds']['cut']:.0f} / {res['seconds']['resumed']:.0f} s)"
        )
    if kind == "flips":
        return "; ".join(
            f"{x['method']}: {x['batches']} batches, flips {x['flips_per_batch']}, same in every mode"
            for x in res["rows"]
        )
    if kind == "ddp":
        return f"{res['ranks']} ranks, {res['backend']}, SyncBatchNorm {res['sync_batchnorm']}"
    if kind == "nccl":
        return f"{res['backend']}, world size {res['world_size']}, DDP flips as the bare model"
    if kind == "speed":
        return "; ".join(
            f"{x['method']} {x['mode']}{' bf16' if x['autocast'] else ''}"
            f"{' compiled' if x['compile'] else ''} T={x['T']}: {x['samples_per_s']:.0f} samples/s"
            for x in res["rows"]
        )
    if kind == "fig4":
        return "; ".join(
            f"{x['method']}: {x['activation_peak_bytes'] / 1e6:.1f} MB activations"
            for x in res["points"]
        )
    if kind == "roofline":
        return "; ".join(
            f"b{x['batch']} T={x['T']} {x['mode']}: share {x['conv_share']:.2f}"
            for x in res["rows"]
        )
    if kind == "loader":
        return "; ".join(f"{x['workers']} workers: {x['samples_per_s']:.0f}/s" for x in res["rows"])
    return ""


def _table(title: str, header: str, rows: list[tuple]) -> list[str]:
    """A titled Markdown table; nothing without rows."""
    if not rows:
        return []
    head = [title, "", f"| {header} |", "|" + "---|" * (header.count("|") + 1)]
    return ["", *head, *("| " + " | ".join(map(str, row)) + " |" for row in rows)]


def render(records: list[dict], items: list[Item]) -> str:
    """The Markdown report of the latest record of every item (device and versions named)."""
    latest = _latest(records)
    order = {i.name: n for n, i in enumerate(items)}
    latest.sort(key=lambda r: (order.get(r["item"], len(order)), r["env"]["device_name"]))
    lines = ["# GPU check (`make gpu-check`, scripts/bench/gpu_check.py)", ""]
    for env_line in dict.fromkeys(_env_line(r["env"]) for r in latest):
        lines.append(f"- {env_line}")
    lines += ["", "| item | status | s | result |", "|---|---|---|---|"]
    lines += [
        f"| {r['group']}. {r['item']} | {r['status']} | {r['seconds']:.0f} | {_summary(r)} |"
        for r in latest
    ]
    ok = [r for r in latest if r["status"] in ("ok", "failed")]

    def rows_of(kind: str, key: str) -> list[dict]:
        return [x for r in ok if r["kind"] == kind for x in r["result"][key]]

    lines += _table(
        "Training speed (channels_last + cudnn.benchmark on CUDA; peak = CUDA allocated):",
        "method | mode | T | batch | autocast | compile | samples/s | ms per time step | peak MB",
        [
            (x["method"], x["mode"], x["T"], x["batch"], "bf16" if x["autocast"] else "off")
            + (x["compile"], f"{x['samples_per_s']:.1f}", f"{x['ms_per_time_step']:.2f}")
            + (_mb(x["peak_cuda_allocated_mb"]),)
            for x in rows_of("speed", "rows")
        ],
    )
    lines += _table(
        "Figure 4 (BSO/T-BSO lean, as trained; peak: CUDA allocated, or RSS on a CPU):",
        "method | T | batch | activation MB | peak MB",
        [
            (x["method"], x["T"], x["batch"], f"{x['activation_peak_bytes'] / 1e6:.1f}")
            + (_mb(x.get("cuda_peak_allocated_bytes", x.get("peak_rss_bytes", 0)) / 1e6),)
            for x in sorted(rows_of("fig4", "points"), key=lambda x: (x["method"], x["T"]))
        ],
    )
    lines += _table(
        "Roofline (T-BSO; iteration against its convolutions alone):",
        "batch | T | mode | iteration ms | conv ms | conv share | x plain | same flips",
        [
            (x["batch"], x["T"], x["mode"], f"{x['iteration_ms']:.1f}", f"{x['conv_ms']:.1f}")
            + (f"{x['conv_share']:.3f}", f"{x.get('over_plain', 1):.3f}")
            + (x["same_flips_as_other_modes"],)
            for x in rows_of("roofline", "rows")
        ],
    )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
