"""Datasets by name: ``build_dataloaders(cfg.dataset)`` returns the train and test loaders.

Every dataset yields ``(x, y)`` batches. Static images are ``[B, C, H, W]`` (the engines feed the same
image at every time step: direct encoding); event data are ``[B, T, C, H, W]`` (step t gets frame t).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset

from bso.data.cifar import cifar_datasets
from bso.data.digits import digits_datasets


def _digits(cfg: DictConfig) -> tuple[Dataset, Dataset]:
    return digits_datasets(test_fraction=cfg.test_fraction, split_seed=cfg.split_seed)


def _cifar(cfg: DictConfig) -> tuple[Dataset, Dataset]:
    return cifar_datasets(
        cfg.name,
        cfg.root,
        download=cfg.download,
        autoaugment=cfg.autoaugment,
        cutout_length=cfg.cutout_length,
    )


DATASETS: dict[str, Callable[[DictConfig], tuple[Dataset, Dataset]]] = {
    "digits": _digits,
    "cifar10": _cifar,
    "cifar100": _cifar,
}


def build_dataloaders(cfg: DictConfig, seed: int = 0) -> tuple[DataLoader, DataLoader]:
    if cfg.name not in DATASETS:
        raise ValueError(
            f"unknown dataset.name {cfg.name!r}; available: {sorted(DATASETS)} "
            "(choose one with dataset=<name>)"
        )
    train_set, test_set = DATASETS[cfg.name](cfg)
    loader_kwargs = dict(
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        pin_memory=cfg.get("pin_memory", False) and torch.cuda.is_available(),
        persistent_workers=cfg.num_workers > 0,
    )
    generator = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(
        train_set, shuffle=True, drop_last=False, generator=generator, **loader_kwargs
    )
    test_loader = DataLoader(test_set, shuffle=False, **loader_kwargs)
    return train_loader, test_loader
