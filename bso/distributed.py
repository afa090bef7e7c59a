"""Data-parallel training over several processes (torchrun), in the spirit of nanoGPT's train.py.

``torchrun --nproc_per_node=N train.py ...`` sets ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``; without
them the run is one process and every helper here is a no-op, so the same entry point serves both.

* :func:`setup` initialises the process group once (NCCL on CUDA, gloo on CPU), picks this rank's
  device and returns a :class:`DistState` (rank, world size, device, ``is_main``) -- the one object the
  training run (and resume) needs to know about the other processes.
* :func:`wrap_model` converts BatchNorm to SyncBatchNorm on request and wraps the model in
  DistributedDataParallel. DDP all-reduces (averages) the gradients in ``backward``, so BSO/T-BSO's
  flip rule runs on the same averaged gradient on every rank and every rank flips the same weights.
* :func:`grad_sync`: the engines turn gradient sync off for all but the last backward of a batch when
  they step once per batch (``engine.update=accumulate``, BPTT) -- nanoGPT's
  ``require_backward_grad_sync``.
* :func:`average_over_ranks_`: the mean of a gradient DDP's reducer does not see -- the lean mode's
  packed +-1 weights (bso.lean) need no gradient, so they are not DDP's parameters, and their
  gradient exists only inside backward, where BSO / T-BSO flips them.
* :func:`all_reduce_sum` / :func:`all_reduce_max`: epoch totals across ranks.
* :func:`run_dir_for_rank`: the OmegaConf resolver ``bso_rank_dir`` that sends Hydra's per-process
  run directory of ranks > 0 to the temp directory (removed by :func:`cleanup`); rank 0's run
  directory is broadcast with :func:`broadcast_object`, and only rank 0 writes into it.

DDP and the spiking neurons: a model's forward is called T times per batch. The neurons' membrane
potentials and traces are spikingjelly *memories*, not buffers, so DDP never overwrites one rank's
state with another's. BatchNorm running statistics are buffers: DDP's ``broadcast_buffers`` would
copy rank 0's at each of the T forwards; we switch it off (training uses batch statistics, not the
running ones) and average the running statistics across ranks before evaluation and checkpointing
(:func:`average_buffers`). With ``distributed.sync_batchnorm=true`` the batch statistics themselves
are computed over all ranks' samples.
"""

from __future__ import annotations

import datetime
import inspect
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Sampler

BACKENDS = ("auto", "nccl", "gloo")
TORCHRUN_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE")


@dataclass
class DistState:
    """Where this process stands: rank, world size, device. ``world_size == 1``: not distributed."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None
    temp_dirs: list[Path] = field(default_factory=list)  # ranks > 0: Hydra's throwaway run dir

    def __str__(self) -> str:
        if not self.enabled:
            return f"1 process on {self.device}"
        return f"rank {self.rank} of {self.world_size} ({self.backend}, {self.device})"

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes the run directory, checkpoints and wandb."""
        return self.rank == 0


def torchrun_env() -> dict[str, int] | None:
    """``{"rank", "local_rank", "world_size"}`` when launched by torchrun (or any launcher that sets
    the same variables), else None."""
    present = [k for k in TORCHRUN_ENV if k in os.environ]
    if not present:
        return None
    if len(present) != len(TORCHRUN_ENV):
        missing = sorted(set(TORCHRUN_ENV) - set(present))
        raise RuntimeError(
            f"found {present} in the environment but not {missing}: launch several processes with "
            "`torchrun --nproc_per_node=N train.py ...`, or unset them for one process"
        )
    return {
        "rank": int(os.environ["RANK"]),
        "local_rank": int(os.environ["LOCAL_RANK"]),
        "world_size": int(os.environ["WORLD_SIZE"]),
    }


