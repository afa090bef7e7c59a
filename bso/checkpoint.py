"""Checkpoints: the training checkpoint (``last.pt`` / ``best.pt``: everything a run needs to continue
exactly), and the 1-bit export (``last_1bit.pt`` / ``best_1bit.pt``).

Every file is written atomically (a temporary file, flushed to disk, then a rename), so a crash
never leaves a truncated checkpoint behind, and carries the SHA-256 of its bytes in the zip
archive's comment (``bso-sha256:<hex>``, written into the temporary file before the rename), so a
file damaged afterwards (a disk or copy error) is refused by name instead of loading wrong weights.
The files stay plain ``torch.save`` archives: ``torch.load`` reads them as they are. A file without
the comment (written by ``torch.save`` directly) is read without the check.

The 1-bit export stores every binary (or latent) synaptic weight as its signs, bit-packed 8 per byte
(:mod:`bso.bits`: numpy's ``packbits`` order, most significant bit first, bit 1 = +1), and every
other tensor of the state dict (first conv, FC, BatchNorm parameters and statistics) as is, so a
VGG-11 for CIFAR-10 takes ~1.2 MB instead of ~37 MB. Loading restores a model whose
outputs are bit-identical (latent weights come back as +-1, which has the same sign).
"""

from __future__ import annotations

import errno
import hashlib
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


CHECKSUM_TAG = b"bso-sha256:"
_COMMENT_LEN = len(CHECKSUM_TAG) + 64
_EOCD = b"PK\x05\x06"  # the zip archive's end record: 22 bytes, then the comment
_CHUNK = 1 << 22


def _sha256(f, size: int) -> str:
    digest = hashlib.sha256()
    f.seek(0)
    while size > 0:
        chunk = f.read(min(_CHUNK, size))
        if not chunk:
            break
        digest.update(chunk)
        size -= len(chunk)
    return digest.hexdigest()


def seal(path: str | Path) -> None:
    """Write the SHA-256 of ``path`` (a ``torch.save`` zip archive without a comment) into its
    comment and flush it to disk; the digest covers every byte before the comment's length."""
    with open(path, "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(size - 22)
        end = f.read(22)
        if end[:4] != _EOCD or end[20:] != b"\0\0":
            raise ValueError(f"{path} is not a torch.save zip archive without a comment")
        comment = CHECKSUM_TAG + _sha256(f, size - 2).encode()
        f.seek(size - 2)
        f.write(len(comment).to_bytes(2, "little") + comment)
        f.flush()
        os.fsync(f.fileno())


def verify(path: str | Path) -> bool:
    """True when ``path`` carries a checksum that matches its bytes, False when it carries none;
    a mismatch raises ValueError naming the file and what to do."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        if size < 22 + _COMMENT_LEN:
            return False
        f.seek(size - 22 - _COMMENT_LEN)
        end = f.read(22 + _COMMENT_LEN)
        if end[:4] != _EOCD or not end[22:].startswith(CHECKSUM_TAG):
            return False
        if int.from_bytes(end[20:22], "little") != _COMMENT_LEN:
            return False
        if _sha256(f, size - _COMMENT_LEN - 2) != end[22 + len(CHECKSUM_TAG) :].decode("ascii"):
            raise ValueError(
                f"{path} is damaged: its bytes no longer match the checksum written with it (a disk "
                "or copy error changed it). Use the run's other checkpoint (best.pt / last.pt, "
                "e.g. resume=<run dir>/best.pt continues from the best epoch) or copy the file again"
            )
    return True


def save_atomic(obj, path: str | Path) -> int:
    """``torch.save`` to a temporary file beside ``path``, its checksum (:func:`seal`), then a
    rename over ``path``. A failed write (a full disk) raises OSError naming ``path`` and leaves
    ``path`` as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        try:
            torch.save(obj, tmp)
        except RuntimeError as err:  # torch's zip writer reports a failed write as RuntimeError
            raise _write_error(path, err) from err
        seal(tmp)
        os.replace(tmp, path)
    except BaseException:  # a full disk, a kill: no partial temp file stays behind
        tmp.unlink(missing_ok=True)
        raise
    return path.stat().st_size


def _write_error(path: Path, err: BaseException) -> OSError:
    free = shutil.disk_usage(path.parent).free
    full = free < (1 << 20)
    return OSError(
        errno.ENOSPC if full else errno.EIO,
        f"could not write {path}: {str(err).strip().splitlines()[0]}"
        + (
            f" (the disk is full: {free} bytes free; free space and resume the run)" if full else ""
        ),
    )


def copy_atomic(src: str | Path, dst: str | Path) -> None:
    """Copy a written checkpoint to ``dst`` the same way: a temporary file, then a rename."""
    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}.tmp")
    try:
        shutil.copyfile(src, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_checkpoint(path: str | Path) -> dict:
    """Read a bso checkpoint (training or 1-bit) with errors that say what is wrong and what to do."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {path} not found; give a run's last.pt / best.pt / last_1bit.pt / "
            "best_1bit.pt (eval.py also takes the run directory)"
        )
    try:
        verify(path)
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
