"""Tiny datasets written in each dataset's real on-disk format (random content), for testing the
real loaders and benchmarking data loading. Nothing in the framework falls back to these: a missing
dataset is always an error."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np


def write_cifar(root: Path, name: str = "cifar10", per_file: int = 2, seed: int = 0) -> Path:
    """CIFAR python-version pickles: ``data`` uint8 [N, 3072] (RGB planes), labels, a meta file."""
    rng = np.random.default_rng(seed)
    classes = 10 if name == "cifar10" else 100

    def batch(n):
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = rng.integers(0, classes, size=n).tolist()
        key = "labels" if name == "cifar10" else "fine_labels"
        return {"data": data, key: labels}

    if name == "cifar10":
        folder = root / "cifar-10-batches-py"
        files = {f"data_batch_{i}": batch(per_file) for i in range(1, 6)}
        files["test_batch"] = batch(per_file)
        files["batches.meta"] = {"label_names": [f"class{i}" for i in range(10)]}
    else:
        folder = root / "cifar-100-python"
        files = {"train": batch(5 * per_file), "test": batch(per_file)}
        files["meta"] = {"fine_label_names": [f"class{i}" for i in range(100)]}
    folder.mkdir(parents=True, exist_ok=True)
    for fname, content in files.items():
        with open(folder / fname, "wb") as f:
            pickle.dump(content, f)
    return root


def write_imagenet(root: Path, classes: int = 2, per_class: int = 2, size: int = 40) -> Path:
    """An ImageFolder of small JPEGs: <root>/{train,val}/<wnid>/<name>.JPEG."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(classes):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, size=(size, size + 8, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"n{c:08d}_{i}.JPEG", format="JPEG")
    return root


DVS_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)


def write_events(path: Path, rng, events: int, height: int, width: int, duration: int = 10**6):
    """One event file as spikingjelly stores converted events: arrays t (sorted timestamps), x, y
    (inside the ``width`` x ``height`` sensor) and p (polarity 0/1)."""
    np.savez(
        path,
        t=np.sort(rng.integers(0, duration, size=events)).astype(np.int64),
        x=rng.integers(0, width, size=events).astype(np.int64),
        y=rng.integers(0, height, size=events).astype(np.int64),
        p=rng.integers(0, 2, size=events).astype(np.int64),
    )


def write_cifar10_dvs(root: Path, per_class: int = 3, events: int = 400, seed: int = 0) -> Path:
    """CIFAR10-DVS as spikingjelly stores converted events: events_np/<class>/cifar10_<class>_<i>.npz
    (:func:`write_events`, 128x128)."""
    rng = np.random.default_rng(seed)
    for cls in DVS_CLASSES:
        folder = root / "events_np" / cls
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            write_events(folder / f"cifar10_{cls}_{i}.npz", rng, events, 128, 128)
    return root


def write_dvs128_gesture(root: Path, per_class: int = 2, events: int = 300, seed: int = 0) -> Path:
    """DVS128 Gesture as spikingjelly converts the release (events_np/{train,test}/<label>/
    <user>_<lighting>_<i>.npz, labels 0..10, 128x128 events over 6 s, :func:`write_events`)."""
    rng = np.random.default_rng(seed)
    for split, user in (("train", "user01"), ("test", "user24")):
        for label in range(11):
            folder = root / "events_np" / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                path = folder / f"{user}_fluorescent_{i}.npz"
                write_events(path, rng, events, 128, 128, duration=6 * 10**6)
    return root


def write_nmnist(root: Path, per_class: int = 2, events: int = 200, seed: int = 0) -> Path:
    """N-MNIST as spikingjelly converts the release (events_np/{train,test}/<digit>/<n>.npz, 34x34
    events over 300 ms, :func:`write_events`)."""
    rng = np.random.default_rng(seed)
    for split in ("train", "test"):
        for digit in range(10):
            folder = root / "events_np" / split / str(digit)
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                path = folder / f"{10 * i + digit:05d}.npz"
                write_events(path, rng, events, 34, 34, duration=300_000)
    return root


def write_shd(root: Path, per_class: int = 2, spikes: int = 500, seed: int = 0) -> Path:
    """The Spiking Heidelberg Digits' HDF5 files as released, in spikingjelly's folder:
    events_h5/shd_{train,test}.h5 with spikes/times (variable-length, seconds, sorted, within
    1 s), spikes/units (variable-length, channels 0..699), labels (0..19) and extra/speaker."""
    import h5py

    rng = np.random.default_rng(seed)
    folder = root / "events_h5"
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        labels = np.repeat(np.arange(20), per_class).astype(np.uint16)
        with h5py.File(folder / f"shd_{split}.h5", "w") as f:
            times = f.create_dataset(
                "spikes/times", (len(labels),), dtype=h5py.vlen_dtype(np.float32)
            )
            units = f.create_dataset(
                "spikes/units", (len(labels),), dtype=h5py.vlen_dtype(np.uint16)
            )
            for i in range(len(labels)):
                times[i] = np.sort(rng.uniform(0.0, 1.0, size=spikes)).astype(np.float32)
                units[i] = rng.integers(0, 700, size=spikes).astype(np.uint16)
            f.create_dataset("labels", data=labels)
            f.create_dataset("extra/speaker", data=rng.integers(0, 12, len(labels)))
    return root


def write_speech_commands(root: Path, words=("yes", "no", "up"), per_word: int = 4) -> Path:
    """Speech Commands v0.02 layout: <root>/<word>/<speaker>_nohash_<n>.wav (16 kHz mono 16-bit)
    plus validation_list.txt and testing_list.txt."""
    import wave

    rng = np.random.default_rng(0)
    test, val = [], []
    for word in words:
        (root / word).mkdir(parents=True, exist_ok=True)
        for i in range(per_word):
            name = f"{word}/speaker{i:02d}_nohash_0.wav"
            tone = np.sin(2 * np.pi * (200 + 100 * i) * np.arange(16000) / 16000)
            clip = (0.3 * tone + 0.05 * rng.standard_normal(16000)) * 32767
            with wave.open(str(root / name), "wb") as f:
                f.setnchannels(1)
                f.setsampwidth(2)
                f.setframerate(16000)
                f.writeframes(clip.astype("<i2").tobytes())
            (test if i == 0 else val if i == 1 else []).append(name)
    (root / "_background_noise_").mkdir(exist_ok=True)
    (root / "testing_list.txt").write_text("\n".join(test) + "\n")
    (root / "validation_list.txt").write_text("\n".join(val) + "\n")
    return root
