"""Checkpoints: the training checkpoint (``last.pt`` / ``best.pt``: everything a run needs to continue
exactly), and the 1-bit export (``last_1bit.pt`` / ``best_1bit.pt``).

Every file is written atomically (a temporary file, then a rename), so a crash never leaves a
truncated checkpoint behind.

The 1-bit export stores every binary (or latent) synaptic weight as its signs, bit-packed 8 per byte
(:mod:`bso.bits`: numpy's ``packbits`` order, most significant bit first, bit 1 = +1), and every
other tensor of the state dict (first conv, FC, BatchNorm parameters and statistics) as is, so a
VGG-11 for CIFAR-10 takes ~1.2 MB instead of ~37 MB. Loading restores a model whose
outputs are bit-identical (latent weights come back as +-1, which has the same sign).
"""

from __future__ import annotations

import os
import pickle
import shutil
import zipfile
from pathlib import Path

import torch
from torch import nn

from bso.bits import pack_signs, unpack_signs
from bso.layers import BINARY_AT_INFERENCE, named_binary_parameters

FORMAT = "bso-1bit-v1"
TRAIN_FORMAT = "bso-train-v1"


def save_atomic(obj, path: str | Path) -> int:
    """``torch.save`` to a temporary file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:  # a full disk, a kill: no partial temp file stays behind
        tmp.unlink(missing_ok=True)
        raise
    return path.stat().st_size


def copy_atomic(src: str | Path, dst: str | Path) -> None:
    """Copy a written checkpoint to ``dst`` the same way: a temporary file, then a rename."""
    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}.tmp")
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_checkpoint(path: str | Path) -> dict:
    """Read a bso checkpoint (training or 1-bit) with errors that say what is wrong and what to do."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {path} not found; pass a run directory or its last.pt / best.pt / "
            "last_1bit.pt / best_1bit.pt"
        )
    try:
        blob = torch.load(path, map_location="cpu", weights_only=False)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError) as err:
        raise ValueError(
            f"{path} is not a readable checkpoint ({type(err).__name__}: {err}); it may be truncated "
            "or not a checkpoint at all. Use the run's last.pt or best.pt (written atomically at each "
            "epoch's end)."
        ) from err
    if not (
        isinstance(blob, dict) and (blob.get("format") in (FORMAT, TRAIN_FORMAT) or "model" in blob)
    ):
        raise ValueError(
            f"{path} is a torch file but not a bso checkpoint (expected a dict with format "
            f"{TRAIN_FORMAT!r} or {FORMAT!r})"
        )
    return blob


def export_1bit(model: nn.Module, path: str | Path, **extra) -> int:
    """Write the 1-bit export of ``model`` to ``path``; returns the file size in bytes."""
    names = {name for name, _ in named_binary_parameters(model, BINARY_AT_INFERENCE)}
    binary, tensors = {}, {}
    for key, value in model.state_dict().items():
        if key in names:
            binary[key] = {"bits": pack_signs(value).cpu(), "shape": list(value.shape)}
        else:
            tensors[key] = value.detach().cpu()
    return save_atomic({"format": FORMAT, "binary": binary, "tensors": tensors, **extra}, path)


def load_checkpoint(model: nn.Module, path: str | Path, blob: dict | None = None) -> dict:
    """Load the weights of a 1-bit export or a training checkpoint into ``model`` (``blob``: the
    file as :func:`read_checkpoint` already returned it)."""
    path = Path(path)
    blob = read_checkpoint(path) if blob is None else blob
    if blob.get("format") == FORMAT:
        state = dict(blob["tensors"])
        reference = model.state_dict()
        for key, item in blob["binary"].items():
            dtype = reference[key].dtype if key in reference else torch.float32
            state[key] = unpack_signs(item["bits"], item["shape"], dtype)  # bit 1 = +1
    else:
        state = blob["model"]
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        detail = "; ".join(lines[1:4]) + (
            f"; ... ({len(lines) - 4} more)" if len(lines) > 4 else ""
        )
        raise ValueError(
            f"{path} does not fit this model (check model=..., dataset=... match the run that "
            f"wrote it): {detail[:600]}"
        ) from None
    return blob
