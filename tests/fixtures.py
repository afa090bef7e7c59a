"""Tiny datasets written in each dataset's real on-disk format, for testing the real loaders."""

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
