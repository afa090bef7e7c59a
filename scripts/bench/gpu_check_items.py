"""The GPU check's items (scripts/bench/gpu_check.py): what each one runs, in a child process of
its own, and what it checks. ``KINDS`` maps an item's kind to its function ``(params, device, work)
-> (result, checks)``; ``child`` runs one and writes its outcome."""

from __future__ import annotations

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
import time
import traceback
import warnings
from pathlib import Path

import torch
from _common import METHODS, ROOT, build_mode, environment

DETERMINISTIC_CUBLAS = ":4096:8"  # CUBLAS_WORKSPACE_CONFIG for deterministic cuBLAS


def load_records(path: Path) -> list[dict]:
    """The records of a JSON-lines file (a run's metrics, the check's results); none if absent."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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
    rec_a, rec_b = load_records(straight / "metrics.jsonl"), load_records(cut / "metrics.jsonl")
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
    records = load_records(run_dir / "metrics.jsonl")
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
