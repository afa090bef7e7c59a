"""Every private API of torch or spikingjelly that bso uses, in one place.

Each one is looked up when first needed. Where the installed version lacks it, bso takes the public
path instead -- the same values, only slower -- and says so once, in one warning line naming what is
missing; nothing else in bso reaches into a private module. ``python -m bso.env`` lists what this
machine has.

==========================================  ==================================================
private API                                 used for; the public path without it
==========================================  ==================================================
``torch._dynamo.config.recompile_limit``    more compiled variants per fused function
                                            (:mod:`bso.compiled`); without: torch's default
                                            limit, past which the function runs unfused
``torch.ops.aten._batch_norm_impl_index``   the lean mode's BatchNorm backward from the forward's
and its ``_backward``                       saved statistics (:mod:`bso.lean.batchnorm_lif`); without:
                                            BatchNorm re-run in backward by ``F.batch_norm``
``spikingjelly._ops.surrogate``             the lean mode's LIF input gradient on the CPU
``._surrogate_gradient, _surrogate_spec``   without re-running the step; without: the step
                                            re-run and differentiated through spikingjelly
``torch.utils._python_dispatch``            the benchmarks' operator counters
``.TorchDispatchMode``                      (scripts/bench); without: they refuse in one line
==========================================  ==================================================
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging

import torch

log = logging.getLogger(__name__)

_WARNED: set[str] = set()


@functools.cache
def private(path: str):
    """The object at the dotted ``path`` (a module, then attributes), or None where the installed
    version has no such thing. Looked up once per process: the lean mode asks at every step."""
    parts = path.split(".")
    for split in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        try:
            for name in parts[split:]:
                obj = getattr(obj, name)
        except (AttributeError, RuntimeError):  # torch.ops raises RuntimeError for unknown ops
            return None
        return obj
    return None


def warn_missing(path: str, fallback: str) -> None:
    """One warning line, once per process: ``path`` is missing, what bso does instead."""
    if path not in _WARNED:
        _WARNED.add(path)
        log.warning(
            "bso: %s is not in this torch %s / spikingjelly install; %s",
            path,
            torch.__version__,
            fallback,
        )


def raise_recompile_limit(limit: int) -> None:
    """Let ``torch.compile`` keep at least ``limit`` variants of one function (a sweep over
    thresholds in one process compiles one per value)."""
    config = private("torch._dynamo.config")
    if config is None or not hasattr(config, "recompile_limit"):
        warn_missing(
            "torch._dynamo.config.recompile_limit",
            "past torch's default number of compiled variants a fused function runs unfused "
            "(the same values, slower)",
        )
        return
    config.recompile_limit = max(config.recompile_limit, limit)


def _all_or_none(paths: list[str], fallback: str) -> tuple | None:
    """The objects at ``paths``, or None (after one warning naming the first path) where any is
    missing."""
    found = [private(path) for path in paths]
    if None in found:
        warn_missing(paths[0], fallback)
        return None
    return tuple(found)


def batch_norm_kernels():
    """(forward, backward): aten's ``_batch_norm_impl_index`` and its backward, the kernels
    ``F.batch_norm`` runs and differentiates; None where missing (after one warning)."""
    return _all_or_none(
        [f"torch.ops.aten._batch_norm_impl_index{s}" for s in ("", "_backward")],
        "the lean mode re-runs BatchNorm in backward (the same values, one more pass)",
    )


def spikingjelly_cpu_surrogate():
    """(surrogate_gradient, surrogate_spec): the function spikingjelly's CPU LIF step
    differentiates through, and how it names a surrogate; None where missing (after one warning)."""
    return _all_or_none(
        [f"spikingjelly._ops.surrogate._surrogate_{n}" for n in ("gradient", "spec")],
        "the lean mode re-runs the LIF step in backward (the same values, slower)",
    )


PRIVATE_APIS = (
    "torch._dynamo.config.recompile_limit",
    "torch.ops.aten._batch_norm_impl_index",
    "torch.ops.aten._batch_norm_impl_index_backward",
    "spikingjelly._ops.surrogate._surrogate_gradient",
    "spikingjelly._ops.surrogate._surrogate_spec",
    "torch.utils._python_dispatch.TorchDispatchMode",
)


def available() -> dict[str, bool]:
    """Which of the private APIs above this install has (``python -m bso.env`` lists them)."""
    return {path: private(path) is not None for path in PRIVATE_APIS}


def spikingjelly_native_cuda() -> bool:
    """Whether spikingjelly's native CUDA LIF kernels were built (an install from source with
    ``SJ_BUILD_NATIVE_CUDA=1``); without them it runs its Triton or torch kernels."""
    try:
        return importlib.util.find_spec("spikingjelly._ops.lif._C") is not None
    except ImportError:  # another spikingjelly layout
        return False


def torch_dispatch_mode() -> type:
    """torch's ``TorchDispatchMode`` (the benchmarks count operators with it)."""
    mode = private("torch.utils._python_dispatch.TorchDispatchMode")
    if mode is None:
        raise RuntimeError(
            f"this benchmark counts operators with torch.utils._python_dispatch.TorchDispatchMode, "
            f"which torch {torch.__version__} does not have; run it with the torch version of "
            "requirements.lock"
        )
    return mode
