"""The embedded digits dataset: real data, fixed stratified split, served by a DataLoader."""

import pytest
import torch
from omegaconf import OmegaConf

from bso.data import build_dataloaders
from bso.data.digits import digits_datasets


def test_digits_split_is_fixed_stratified_and_disjoint():
    train, test = digits_datasets(test_fraction=0.2, split_seed=0)
    assert len(train) + len(test) == 1797 and len(test) == 360
    x_train, y_train = train.tensors
    x_test, y_test = test.tensors
    assert x_train.shape[1:] == (1, 8, 8)
    assert torch.bincount(y_test, minlength=10).min() >= 35  # every class held out (stratified)
    assert abs(float(x_train.mean())) < 1e-4 and abs(float(x_train.std()) - 1) < 1e-4
    # no test image appears in the training set
    train_rows = {tuple(r.tolist()) for r in x_train.flatten(1)}
    assert (
        sum(tuple(r.tolist()) in train_rows for r in x_test.flatten(1)) < 5
    )  # rare true duplicates
    again, _ = digits_datasets(test_fraction=0.2, split_seed=0)
    assert torch.equal(again.tensors[0], x_train)
    other, _ = digits_datasets(test_fraction=0.2, split_seed=1)
    assert not torch.equal(other.tensors[1], y_train)


def test_build_dataloaders_and_unknown_dataset():
    cfg = OmegaConf.create(
        dict(name="digits", batch_size=32, num_workers=0, test_fraction=0.2, split_seed=0)
    )
    train_loader, test_loader = build_dataloaders(cfg)
    x, y = next(iter(train_loader))
    assert x.shape == (32, 1, 8, 8) and y.dtype == torch.long
    cfg.name = "mnist_from_the_internet"
    with pytest.raises(ValueError, match="unknown dataset.name 'mnist_from_the_internet'"):
        build_dataloaders(cfg)