def export_slurm_env() -> bool:
    """Inside a submitit Slurm job with several tasks (``hydra/launcher=slurm
    hydra.launcher.gpus_per_node=N``: one task per GPU), set torchrun's variables from Slurm's
    (submitit's ``TorchDistributedEnvironment``: rank, world size, local rank, master address and
    port). Returns whether it did; torchrun's own variables always win."""
    if os.environ.get("SUBMITIT_EXECUTOR") != "slurm" or int(os.environ.get("SLURM_NTASKS", 1)) < 2:
        return False
    if any(key in os.environ for key in TORCHRUN_ENV):
        return False
    from submitit.helpers import TorchDistributedEnvironment

    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    return True


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto``: this rank's GPU when CUDA is available, else the CPU. ``cuda`` under torchrun means
    ``cuda:<LOCAL_RANK>``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device={name!r} but CUDA is not available here; use device=cpu or auto"
            )
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


def setup(device: str = "auto", backend: str = "auto", timeout_min: float = 30) -> DistState:
    """Initialise the process group once when launched by torchrun; return this rank's state."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown distributed.backend={backend!r}; choose one of {BACKENDS}")
    export_slurm_env()  # a multi-task Slurm job (hydra/launcher=slurm) looks like torchrun from here
    env = torchrun_env()
    if env is None or env["world_size"] == 1:
        if backend != "auto":
            raise ValueError(
                f"distributed.backend={backend} applies to runs launched with torchrun, but this "
                "run is one process; leave distributed.backend=auto or use `torchrun "
                "--nproc_per_node=N train.py ...`"
            )
        return DistState(device=resolve_device(device))
    state = DistState(
        rank=env["rank"],
        world_size=env["world_size"],
        local_rank=env["local_rank"],
        device=resolve_device(device, env["local_rank"]),
    )
    if backend == "auto":
        backend = "nccl" if state.device.type == "cuda" else "gloo"
    if backend == "nccl" and state.device.type != "cuda":
        raise ValueError("distributed.backend=nccl needs CUDA devices; use gloo (or auto) on CPU")
    if state.device.type == "cuda":
        torch.cuda.set_device(state.device)
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            timeout=datetime.timedelta(minutes=timeout_min),
            **({"device_id": state.device} if backend == "nccl" else {}),
        )
    state.backend = backend
    if not state.is_main:  # ranks > 0 log nothing but errors
        logging.getLogger().setLevel(logging.ERROR)
    return state


def cleanup(state: DistState, barrier: bool = True) -> None:
    """Wait for every rank (``barrier=False`` after an error: the others may never arrive), destroy
    the process group, remove this rank's throwaway Hydra run directory."""
    if state.enabled and dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()
    for path in state.temp_dirs:
        shutil.rmtree(path, ignore_errors=True)


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main() -> bool:
    """True on rank 0 and in a single process."""
    return not _initialized() or dist.get_rank() == 0


def _reduce(tensor: torch.Tensor, op) -> torch.Tensor:
    if not _initialized():
        return tensor
    out = tensor.clone()
    if dist.get_backend() == "gloo" and out.device.type != "cpu":  # gloo reduces CPU tensors
        host = out.cpu()
        dist.all_reduce(host, op=op)
        return host.to(out.device)
    dist.all_reduce(out, op=op)
    return out


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (a copy); the tensor itself in one process."""
    return _reduce(tensor, dist.ReduceOp.SUM)


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Maximum over ranks (a copy); the tensor itself in one process."""
    return _reduce(tensor, dist.ReduceOp.MAX)


