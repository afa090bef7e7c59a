"""Training memory against the number of time steps (the paper's Figure 4): BPTT with latent weights
against online BSO and T-BSO, VGG-11 on CIFAR-shaped input. Synthetic tensors: data do not change
memory. Each (method, T) point runs in a fresh process.

    python scripts/bench/memory_vs_T.py                          # T = 1 2 4 8 16 35
    python scripts/bench/memory_vs_T.py --T 1 2 --layers 8C3-AP2-16C3 --batch 4 --out /tmp/fig4
    python scripts/bench/memory_vs_T.py --plain --methods bso tbso  # BSO/T-BSO in the plain mode
    python scripts/bench/memory_vs_T.py --dataset shd            # long T on the SHD shape (below)

``--dataset shd``: the SHD shape at long T, where BPTT's memory grows with every time bin: the
spiking MLP 700-512-512-512-20 (mlp_shd), a new frame of 700 spike counts at every step, batch 32,
T = 25 50 100 200 -> benchmarks/results/memory_vs_T_shd.*.

BSO/T-BSO run as training runs them by default: in the lean mode (engine.lean: packed 1-bit weights,
the flip inside backward, the fused BatchNorm + LIF + pool step); ``--plain`` measures the plain mode
(float32 +-1 weights with a stored gradient each).

Per point: peak bytes of autograd's saved tensors (activation memory, CPU and GPU alike), persistent
state by role (bso.metrics.memory.persistent_state_bytes), and peak process RSS (CPU) or peak
CUDA allocated/reserved bytes after a warm-up batch. Writes <out>.json, <out>.csv and <out>.png.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

from _common import METHODS, ROOT, build_method, device_meta, input_batch

from bso import paper
from bso.distributed import resolve_device
from bso.metrics.memory import PERSISTENT_ROLES

# per --dataset: default T values, layers (VGG layer list / MLP hidden widths), batch on CPU / CUDA,
# output, and the figure's title
DEFAULTS = {
    "cifar10": dict(
        T=[1, 2, 4, 8, 16, 35],
        layers="64C3-128C3-AP2-256C3-256C3-AP2-512C3-512C3-AP2-512C3-512C3",
        batch=(16, 128),
        out="memory_vs_T",
        title="VGG-11, CIFAR-shaped input",
    ),
    "shd": dict(
        T=[25, 50, 100, 200],
        layers="512-512-512",
        batch=(32, 32),
        out="memory_vs_T_shd",
        title="spiking MLP 700-{layers}-20, SHD-shaped input (a frame of 700 channels per step)",
    ),
}


def measure(
    method: str, T: int, batch: int, layers: str, device_name: str, lean=True, dataset="cifar10"
) -> dict:
    """One point, in this process."""
    import torch

    from bso.metrics.memory import (
        SavedTensorMeter,
        cuda_peak_bytes,
        current_rss_bytes,
        peak_rss_bytes,
        persistent_state_bytes,
        reset_cuda_peak,
    )

    device = torch.device(device_name)
    rss_before = current_rss_bytes()  # the interpreter and libraries, before any model or data
    model, engine, optimizer = build_method(method, T, layers, device, lean=lean, dataset=dataset)
    x, y = input_batch(dataset, batch, T, device)

    engine.train_batch(model, optimizer, x, y)  # warm-up: optimizer state, allocator caches
    reset_cuda_peak(device)
    with SavedTensorMeter() as meter:
        engine.train_batch(model, optimizer, x, y)
    point = {
        "method": method,
        "T": T,
        "batch": batch,
        "lean": bool(getattr(engine, "lean_on", False)),
        "device": str(device),
        "activation_peak_bytes": meter.peak_bytes,
        "persistent": persistent_state_bytes(model, optimizer),
    }
    if device.type == "cuda":
        peak = cuda_peak_bytes(device)
        point["cuda_peak_allocated_bytes"] = peak["allocated"]
        point["cuda_peak_reserved_bytes"] = peak["reserved"]
    else:
        point["peak_rss_bytes"] = peak_rss_bytes()
        point["training_rss_bytes"] = point["peak_rss_bytes"] - rss_before
    return point


def accounted_bytes(p: dict) -> float:
    """Tensor-level training memory: persistent state (weights, gradients, optimizer state,
    buffers) plus the activation peak. Deterministic on any device, unlike process RSS."""
    held = [r for r in PERSISTENT_ROLES if r != "binary_weights_1bit"]
    persistent = sum(p["persistent"].get(r, 0) for r in held)  # a role not listed: none held
    return persistent + p["activation_peak_bytes"]


def total_bytes(p: dict) -> float:
    if "cuda_peak_allocated_bytes" in p:
        return p["cuda_peak_allocated_bytes"]
    return p["training_rss_bytes"]


# T-BSO dashed, with squares: where it overlaps BSO (the online methods' flat lines) both show
STYLES = {"bptt_latent": "o-", "bso": "o-", "tbso": "s--"}


def plot(points: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for method in METHODS:
        pts = sorted((p for p in points if p["method"] == method), key=lambda p: p["T"])
        if not pts:
            continue
        Ts = [p["T"] for p in pts]
        series = (
            [total_bytes(p) for p in pts],
            [accounted_bytes(p) for p in pts],
            [p["activation_peak_bytes"] for p in pts],
        )
        for ax, values in zip(axes, series, strict=True):
            ax.plot(Ts, [v / 1e9 for v in values], STYLES[method], label=paper.FIG4_METHODS[method])
    kind = (
        "peak CUDA allocated"
        if "cuda_peak_allocated_bytes" in points[0]
        else "peak RSS above the interpreter's"
    )
    axes[0].set_title(f"Training memory ({kind})")
    axes[1].set_title("Accounted: persistent state + activation peak")
    axes[2].set_title("Activation memory (autograd saved tensors)")
    for ax in axes:
        ax.set_xlabel("time steps T")
        ax.set_ylabel("GB")
        ax.grid(alpha=0.3)
        ax.legend()
    lean = ", BSO/T-BSO in the lean mode" if any(p.get("lean") for p in points) else ""
    fig.suptitle(f"{title}, batch {points[0]['batch']}, {points[0]['device']}{lean}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--dataset",
        default="cifar10",
        choices=sorted(DEFAULTS),
        help="cifar10: VGG-11 (Figure 4); shd: the SHD shape at long T (the spiking MLP)",
    )
    parser.add_argument(
        "--T", type=int, nargs="+", help="cifar10: 1 2 4 8 16 35; shd: 25 50 100 200"
    )
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--batch", type=int, help="cifar10: 128 on CUDA, 16 on CPU; shd: 32")
    parser.add_argument("--layers", help="VGG layer list (cifar10) / MLP hidden widths (shd)")
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--plain",
        action="store_true",
        help="BSO/T-BSO in the plain mode (engine.lean=false); default: the lean mode, as trained",
    )
    parser.add_argument(
        "--out", type=Path, help="cifar10: benchmarks/results/memory_vs_T; shd: .../memory_vs_T_shd"
    )
    parser.add_argument("--single", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--from-json",
        action="store_true",
        help="re-write the CSV and plot from <out>.json without measuring",
    )
    args = parser.parse_args()

    args.device = str(resolve_device(args.device))
    defaults = DEFAULTS[args.dataset]
    batch = args.batch or defaults["batch"][args.device.startswith("cuda")]
    args.T = args.T or defaults["T"]
    args.layers = args.layers or defaults["layers"]
    args.out = args.out or ROOT / "benchmarks/results" / defaults["out"]
    if args.single:  # child process: one point, JSON on stdout
        point = measure(
            args.methods[0],
            args.T[0],
            batch,
            args.layers,
            args.device,
            not args.plain,
            args.dataset,
        )
        print(json.dumps(point))
        return

    if args.from_json:
        saved = json.loads(args.out.with_suffix(".json").read_text())
        return write_outputs(saved["points"], saved["meta"], args.out)
    points = []
    for method in args.methods:
        for T in args.T:
            cmd = [
                sys.executable,
                __file__,
                "--single",
                "--methods",
                method,
                "--T",
                str(T),
                "--batch",
                str(batch),
                "--layers",
                args.layers,
                "--device",
                args.device,
                "--dataset",
                args.dataset,
                *(["--plain"] if args.plain else []),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if proc.returncode != 0:
                raise RuntimeError(f"{method} T={T} failed:\n{proc.stderr[-3000:]}")
            point = json.loads(proc.stdout.strip().splitlines()[-1])
            points.append(point)
            print(
                f"{method:12s} T={T:3d}  activation {point['activation_peak_bytes'] / 1e6:9.1f} MB  "
                f"accounted {accounted_bytes(point) / 1e6:9.1f} MB  "
                f"measured total {total_bytes(point) / 1e6:9.1f} MB",
                flush=True,
            )
    meta = {
        **device_meta(resolve_device(args.device)),
        "batch": batch,
        "layers": args.layers,
        "lean": not args.plain,
    }
    if args.dataset == "cifar10":
        meta["paper_gb"] = paper.fig4_paper_gb()  # Figure 4's points (bso.paper.FIG4)
    else:
        meta["dataset"] = args.dataset
    write_outputs(points, meta, args.out)


def write_outputs(points: list[dict], meta: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "points": points}, indent=2))
    with out.with_suffix(".csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "method",
                "T",
                "batch",
                "activation_peak_mb",
                "accounted_mb",
                "total_peak_mb",
                "weights_b_per_binary_weight",
                "grads_b_per_binary_weight",
                "optimizer_state_b_per_binary_weight",
            ]
        )
        for p in points:
            per = p["persistent"]["per_binary_weight"]
            w.writerow(
                [
                    p["method"],
                    p["T"],
                    p["batch"],
                    round(p["activation_peak_bytes"] / 1e6, 3),
                    round(accounted_bytes(p) / 1e6, 1),
                    round(total_bytes(p) / 1e6, 1),
                    per["weights"],
                    per["gradients"],
                    round(per["optimizer_state"], 4),
                ]
            )
    dataset = meta.get("dataset", "cifar10")
    plot(points, out.with_suffix(".png"), DEFAULTS[dataset]["title"].format(layers=meta["layers"]))
    for method in METHODS:
        pts = sorted((p for p in points if p["method"] == method), key=lambda p: p["T"])
        if len(pts) > 1:
            a = pts[-1]["activation_peak_bytes"] / max(pts[0]["activation_peak_bytes"], 1)
            c = accounted_bytes(pts[-1]) / accounted_bytes(pts[0])
            t = total_bytes(pts[-1]) / total_bytes(pts[0])
            print(
                f"{method}: T={pts[-1]['T']} / T={pts[0]['T']}: activation x{a:.2f}, "
                f"accounted x{c:.2f}, measured total x{t:.2f}"
            )
    print(f"wrote {out}.json / .csv / .png")


if __name__ == "__main__":
    main()
