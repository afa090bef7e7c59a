"""DVS128 Gesture, N-MNIST and the Spiking Heidelberg Digits (SHD) through spikingjelly's dataset
classes (``DVS128Gesture``, ``NMNIST``, ``SpikingHeidelbergDigits``): each sample's events are
integrated into ``frames`` frames (``engine.T``; step t gets frame t), split by event number
(``split_by: number``, equal event counts) or by time (``split_by: time``, equal time bins between
the sample's first and last event), as spikingjelly's ``frames_number`` / ``split_by`` do.

Layouts under ``dataset.root`` (spikingjelly's):

* DVS128 Gesture: ``events_np/{train,test}/<label>/<user>_<lighting>_<i>.npz`` (events t, x, y, p;
  labels 0..10), what spikingjelly converts the release into, or the release itself in
  ``download/`` (DvsGesture.tar.gz, gesture_mapping.csv, LICENSE.txt, README.txt).
* N-MNIST: ``events_np/{train,test}/<digit>/<n>.npz`` (t, x, y, p), or ``download/{Train,Test}.zip``.
* SHD: ``events_h5/shd_{train,test}.h5`` (the release's HDF5 files: ``spikes/times`` in seconds,
  ``spikes/units`` 0..699, ``labels`` 0..19), or ``download/shd_{train,test}.h5.zip``.

Archives in ``download/`` are MD5-checked here first (spikingjelly deletes a download whose MD5
differs); nothing is ever downloaded. Frames are cached by spikingjelly in
``frames_number_<T>_split_by_<split_by>/``; a cache whose build was interrupted, or whose file count
differs from the events', is deleted and rebuilt. Each sample's label is its class folder's number
(spikingjelly's folders sort as text, "10" before "2", which would permute the classes).

Samples: DVS frames ``[T, 2, image_size, image_size]`` (bilinear resize when the size differs,
random crop with ``crop_padding`` while training, ``(x - mean) / std``); SHD frames ``[T, 700]``
(spike counts per channel and bin).
"""

from __future__ import annotations

import logging
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from bso.data.dvs import DVSFrames, drop_stale_frames, frame_building_threads, frame_statistics
from bso.data.errors import DataError

log = logging.getLogger(__name__)

SHD_CHANNELS = 700
SPLITS = ("train", "test")


@dataclass(frozen=True)
class EventDataset:
    """What differs between the three datasets: spikingjelly's class, the folder it reads, the
    classes and the sensor size."""

    name: str  # dataset.name
    title: str
    spikingjelly_class: str  # in spikingjelly.datasets
    raw: str  # the folder under dataset.root that spikingjelly reads the events from
    classes: int
    size: tuple[int, int] | None  # sensor height, width (None: SHD's 700 channels)

    def dataset_class(self):
        import spikingjelly.datasets as sj_datasets

        return getattr(sj_datasets, self.spikingjelly_class)

    def layout(self, root: Path) -> str:
        if self.size is None:
            events = f"{root}/{self.raw}/shd_train.h5 and shd_test.h5"
        else:
            events = f"{root}/{self.raw}/{{train,test}}/<label 0..{self.classes - 1}>/*.npz"
        archives = ", ".join(name for name, _, _ in self.dataset_class().resource_url_md5())
        return f"{events}, or the release ({archives}) in {root}/download/"

    @property
    def source(self) -> str:
        """Where spikingjelly says the release comes from."""
        urls = [url for _, url, _ in self.dataset_class().resource_url_md5()]
        return ", ".join(dict.fromkeys(urls))

    def missing(self, root: Path, what: str) -> str:
        return (
            f"{self.title}: {what}. Expected {self.layout(root)}. Get the release from "
            f"{self.source}; spikingjelly converts it on first use. Set dataset.root, "
            "paths.data_dir or BSO_DATA_DIR to point elsewhere."
        )


DVS128_GESTURE = EventDataset(
    "dvs128_gesture", "DVS128 Gesture", "DVS128Gesture", "events_np", 11, (128, 128)
)
NMNIST = EventDataset("nmnist", "N-MNIST", "NMNIST", "events_np", 10, (34, 34))
SHD = EventDataset("shd", "SHD", "SpikingHeidelbergDigits", "events_h5", 20, None)
EVENT_DATASETS = {d.name: d for d in (DVS128_GESTURE, NMNIST, SHD)}