def max_over_ranks(value: float) -> float:
    """The largest ``value`` of all ranks (memory); ``value`` in one process."""
    if not _initialized():
        return value
    return float(all_reduce_max(torch.tensor(float(value), dtype=torch.float64)))


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank (any picklable object)."""
    if not _initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj) -> list:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` in one process)."""
    if not _initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def wrap_model(model: nn.Module, state: DistState, sync_batchnorm: bool = False) -> nn.Module:
    """DDP around ``model`` (already on ``state.device``); the model itself in one process.

    Parameters and buffers are broadcast from rank 0 at construction, so every rank starts from the
    same +-1 weights. ``broadcast_buffers=False``: see the module docstring."""
    if sync_batchnorm and not state.enabled:
        raise ValueError(
            "distributed.sync_batchnorm=true synchronises BatchNorm across processes, but this run "
            "is one process; launch it with `torchrun --nproc_per_node=N train.py ...` or leave "
            "distributed.sync_batchnorm=false"
        )
    if sync_batchnorm and state.device.type != "cuda":
        raise ValueError(
            "distributed.sync_batchnorm=true: PyTorch's SyncBatchNorm runs on CUDA devices only, "
            f"but this run is on {state.device}; leave distributed.sync_batchnorm=false on CPU"
        )
    if not state.enabled:
        return model
    if sync_batchnorm:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    # no buffer broadcast at each of the T forwards (newer PyTorch names it forward_sync_buffers)
    no_forward_sync = (
        {"forward_sync_buffers": False}
        if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
        else {"broadcast_buffers": False}
    )
    return DistributedDataParallel(
        model,
        device_ids=[state.device.index] if state.device.type == "cuda" else None,
        **no_forward_sync,
    )


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP (for evaluation, checkpoints, the 1-bit export, model size)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def grad_sync(model: nn.Module, enabled: bool) -> None:
    """Whether the next forward's backward all-reduces the gradients (nanoGPT's
    ``require_backward_grad_sync``; DDP reads it at forward time). No-op outside DDP."""
    if isinstance(model, DistributedDataParallel):
        model.require_backward_grad_sync = enabled


def average_over_ranks_(tensor: torch.Tensor) -> torch.Tensor:
    """In place: ``tensor`` <- its mean over the ranks (all_reduce, then / world size), so that every
    rank flips the same weights from it; nothing without a process group. Returns ``tensor``."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
        tensor /= dist.get_world_size()
    return tensor


@torch.no_grad()
def average_buffers(model: nn.Module) -> None:
    """Average floating-point buffers (BatchNorm running mean/var) over ranks, in place."""
    if not _initialized():
        return
    for buf in unwrap(model).buffers():
        if buf.is_floating_point():
            buf.copy_(all_reduce_sum(buf) / dist.get_world_size())


class ShardSampler(Sampler[int]):
    """Evaluation shard: indices ``rank, rank + world_size, ...`` in order, without padding, so that
    the shards together hold every test sample exactly once (DistributedSampler pads with repeats)."""

    def __init__(self, dataset_size: int, rank: int, world_size: int):
        self.indices = range(rank, dataset_size, world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


# --- Hydra's run directory under torchrun ---------------------------------------------------------


def run_dir_for_rank(run_dir: str) -> str:
    """OmegaConf resolver ``bso_rank_dir``: ``hydra.run.dir: ${bso_rank_dir:<dir>}``.

    Hydra computes and creates its run directory in every process before ``train()`` runs. Rank 0
    (and a plain single-process run) keeps ``<dir>``; a rank > 0 of torchrun gets a throwaway
    directory under the system temp dir, which :func:`cleanup` deletes at the end, so that one run
    leaves one run directory. The ranks then agree on rank 0's directory by broadcast."""
    env = torchrun_env()
    if env is None or env["rank"] == 0:
        return run_dir
    return str(Path(tempfile.gettempdir()) / f"bso-rank{env['rank']}-pid{os.getpid()}")


def agree_on_run_dir(state: DistState, run_dir: Path) -> Path:
    """Every rank gets rank 0's run directory; a rank > 0 remembers its own throwaway one."""
    if not state.enabled:
        return run_dir
    main_dir = Path(broadcast_object(str(run_dir)))
    if not state.is_main and run_dir.resolve() != main_dir.resolve():
        own = Path(run_dir_for_rank(str(main_dir)))  # the directory bso_rank_dir gave this rank
        if run_dir.resolve() == own.resolve():
            state.temp_dirs.append(run_dir)
    return main_dir
