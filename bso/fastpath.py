"""The fast path: switches that make a run faster (``fast.*`` in configs/fast/default.yaml).

=================  =======  =====================================================================
key                default  what it does
=================  =======  =====================================================================
channels_last      true     CUDA: weights (and so activations) in NHWC layout, cuDNN's fast path.
                            CPU: no-op.
cudnn_benchmark    true     CUDA: cuDNN times its algorithms once per shape and keeps the fastest.
                            CPU: no-op.
autocast           false    bf16 autocast of the per-step forward; the output is cast back to
                            float32, so the loss, the readout, the gradients handed to BSO/T-BSO
                            and the flip rule's statistics stay float32 (the traced layers'
                            weight gradients are computed in float32). Changes results: off by
                            default. Works on CPU too (slow there).
compile            false    ``torch.compile`` of the per-step forward (the model's ``forward``; the
                            online engine calls it T times per batch). CUDA only: refused on CPU.
reuse_host_memory  false    Freed host memory stays in the process for the next tensors (glibc's
                            malloc options, :func:`reuse_host_memory`): faster with large
                            activations, a higher resident peak. Linux (glibc) only.
=================  =======  =====================================================================

Pinned host memory and loader workers are ``dataset.pin_memory`` / ``dataset.num_workers`` (pinning
only happens when CUDA is available). The two layout/algorithm switches change no method: on CUDA
they only change which kernels run (floating-point summation order, as any cuDNN algorithm choice).
With every switch at its default a CPU run executes exactly the code it executes without the fast
path (tests/test_fastpath.py); the host-memory switch changes where tensors are allocated, no value.
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn

KEYS = (
    "channels_last",
    "cudnn_benchmark",
    "autocast",
    "compile",
    "reuse_host_memory",
)


class AutocastForward(nn.Module):
    """``module``'s forward under bf16 autocast, its output returned as float32."""

    def __init__(self, module: nn.Module, device_type: str, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.module, self.device_type, self.dtype = module, device_type, dtype

    def forward(self, *args, **kwargs):
        with torch.autocast(self.device_type, dtype=self.dtype):
            out = self.module(*args, **kwargs)
        return out.float()


def check(cfg, device: torch.device) -> None:
    """Refuse unknown keys and what this device cannot do, before any data is read."""
    unknown = sorted(set(cfg) - set(KEYS))
    if unknown:
        raise ValueError(
            f"unknown fast.* keys {unknown}; the fast path has {list(KEYS)} (how the LIF step and "
            "the optimizer run is the top-level backend=release|fast|fused)"
        )
    for key in KEYS:
        if not isinstance(cfg.get(key, False), bool):
            raise ValueError(f"fast.{key} must be true or false, got {cfg.get(key)!r}")
    if cfg.get("reuse_host_memory") and glibc_mallopt() is None:
        raise ValueError(
            "fast.reuse_host_memory=true sets glibc's malloc options, but this C library is not "
            "glibc (macOS, musl); leave fast.reuse_host_memory=false"
        )
    if cfg.get("compile") and device.type != "cuda":
        raise ValueError(
            "fast.compile=true compiles the per-step forward for a CUDA device, but this run is on "
            f"{device}; leave fast.compile=false on CPU"
        )
    if cfg.get("autocast") and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(
            f"fast.autocast=true runs the forward in bfloat16, which {torch.cuda.get_device_name(device)} "
            "does not support; leave fast.autocast=false"
        )


def apply(model: nn.Module, cfg, device: torch.device) -> nn.Module:
    """Apply the switches to ``model`` (already on ``device``); returns the module to train with:
    ``model`` itself unless autocast wraps it. Checkpoints and evaluation keep using ``model``'s
    parameters, which are never copied."""
    check(cfg, device)
    if cfg.get("reuse_host_memory"):
        reuse_host_memory()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = bool(cfg.get("cudnn_benchmark"))
        if cfg.get("channels_last"):
            model.to(memory_format=torch.channels_last)
    if cfg.get("compile"):
        model.compile()  # in place: the module's __call__ goes through torch.compile
    if cfg.get("autocast"):
        return AutocastForward(model, device.type)
    return model


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)


def glibc_mallopt():
    """glibc's ``mallopt``, or None under another C library (macOS, musl)."""
    try:
        return ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return None


def reuse_host_memory() -> None:
    """Keep freed host memory in this process for the next tensors (``fast.reuse_host_memory``).

    glibc serves each block over 32 MiB (and, adaptively, smaller ones) with a fresh ``mmap`` and
    gives it back on free, and trims the heap's free top: every large tensor then costs page faults
    and a kernel-zeroed page per 4 KiB, a hidden pass over memory as long as the tensor. A training
    step allocates and frees the same sizes again and again, so this turns both off (``mallopt``:
    ``M_MMAP_MAX = 0``, ``M_TRIM_THRESHOLD`` at its maximum). No value changes; the price is memory:
    the resident size no longer shrinks between steps, and blocks freed in the middle of the heap
    are reused only by blocks that fit (docs/speed.md)."""
    mallopt = glibc_mallopt()
    if mallopt is None or not (mallopt(M_MMAP_MAX, 0) and mallopt(M_TRIM_THRESHOLD, 2**31 - 1)):
        raise RuntimeError("glibc's mallopt refused fast.reuse_host_memory's settings")