def check_shd_file(path: Path) -> np.ndarray:
    """The labels of an SHD HDF5 file, after checking its structure (one :class:`DataError` naming the
    file and what is wrong)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            for key in ("spikes/times", "spikes/units", "labels"):
                if key not in f:
                    raise DataError(
                        f"{path} has no '{key}': an SHD file holds spikes/times, spikes/units "
                        "and labels (as released at zenkelab.org/datasets); replace the file"
                    )
            labels = np.asarray(f["labels"][:])
            sizes = {len(f["spikes/times"]), len(f["spikes/units"])}
    except OSError as err:
        raise DataError(
            f"{path} is not a readable HDF5 file ({err}); replace it with the released file"
        ) from err
    if sizes != {len(labels)} or not len(labels):
        raise DataError(
            f"{path}: spikes/times, spikes/units and labels must hold one entry per sample, got "
            f"{sorted(sizes)} spike lists for {len(labels)} labels; replace the file"
        )
    if labels.min() < 0 or labels.max() >= SHD.classes:
        raise DataError(
            f"{path}: labels must be 0..{SHD.classes - 1}, found {labels.min()}..{labels.max()}"
        )
    return labels


def check_present(spec: EventDataset, root: Path) -> None:
    """The events (or the release's archives, intact) are there; else one error saying which file,
    what was expected and how to get it."""
    raw = root / spec.raw
    marker = raw.with_name(raw.name + ".building")
    if marker.exists():
        raise FileNotFoundError(
            f"{spec.title}: {raw} is incomplete (spikingjelly's conversion of {root}/download/ "
            f"was interrupted: {marker} is there). Delete {raw} and {marker} to convert it anew."
        )
    if raw.is_dir():
        if spec.size is None:
            for split in SPLITS:
                path = raw / f"shd_{split}.h5"
                if not path.is_file():
                    raise FileNotFoundError(spec.missing(root, f"{path} is missing"))
                check_shd_file(path)
            return
        for split in SPLITS:
            empty = [
                c for c in range(spec.classes) if not any((raw / split / str(c)).glob("*.npz"))
            ]
            if empty:
                raise FileNotFoundError(
                    spec.missing(root, f"no .npz event files for labels {empty} in {raw / split}")
                )
        return
    download = root / "download"
    if not (download.is_dir() and any(download.iterdir())):
        raise FileNotFoundError(spec.missing(root, f"not found under {root.resolve()}"))
    from torchvision.datasets.utils import calculate_md5

    archives = [(download / name, md5) for name, _, md5 in spec.dataset_class().resource_url_md5()]
    for path, _ in archives:
        if not path.is_file():
            raise FileNotFoundError(spec.missing(root, f"{path} is missing"))
    for path, md5 in archives:
        actual = calculate_md5(str(path))
        if actual != md5:
            raise DataError(
                f"{spec.title}: {path} is not the released file (MD5 {actual}, expected {md5}); "
                f"download it again from {spec.source}"
            )


def frames_folder(root: Path, T: int, split_by: str) -> Path:
    """spikingjelly's frame cache for ``T`` frames split by ``split_by``."""
    return root / f"frames_number_{T}_split_by_{split_by}"


def expected_frame_files(spec: EventDataset, root: Path) -> dict[str, int]:
    """How many frame files each ``<split>/<label>`` folder of the cache must hold: one per event
    file (one per SHD sample); empty while the events are still archives."""
    raw = root / spec.raw
    if not raw.is_dir():
        return {}
    if spec.size is None:
        expected = {}
        for split in SPLITS:
            counts = Counter(check_shd_file(raw / f"shd_{split}.h5").tolist())
            expected.update({f"{split}/{label}": n for label, n in counts.items()})
        return expected
    return {
        f"{folder.parent.name}/{folder.name}": len(list(folder.glob("*.npz")))
        for folder in raw.glob("*/*")
        if folder.is_dir()
    }


def _empty_time_bin(t: np.ndarray, T: int, integer: bool) -> int | None:
    """The first of the T time bins between the first and the last event that holds no event
    (spikingjelly's ``split_by="time"`` cannot integrate such a sample), or None."""
    if not len(t):
        return 0
    dt = (t[-1] - t[0]) // T if integer else (t[-1] - t[0]) / T
    for i in range(T):
        start = t[0] + dt * i
        if not np.any((t >= start) & (t < start + dt)):
            return i
    return None


def diagnose(spec: EventDataset, root: Path, T: int, split_by: str) -> str | None:
    """After spikingjelly failed to build the frames: the first event file (or SHD sample) it
    cannot integrate, and why; None when none is found."""
    raw = root / spec.raw
    if spec.size is None:
        import h5py

        for split in SPLITS:
            path = raw / f"shd_{split}.h5"
            with h5py.File(path, "r") as f:
                for i in range(len(f["labels"])):
                    t, units = np.asarray(f["spikes/times"][i]), np.asarray(f["spikes/units"][i])
                    where = f"{path}, sample {i}"
                    if len(t) != len(units):
                        return f"{where}: {len(t)} spike times for {len(units)} units"
                    if len(units) and (units.min() < 0 or units.max() >= SHD_CHANNELS):
                        return f"{where}: units must be 0..{SHD_CHANNELS - 1}"
                    if split_by == "time" and (k := _empty_time_bin(t, T, False)) is not None:
                        return f"{where}: no spike in time bin {k} of {T} (use split_by=number)"
        return None
    height, width = spec.size
    for path in sorted(raw.glob("*/*/*.npz")):
        try:
            with np.load(path) as events:
                t, x, y, p = (np.asarray(events[k]) for k in ("t", "x", "y", "p"))
        except Exception as err:  # noqa: BLE001 - name the file whatever numpy raised
            return f"{path}: not an event file with arrays t, x, y, p ({err})"
        if not len(t) == len(x) == len(y) == len(p):
            return f"{path}: t, x, y, p differ in length"
        if len(x) and (x.min() < 0 or x.max() >= width or y.min() < 0 or y.max() >= height):
            return f"{path}: events outside the {width}x{height} sensor"
        if split_by == "time" and (k := _empty_time_bin(t, T, True)) is not None:
            return f"{path}: no event in time bin {k} of {T} (use split_by=number)"
    return None


def spikingjelly_frames(spec: EventDataset, root: Path, train: bool, T: int, split_by: str):
    """spikingjelly's dataset of ``T`` frames (it builds the cache, train and test, on first use),
    its samples labelled by their class folder's number."""
    frames = frames_folder(root, T, split_by)
    try:
        with frame_building_threads():
            base = spec.dataset_class()(
                str(root), train=train, data_type="frame", frames_number=T, split_by=split_by
            )
    except Exception as err:
        marker = frames.with_name(frames.name + ".building")
        if marker.exists():  # the build failed: leave no half-built cache behind
            shutil.rmtree(frames, ignore_errors=True)
            marker.unlink(missing_ok=True)
        problem = diagnose(spec, root, T, split_by) or f"{type(err).__name__}: {err}"
        raise DataError(
            f"{spec.title}: spikingjelly could not integrate the events into {T} frames split by "
            f"{split_by}: {problem}"
        ) from err
    # the class is the folder's number (DatasetFolder would number the folders in text order)
    base.samples = [(path, int(Path(path).parent.name)) for path, _ in base.samples]
    base.targets = [label for _, label in base.samples]
    return base


class SHDFrames(Dataset):
    """SHD frames ``[T, 700]`` (spike counts per channel and time bin) and the label."""

    def __init__(self, base):
        self.base = base

    def __len__(self) -> int:
        return len(self.base.samples)

    def __getitem__(self, i: int):
        path, label = self.base.samples[i]
        try:
            x = torch.from_numpy(np.asarray(self.base.loader(path), dtype=np.float32))
        except Exception as err:  # noqa: BLE001 - name the file whatever numpy raised
            raise DataError(f"cannot read SHD frames from {path}: {err}") from err
        if x.dim() != 2 or x.shape[1] != SHD_CHANNELS:
            raise DataError(
                f"{path}: expected frames of shape [T, {SHD_CHANNELS}], got {tuple(x.shape)}; "
                "delete the frame cache to rebuild it"
            )
        return x, label


def event_datasets(
    name: str,
    root,
    T: int,
    split_by: str = "number",
    size: int | None = None,
    crop_padding: int = 0,
    mean: float | None = 0.0,
    std: float | None = 1.0,
):
    """The train and test sets of DVS128 Gesture, N-MNIST or SHD (the release's split) as frames.
    DVS: ``size`` (the side the frames are resized to), ``crop_padding``, ``mean`` / ``std`` (None:
    computed over the training frames); no horizontal flip (it would turn left-hand gestures into
    right-hand ones). SHD: the spike counts as they are."""
    spec = EVENT_DATASETS[name]
    if split_by not in ("number", "time"):
        raise ValueError(f"dataset.split_by must be number or time, got {split_by!r}")
    root = Path(root)
    check_present(spec, root)
    drop_stale_frames(frames_folder(root, T, split_by), expected_frame_files(spec, root))
    train_base = spikingjelly_frames(spec, root, True, T, split_by)
    test_base = spikingjelly_frames(spec, root, False, T, split_by)
    if spec.size is None:
        return SHDFrames(train_base), SHDFrames(test_base)
    size = size or spec.size[0]
    if mean is None or std is None:
        stats = DVSFrames(
            train_base, range(len(train_base)), size, False, 0, False, title=spec.title
        )
        mean, std = frame_statistics(stats)
    train = DVSFrames(
        train_base, range(len(train_base)), size, True, crop_padding, False, mean, std, spec.title
    )
    test = DVSFrames(test_base, range(len(test_base)), size, False, 0, False, mean, std, spec.title)
    return train, test
