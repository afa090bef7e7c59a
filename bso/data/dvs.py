"""CIFAR10-DVS through spikingjelly (the paper's experimental setup): events integrated into T
frames (split by event number), resized to 48x48, random-crop augmentation, global mean/std normalisation.

Layout under ``dataset.root`` (spikingjelly's): either ``events_np/<class>/cifar10_<class>_<i>.npz``
(events with keys t, x, y, p; what spikingjelly converts the .aedat files into) or the original
archives in ``download/`` (spikingjelly extracts and converts them). Frames are cached by spikingjelly
in ``frames_number_<T>_split_by_<split_by>/``; a cache whose build was interrupted, or whose file
count differs from the event files, is deleted and rebuilt.

Split (explicit config, default as OTTT/SLTT): per class, samples sorted by the numeric index in
their file name; the first ``train_per_class`` train, the rest test. Computed from the file list, so
the data is read once.
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from bso.data.errors import DataError

log = logging.getLogger(__name__)

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_INDEX = re.compile(r"(\d+)\.npz$")


def _missing_message(root: Path) -> str:
    return (
        f"CIFAR10-DVS not found under {root.resolve()}.\n"
        f"Expected either {root}/events_np/<class>/cifar10_<class>_<i>.npz for the 10 classes "
        f"({', '.join(CLASSES)}) or the original archives ({', '.join(c + '.zip' for c in CLASSES)}) "
        f"in {root}/download/. Get the archives from the CIFAR10-DVS figshare page "
        "(https://figshare.com/articles/dataset/CIFAR10-DVS_New/4724671) and put them there; "
        "spikingjelly converts them on first use. Set paths.data_dir or BSO_DATA_DIR to move it."
    )


def check_present(root: Path) -> None:
    events = root / "events_np"
    if events.is_dir():
        missing = [c for c in CLASSES if not any((events / c).glob("*.npz"))]
        if missing:
            raise FileNotFoundError(
                f"{events} is incomplete: no .npz files for {missing}. " + _missing_message(root)
            )
        return
    download = root / "download"
    if not (download.is_dir() and any(download.iterdir())):
        raise FileNotFoundError(_missing_message(root))


def drop_stale_frames(frames: Path, expected: dict[str, int]) -> bool:
    """Delete spikingjelly's frame cache ``frames`` when its build was interrupted (its
    ``.building`` marker is there) or a folder of it holds another number of frame files than
    ``expected`` (relative folder -> count); whether it was deleted."""
    marker = frames.with_name(frames.name + ".building")
    stale = marker.exists()
    if frames.exists() and not stale:
        stale = any(len(list((frames / rel).glob("*.npz"))) != n for rel, n in expected.items())
    if stale:
        log.info(f"deleting the interrupted or incomplete frame cache {frames}; it is rebuilt")
        shutil.rmtree(frames, ignore_errors=True)
        marker.unlink(missing_ok=True)
    return stale


def ensure_fresh_frame_cache(root: Path, T: int, split_by: str) -> Path:
    """Delete spikingjelly's frame cache when a build was interrupted or files are missing."""
    frames = root / f"frames_number_{T}_split_by_{split_by}"
    events = root / "events_np"
    expected = (
        {cls: len(list((events / cls).glob("*.npz"))) for cls in CLASSES} if events.is_dir() else {}
    )
    drop_stale_frames(frames, expected)
    return frames


@contextlib.contextmanager
def frame_building_threads():
    """While spikingjelly integrates events into frames: its thread pool (``spikingjelly.configure``'s
    ``max_threads_number_for_datasets_preprocess``, default 16) reads every event file with numpy,
    which parses each array header with ``ast.literal_eval``; CPython before 3.13 can fail on that in
    parallel threads (``SystemError: AST constructor recursion depth mismatch``, CPython issue
    106905). There the frames are built in one thread; later versions keep spikingjelly's setting."""
    from spikingjelly import configure

    if sys.version_info >= (3, 13):
        yield
        return
    before = configure.max_threads_number_for_datasets_preprocess
    configure.max_threads_number_for_datasets_preprocess = 1
    try:
        yield
    finally:
        configure.max_threads_number_for_datasets_preprocess = before


