"""What the benchmark scripts share: the three methods of Figure 4 and the result files."""

from __future__ import annotations

import json
import platform
import sys
import time
from functools import partial
from pathlib import Path

import torch

from bso import fastpath, paper
from bso.compiled import fuse_elementwise as fuse
from bso.engine import BPTTEngine, OnlineEngine
from bso.env import distributions, lock_state, nvidia_driver
from bso.layers import named_binary_parameters
from bso.models import SpikingMLP, SpikingVGG
from bso.optim import BSO, TBSO, PlainOptimizer, build_router

ROOT = Path(__file__).resolve().parents[2]
METHODS = tuple(paper.FIG4_METHODS)  # bptt_latent, bso, tbso
# The input shapes the benchmarks build their models for: one time step's sample and the classes.
# cifar10: a static image (the same at every step); shd: 700 channels, a new frame at every step.
SHAPES = {"cifar10": ((3, 32, 32), 10), "shd": ((700,), 20)}


def input_batch(dataset: str, batch: int, T: int, device: torch.device):
    """Synthetic ``(x, y)`` of ``dataset``'s shape (:data:`SHAPES`): a CIFAR-shaped image batch
    ``[batch, 3, 32, 32]``, or SHD-shaped spike counts ``[batch, T, 700]`` (Poisson, mean 0.05)."""
    shape, classes = SHAPES[dataset]
    if dataset == "shd":
        x = torch.poisson(torch.full((batch, T, *shape), 0.05, device=device))
    else:
        x = torch.randn(batch, *shape, device=device)
    return x, torch.randint(0, classes, (batch,), device=device)


def build_method(
    method: str,
    T: int,
    layers: str,
    device: torch.device,
    lean: bool = False,
    recompute_binary_convs: bool = False,
    fuse_elementwise: bool = False,
    dataset: str = "cifar10",
):
    """VGG (CIFAR-shaped, 10 classes; ``layers`` its layer list) or, with ``dataset="shd"``, the
    spiking MLP (700 channels, 20 classes; ``layers`` its hidden widths, e.g. "512-512-512"),
    engine and optimizer of one Figure 4 method, in the paper
    recipe's float order (``float_order="release"``, as configs/optimizer/{bso,tbso}.yaml); ``lean``
    puts the online methods in the lean mode (engine.lean: packed weights, flip inside backward),
    optionally recomputing the binary convs' outputs in backward (engine.recompute_binary_convs);
    ``fuse_elementwise`` compiles their LIF steps (fast.fuse_elementwise, bso.compiled)."""
    torch.manual_seed(0)
    weights = "latent" if method == "bptt_latent" else "binary"
    neuron = {"float_order": "release"}
    (channels, *_), classes = SHAPES[dataset]
    net = SpikingMLP if dataset == "shd" else SpikingVGG
    model = net(layers, in_channels=channels, num_classes=classes, weights=weights, neuron=neuron)
    model = model.to(device)
    if method == "bptt_latent":  # BPTT, latent weights, Adam
        engine = BPTTEngine(T=T)
        optimizer = PlainOptimizer(
            torch.optim.Adam(model.parameters(), lr=1e-3), named_binary_parameters(model, "latent")
        )
    else:  # online, stored +-1 weights, a flip per time step
        engine = OnlineEngine(
            T=T,
            trace="ndot",
            update="per_step",
            lean=lean,
            recompute_binary_convs=recompute_binary_convs,
        )
        binary = partial(BSO) if method == "bso" else partial(TBSO, num_steps=T)
    engine.prepare(model)  # before the optimizer: the lean mode replaces the binary weights
    if fuse_elementwise:
        fuse(model)
    if method != "bptt_latent":
        optimizer = build_router(model, binary, partial(torch.optim.SGD, lr=0.1))
    model.train()
    return model, engine, optimizer


MODES = ("lean", "plain", "lean_fused", "plain_fused")  # engine.lean x fast.fuse_elementwise


def build_mode(method: str, T: int, layers: str, device: torch.device, mode: str):
    """:func:`build_method` for one of :data:`MODES`: "lean" / "plain" (engine.lean=true / false),
    "_fused" with fast.fuse_elementwise=true."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {MODES}")
    lean, fuse = mode.startswith("lean"), mode.endswith("_fused")
    return build_method(method, T, layers, device, lean=lean, fuse_elementwise=fuse)


def add_modes_flag(parser, default=MODES) -> None:
    parser.add_argument(
        "--modes",
        nargs="+",
        default=list(default),
        choices=MODES,
        help="lean / plain: engine.lean; _fused: fast.fuse_elementwise=true",
    )


def add_host_memory_flag(parser) -> None:
    parser.add_argument(
        "--reuse-host-memory",
        action="store_true",
        help="keep freed host memory in the process (train.py: fast.reuse_host_memory=true)",
    )


def apply_host_memory(args) -> bool:
    """fast.reuse_host_memory=true with ``--reuse-host-memory``; whether it applied."""
    if args.reuse_host_memory:
        fastpath.reuse_host_memory()
    return bool(args.reuse_host_memory)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_batch(engine, model, optimizer, x, y, device: torch.device) -> float:
    """Seconds of one ``engine.train_batch``, the device synchronised before and after."""
    sync(device)
    start = time.perf_counter()
    engine.train_batch(model, optimizer, x, y)
    sync(device)
    return time.perf_counter() - start


def require_cuda(name: str, allow_cpu: bool, command: str, otherwise: str) -> torch.device:
    """The device ``name`` of a CUDA benchmark; without CUDA (or for a non-CUDA ``name``) one
    ``error:`` line and exit, before anything is written, unless ``allow_cpu``."""
    device = torch.device(name)
    if not allow_cpu:
        if not torch.cuda.is_available():
            sys.exit(
                f"error: {command} measures CUDA training and needs a GPU, but "
                f"torch.cuda.is_available() is False here (torch {torch.__version__}); nothing "
                f"was written. Run it on a CUDA machine, or {otherwise}."
            )
        if device.type != "cuda":
            sys.exit(f"error: --device must be a CUDA device, got {name!r} (or pass --allow-cpu)")
    return device


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what the platform module knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_meta(device: torch.device) -> dict:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    return {"device": str(device), "device_name": name, "threads": torch.get_num_threads()}


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def environment(device: torch.device) -> dict:
    """:func:`device_meta` plus what a GPU number depends on: the driver, the CUDA runtime torch was
    built with, cuDNN, torch, Triton, spikingjelly and Python versions, the lock file's hash and
    whether this environment matches it (:mod:`bso.env`); on CUDA the compute capability and memory
    of the device."""
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    lock = lock_state(distributions())
    meta = {
        **device_meta(device),
        "cpu": cpu_name(),
        "driver": nvidia_driver() if device.type == "cuda" else None,
        "cuda": torch.version.cuda,
        "cudnn": cudnn,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "spikingjelly": _version("spikingjelly"),
        "python": platform.python_version(),
        "lock_sha256": lock["sha256"],
        "lock_matches": lock["matches"],
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        meta["compute_capability"] = f"{props.major}.{props.minor}"
        meta["device_memory_gb"] = round(props.total_memory / 2**30, 1)
    return meta


def write_results(out: Path, meta: dict, rows: list[dict], markdown: list[str]) -> None:
    """<out>.json (meta + rows) and <out>.md (the table); prints the table."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    out.with_suffix(".md").write_text("\n".join(markdown) + "\n")
    print("\n".join(markdown))
