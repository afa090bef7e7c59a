"""What the benchmark scripts share: the three methods of Figure 4, composed from configs/ as
``python train.py`` composes them, and the result files."""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import torch

from bso import fastpath, paper
from bso.compose import compose_config
from bso.env import distributions, lock_state, nvidia_driver
from bso.optim import build_optimizer
from bso.train import build_model

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


# The paper experiment each benchmark method trains (configs/experiment/<dataset>_<name>.yaml): the
# benchmarks compose it, as `python train.py experiment=...` does, and change only what they measure.
EXPERIMENTS = {"bptt_latent": "qsnn", "bso": "bso", "tbso": "tbso"}


def method_overrides(
    method: str,
    T: int,
    layers: str,
    lean: bool = False,
    recompute_binary_convs: bool = False,
    backend: str = "release",
    dataset: str = "cifar10",
) -> list[str]:
    """The ``train.py`` overrides of one Figure 4 method: ``experiment=<dataset>_<method's>`` at
    ``T`` time steps with the model's ``layers`` (VGG: its layer list; SHD's MLP: its hidden widths,
    e.g. "512-512-512"); for the online methods ``engine.lean`` (packed weights, flip inside
    backward), ``engine.recompute_binary_convs`` and the ``backend`` (release: the released code's
    float order; fast: fewer passes; fused: the release's values, compiled LIF steps)."""
    if dataset not in SHAPES:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {tuple(SHAPES)}")
    layers_key = "model.hidden" if dataset == "shd" else "model.layers"
    overrides = [f"experiment={dataset}_{EXPERIMENTS[method]}", f"engine.T={T}"]
    overrides.append(f"{layers_key}={layers}")
    if method != "bptt_latent":  # BPTT has one mode
        overrides += [
            f"engine.lean={lean}",
            f"engine.recompute_binary_convs={recompute_binary_convs}",
        ]
        overrides.append(f"backend={backend}")
    return overrides


def build_run(overrides: list[str], device: torch.device):
    """What ``python train.py <overrides>`` trains, built as it builds it (bso.compose,
    bso.train.build_model, build_optimizer): the model (seeded with 0, on ``device``, in training
    mode), the engine, the optimizer and the composed config. The fast path's layout and cuDNN
    switches (``cfg.fast``, bso.fastpath.apply) are the caller's to apply."""
    cfg = compose_config(*overrides)
    torch.manual_seed(0)
    model, engine = build_model(cfg, device)  # the backend applied to the neurons and pools
    optimizer = build_optimizer(model, cfg.optimizer, cfg.backend)
    model.train()
    return model, engine, optimizer, cfg


def dataset_config(name: str, **values):
    """``configs/dataset/<name>.yaml`` as ``python train.py dataset=<name>`` composes it, with
    ``values`` set (``root=...``, ``num_workers=...``)."""
    overrides = [f"dataset.{key}={value}" for key, value in values.items()]
    return compose_config(f"dataset={name}", *overrides).dataset


def build_method(method: str, T: int, layers: str, device: torch.device, **options):
    """Model, engine and optimizer of one Figure 4 method (``options``: :func:`method_overrides`)."""
    model, engine, optimizer, _ = build_run(method_overrides(method, T, layers, **options), device)
    return model, engine, optimizer


MODES = {  # mode: (engine.lean, backend)
    "lean": (True, "release"),
    "plain": (False, "release"),
    "lean_fused": (True, "fused"),
    "plain_fused": (False, "fused"),
}


def build_mode(method: str, T: int, layers: str, device: torch.device, mode: str):
    """:func:`build_method` in one of :data:`MODES` (BPTT-latent: its one mode, whatever ``mode``)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {tuple(MODES)}")
    lean, backend = MODES[mode]
    return build_method(method, T, layers, device, lean=lean, backend=backend)


def add_modes_flag(parser, default=tuple(MODES)) -> None:
    parser.add_argument(
        "--modes",
        nargs="+",
        default=list(default),
        choices=list(MODES),
        help="lean / plain: engine.lean=true / false; _fused: backend=fused",
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
