"""Datasets by name: ``build_dataloaders(cfg.dataset)`` returns the train and test loaders.

Every dataset yields ``(x, y)`` batches. Static images are ``[B, C, H, W]`` (the engines feed the same
image at every time step: direct encoding); event data are ``[B, T, C, H, W]`` (step t gets frame t).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset, Sampler

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


class EpochSampler(Sampler[int]):
    """The training order: a permutation that is a pure function of (seed, epoch), split into one
    shard per rank (every rank gets the same number of samples; the last few indices repeat when
    the dataset does not divide, as DistributedSampler does).

    Two things make long runs exact and resumable: ``set_epoch`` (the order of epoch e never depends
    on what ran before) and ``skip`` (a run interrupted after k batches of an epoch resumes at batch
    k + 1 of the same order)."""

    def __init__(self, size: int, seed: int = 0, rank: int = 0, world_size: int = 1, shuffle=True):
        self.size, self.seed, self.rank, self.world_size = size, seed, rank, world_size
        self.shuffle = shuffle
        self.epoch, self.start = 0, 0
        self.per_rank = -(-size // world_size)  # ceil

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Order of ``epoch``, starting after its first ``skip`` samples (this rank's)."""
        self.epoch, self.start = int(epoch), int(skip)

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.size, generator=g)
        else:
            order = torch.arange(self.size)
        total = self.per_rank * self.world_size
        order = torch.cat([order, order[: total - self.size]])  # pad to a multiple of world_size
        return iter(order[self.rank :: self.world_size][self.start :].tolist())

    def __len__(self) -> int:
        return self.per_rank - self.start


def start_epoch(loader: DataLoader, epoch: int, skip_batches: int = 0) -> None:
    """Before iterating ``loader`` in ``epoch``: its order, where to start, and the seed of its
    worker processes (a function of the epoch, so a resumed run draws what the original drew)."""
    loader.sampler.set_epoch(epoch, skip_batches * loader.batch_size)
    if loader.generator is not None:
        sampler = loader.sampler  # augmentation randomness differs per rank
        loader.generator.manual_seed((sampler.seed * 100_003 + epoch) * 1_009 + sampler.rank)


def build_dataloaders(
    cfg: DictConfig, seed: int = 0, rank: int = 0, world_size: int = 1
) -> tuple[DataLoader, DataLoader]:
    """The training loader (an :class:`EpochSampler`: call :func:`start_epoch` before each epoch)
    and the test loader. With ``world_size > 1`` (torchrun) each rank loads its shard: the training set
    padded with repeats so that every rank runs the same number of batches, the test set through a
    ``ShardSampler`` (every sample exactly once over the ranks)."""
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
    test_sampler = ShardSampler(len(test_set), rank, world_size) if world_size > 1 else None
    train_loader = DataLoader(
        train_set,
        sampler=EpochSampler(len(train_set), seed, rank, world_size),
        drop_last=False,
        generator=torch.Generator().manual_seed(seed),
        **loader_kwargs,
    )
    test_loader = DataLoader(test_set, shuffle=False, sampler=test_sampler, **loader_kwargs)
    return train_loader, test_loader