def index_split(samples: list[tuple[str, int]], train_per_class: int):
    """Indices of the train and test samples: per class, by the number in the file name."""
    by_class: dict[int, list[tuple[int, int]]] = {}
    for i, (path, label) in enumerate(samples):
        m = _INDEX.search(str(path))
        if m is None:
            raise ValueError(f"cannot read a sample index from the file name {path}")
        by_class.setdefault(label, []).append((int(m[1]), i))
    train, test = [], []
    for label in sorted(by_class):
        ordered = [i for _, i in sorted(by_class[label])]
        train += ordered[:train_per_class]
        test += ordered[train_per_class:]
    return train, test


class DVSFrames(Dataset):
    """Frames [T, 2, H, W] -> float tensor resized to ``size``, cropped (train), normalised."""

    def __init__(
        self,
        base,
        indices,
        size: int,
        train: bool,
        crop_padding: int,
        flip: bool,
        mean: float = 0.0,
        std: float = 1.0,
        title: str = "CIFAR10-DVS",
    ):
        self.base, self.indices = base, list(indices)
        self.size, self.train, self.crop_padding, self.flip = size, train, crop_padding, flip
        self.mean, self.std, self.title = mean, std, title

    def __len__(self) -> int:
        return len(self.indices)

    def frames(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.base.samples[self.indices[i]]
        try:
            x = torch.from_numpy(np.asarray(self.base.loader(path), dtype=np.float32))
        except Exception as err:  # noqa: BLE001 - name the file whatever numpy raised
            raise DataError(f"cannot read {self.title} frames from {path}: {err}") from err
        if x.dim() != 4 or x.shape[1] != 2:
            raise DataError(f"{path}: expected frames of shape [T, 2, H, W], got {tuple(x.shape)}")
        if x.shape[-2:] == (self.size, self.size):
            return x, label
        return F.interpolate(
            x, size=(self.size, self.size), mode="bilinear", align_corners=False
        ), label

    def __getitem__(self, i: int):
        x, label = self.frames(i)
        if self.train:
            if self.crop_padding:
                p = self.crop_padding
                x = F.pad(x, (p, p, p, p))
                top, left = np.random.randint(0, 2 * p + 1, size=2)
                x = x[..., top : top + self.size, left : left + self.size]
            if self.flip and np.random.rand() < 0.5:
                x = x.flip(-1)
        return (x - self.mean) / self.std, label


def frame_statistics(frames: DVSFrames) -> tuple[float, float]:
    """Global mean and std of every frame of ``frames`` (one pass; logged, to be pinned)."""
    total, sq, n = 0.0, 0.0, 0
    for i in range(len(frames)):
        x, _ = frames.frames(i)
        total, sq, n = total + float(x.sum()), sq + float((x**2).sum()), n + x.numel()
    mean = total / n
    std = max((sq / n - mean**2) ** 0.5, 1e-8)
    log.info(
        f"{frames.title} training frames: mean {mean:.6g}, std {std:.6g} "
        f"(pin them with dataset.mean={mean:.6g} dataset.std={std:.6g})"
    )
    return mean, std


def dvs_cifar10_datasets(
    root,
    T: int,
    split_by="number",
    size=48,
    train_per_class=900,
    crop_padding=4,
    flip=False,
    mean=None,
    std=None,
):
    from spikingjelly.datasets.cifar10_dvs import CIFAR10DVS

    root = Path(root)
    check_present(root)
    ensure_fresh_frame_cache(root, T, split_by)
    with frame_building_threads():
        base = CIFAR10DVS(str(root), data_type="frame", frames_number=T, split_by=split_by)
    train_idx, test_idx = index_split(base.samples, train_per_class)
    if not train_idx or not test_idx:
        raise ValueError(
            f"dataset.train_per_class={train_per_class} leaves an empty split "
            f"({len(train_idx)} train / {len(test_idx)} test samples)"
        )
    if mean is None or std is None:
        stats = DVSFrames(base, train_idx, size, train=False, crop_padding=0, flip=False)
        mean, std = frame_statistics(stats)
    train = DVSFrames(base, train_idx, size, True, crop_padding, flip, mean, std)
    test = DVSFrames(base, test_idx, size, False, 0, False, mean, std)
    return train, test
