"""Datasets by name: ``build_dataloaders(cfg.dataset)`` returns the train and test loaders.

Every dataset yields ``(x, y)`` batches. Static images are ``[B, C, H, W]`` (the engines feed the same
image at every time step: direct encoding); event data are ``[B, T, C, H, W]`` (step t gets frame t).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from bso.data.cifar import cifar_datasets
from bso.data.digits import digits_datasets
from bso.data.dvs import dvs_cifar10_datasets
from bso.data.imagenet import imagenet_datasets
from bso.data.speech import speech_commands_datasets
from bso.distributed import ShardSampler


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


def _imagenet(cfg: DictConfig) -> tuple[Dataset, Dataset]:
    return imagenet_datasets(cfg.root, image_size=cfg.image_size, resize=cfg.resize)


def _dvs_cifar10(cfg: DictConfig) -> tuple[Dataset, Dataset]:
    return dvs_cifar10_datasets(
        cfg.root,
        T=cfg.frames,
        split_by=cfg.split_by,
        size=cfg.image_size,
        train_per_class=cfg.train_per_class,
        crop_padding=cfg.crop_padding,
        flip=cfg.flip,
        mean=cfg.mean,
        std=cfg.std,
    )


def _gsc(cfg: DictConfig) -> tuple[Dataset, Dataset]:
    return speech_commands_datasets(cfg.root, size=cfg.image_size)


DATASETS: dict[str, Callable[[DictConfig], tuple[Dataset, Dataset]]] = {
    "digits": _digits,
    "cifar10": _cifar,
    "cifar100": _cifar,
    "imagenet": _imagenet,
    "dvs_cifar10": _dvs_cifar10,
    "gsc": _gsc,
}


def build_dataloaders(
    cfg: DictConfig, seed: int = 0, rank: int = 0, world_size: int = 1
) -> tuple[DataLoader, DataLoader]:
    """Train and test loaders. With ``world_size > 1`` (torchrun) each rank loads its shard: the
    training set through a ``DistributedSampler`` (one shuffle of the whole set per epoch, the same on
    every rank -- call ``bso.distributed.set_epoch`` -- padded with repeats so that every rank runs
    the same number of batches), the test set through a ``ShardSampler`` (every sample exactly once
    over the ranks). Augmentation randomness (the loader's generator) is offset by the rank."""
    if cfg.name not in DATASETS:
        raise ValueError(
            f"unknown dataset.name {cfg.name!r}; available: {sorted(DATASETS)} "
            "(choose one with dataset=<name>)"
        )
    train_set, test_set = DATASETS[cfg.name](cfg)
    loader_kwargs = dict(
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        # pinned host memory only speeds up copies to a GPU; on a CPU-only machine it is off
        pin_memory=cfg.get("pin_memory", False) and torch.cuda.is_available(),
        persistent_workers=cfg.num_workers > 0 and cfg.get("persistent_workers", True),
    )
    generator = torch.Generator().manual_seed(seed + rank)
    train_sampler = test_sampler = None
    if world_size > 1:  # one shard per rank
        train_sampler = DistributedSampler(
            train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=seed
        )
        test_sampler = ShardSampler(len(test_set), rank, world_size)
    train_loader = DataLoader(
        train_set,
        shuffle=train_sampler is None,
        sampler=train_sampler,
        drop_last=False,
        generator=generator,
        **loader_kwargs,
    )
    test_loader = DataLoader(test_set, shuffle=False, sampler=test_sampler, **loader_kwargs)
    return train_loader, test_loader
