"""The embedded default dataset: scikit-learn's bundled handwritten digits.

1,797 real 8x8 grey-scale images (values 0..16) of the digits 0-9, shipped inside scikit-learn, so no
download is needed. A fixed stratified split (``split_seed``) holds out ``test_fraction`` of each
class; pixels are scaled to [0, 1] and normalised with the training set's mean and std.
"""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import TensorDataset


def digits_datasets(
    test_fraction: float = 0.2, split_seed: int = 0
) -> tuple[TensorDataset, TensorDataset]:
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"dataset.test_fraction must be in (0, 1), got {test_fraction}")
    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [N, 1, 8, 8]
    labels = torch.tensor(bunch.target, dtype=torch.long)
    train_idx, test_idx = train_test_split(
        torch.arange(len(labels)).numpy(),
        test_size=test_fraction,
        random_state=split_seed,
        stratify=labels.numpy(),
    )
    train_idx, test_idx = torch.as_tensor(train_idx), torch.as_tensor(test_idx)
    mean, std = images[train_idx].mean(), images[train_idx].std()
    images = (images - mean) / std
    return (
        TensorDataset(images[train_idx], labels[train_idx]),
        TensorDataset(images[test_idx], labels[test_idx]),
    )
