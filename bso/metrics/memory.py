"""Memory measurements shared by training and the benchmarks.

* :class:`SavedTensorMeter`: the peak bytes held by autograd's saved tensors (activation memory),
  through saved-tensor hooks, counting each storage once. Works on CPU and GPU.
* :func:`peak_rss_bytes` / :func:`current_rss_bytes`: the process's peak / current resident memory.
* :func:`cuda_peak_bytes`: peak allocated / reserved CUDA memory since the last reset.
"""

from __future__ import annotations

import resource
import sys

import torch


class _Packed:
    """What autograd keeps instead of a saved tensor; releases its bytes when autograd drops it."""

    __slots__ = ("tensor", "key", "meter")

    def __init__(self, tensor, key, meter):
        self.tensor, self.key, self.meter = tensor, key, meter

    def __del__(self):
        self.meter._release(self.key)


class SavedTensorMeter:
    """Context manager: ``peak_bytes`` is the most memory autograd's saved tensors held at once.

    Each underlying storage counts once however many saved tensors view it; a storage stops counting
    when the last saved reference to it is freed (after backward, or when the graph is dropped).
    Parameters saved for backward are counted too.
    """

    def __init__(self):
        self.current_bytes = 0
        self.peak_bytes = 0
        self._refs: dict = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        key = (tensor.device, storage.data_ptr(), storage.nbytes())
        count = self._refs.get(key, 0)
        if count == 0:
            self.current_bytes += key[2]
            self.peak_bytes = max(self.peak_bytes, self.current_bytes)
        self._refs[key] = count + 1
        return _Packed(tensor, key, self)

    @staticmethod
    def _unpack(packed):
        return packed.tensor if isinstance(packed, _Packed) else packed

    def _release(self, key) -> None:
        count = self._refs.get(key, 0)
        if count <= 1:
            self._refs.pop(key, None)
            if count == 1:
                self.current_bytes -= key[2]
        else:
            self._refs[key] = count - 1

    def __enter__(self) -> SavedTensorMeter:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def current_rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc; falls back to the peak elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        return peak_rss_bytes()


def cuda_peak_bytes(device: torch.device) -> dict[str, int]:
    torch.cuda.synchronize(device)
    return {
        "allocated": torch.cuda.max_memory_allocated(device),
        "reserved": torch.cuda.max_memory_reserved(device),
    }


def reset_cuda_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


# The roles of persistent_state_bytes; every one but binary_weights_1bit is memory actually held
# (transient_gradients only inside backward, in the lean mode).
PERSISTENT_ROLES = (
    "binary_weights",
    "binary_weights_1bit",
    "latent_weights",
    "full_precision_weights",
    "gradients",
    "transient_gradients",
    "optimizer_state",
    "buffers",
)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def persistent_state_bytes(model: torch.nn.Module, optimizer) -> dict[str, float]:
    """Bytes held between training steps, by role, and per binary(-at-inference) weight.

    Roles: ``binary_weights`` (stored +-1, as stored: float32, or packed bits in the lean mode),
    ``binary_weights_1bit`` (the paper's storage), ``latent_weights``, ``full_precision_weights``,
    ``gradients`` (those currently allocated), ``transient_gradients`` (lean mode: the largest binary
    weight gradient that existed at once, inside backward, before its fused update freed it),
    ``optimizer_state`` (momentum, v[t], Adam moments, ...), ``buffers`` (BN running statistics).
    ``per_binary_weight`` splits weights, gradients and optimizer state of the binary (or latent)
    weights by their count, so the gap to 1 bit per weight is visible.
    """
    from bso.layers import binary_numel, named_binary_parameters

    roles = dict.fromkeys(PERSISTENT_ROLES, 0)
    kind = {
        id(p): f"{mode}_weights"
        for mode in ("binary", "latent")
        for _, p in named_binary_parameters(model, mode)
    }
    n_binary = 0
    per = {"weights": 0, "gradients": 0, "optimizer_state": 0}
    for p in model.parameters():
        role = kind.get(id(p), "full_precision_weights")
        roles[role] += _nbytes(p)
        if role != "full_precision_weights":
            n_binary += binary_numel(p)
            per["weights"] += _nbytes(p)
            roles["binary_weights_1bit"] += binary_numel(p) / 8
        if p.grad is not None:
            roles["gradients"] += _nbytes(p.grad)
            if role != "full_precision_weights":
                per["gradients"] += _nbytes(p.grad)
    roles["buffers"] = sum(_nbytes(b) for b in model.buffers())
    if optimizer.binary is not None:
        # the lean mode's BSO / T-BSO (bso.lean.optim) measures it; none exists in the plain mode
        roles["transient_gradients"] = getattr(optimizer.binary, "transient_gradient_peak_bytes", 0)
    for opt in (optimizer.binary, optimizer.full_precision):
        if opt is None:
            continue
        for p, state in opt.state.items():
            size = sum(_nbytes(v) for v in state.values() if isinstance(v, torch.Tensor))
            roles["optimizer_state"] += size
            if id(p) in kind:
                per["optimizer_state"] += size
    roles["binary_weight_count"] = n_binary
    roles["per_binary_weight"] = {k: (v / n_binary if n_binary else 0.0) for k, v in per.items()}
    return roles
