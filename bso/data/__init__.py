"""Datasets by name: ``build_dataloaders(cfg.dataset)`` returns the train and test loaders.

Every dataset yields ``(x, y)`` batches. Static images are ``[B, C, H, W]`` (the engines feed the same
image at every time step: direct encoding); event data are ``[B, T, C, H, W]`` (step t gets frame t),
or ``[B, T, C]`` for channels without a picture (SHD's 700 channels).
"""

from __future__ import annotations

import random
from collections.abc import Callable

import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset, Sampler

from bso.data.cifar import cifar_datasets, cifar_transform
from bso.data.digits import digits_datasets
from bso.data.dvs import dvs_cifar10_datasets
from bso.data.imagenet import imagenet_datasets, imagenet_transform
from bso.data.neuromorphic import event_datasets
from bso.data.speech import speech_commands_datasets
from bso.distributed import ShardSampler


def _digits(cfg: DictConfig) -> tuple[Dataset, Dataset]:
    return digits_datasets(test_fraction=cfg.test_fraction, split_seed=cfg.split_seed)


def build_transform(cfg: DictConfig, train: bool) -> Callable:
    """The transform the loaders apply to each image of ``cfg`` (a ``dataset`` config): a callable
    from a PIL image to the normalised tensor. CIFAR-10/100: the released code's pipeline by default
    (``dataset.augment``, ``dataset.mean`` / ``.std``; docs/parity.md); ImageNet: RandomResizedCrop
    + flip / resize + center crop. Its random draws come from Python's ``random``, NumPy's global
    generator and torch's (seeded per sample by the training loader, :class:`SeededSamples`)."""
    if cfg.name in ("cifar10", "cifar100"):
        augment = cfg.get("augment")
        if augment is None or cfg.get("mean") is None or cfg.get("std") is None:
            raise ValueError(
                f"dataset={cfg.name} needs dataset.augment (policy, cutout), dataset.mean and "
                f"dataset.std (configs/dataset/{cfg.name}.yaml has the released code's)"
            )
        return cifar_transform(
            train, cfg.mean, cfg.std, policy=augment.policy, cutout=augment.cutout
        )
    if cfg.name == "imagenet":
        return imagenet_transform(train, image_size=cfg.image_size, resize=cfg.resize)
    raise ValueError(
        f"dataset={cfg.name} has no image transform (build_transform covers cifar10, cifar100 and "
        "imagenet; the other datasets are tensors built by their own loaders)"
    )


def _cifar(cfg: DictConfig) -> tuple[Dataset, Dataset]:
    return cifar_datasets(
        cfg.name,
        cfg.root,
        download=cfg.download,
        train_transform=build_transform(cfg, train=True),
        test_transform=build_transform(cfg, train=False),
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


def _event_frames(cfg: DictConfig) -> tuple[Dataset, Dataset]:
    return event_datasets(
        cfg.name,
        cfg.root,
        T=cfg.frames,
        split_by=cfg.split_by,
        size=cfg.get("image_size"),
        crop_padding=cfg.get("crop_padding", 0),
        mean=cfg.get("mean", 0.0),
        std=cfg.get("std", 1.0),
    )


def _gsc(cfg: DictConfig) -> tuple[Dataset, Dataset]:
    return speech_commands_datasets(cfg.root, size=cfg.image_size)


# The side of the (square) images of the datasets that have one size; the others read dataset.image_size.
IMAGE_SIZE = {"digits": 8, "cifar10": 32, "cifar100": 32}


def input_shape(cfg) -> tuple[int, int, int] | None:
    """One sample's (channels, height, width) at one time step for a ``dataset`` config (a run's
    saved config too); None when the config does not say."""
    size = cfg.get("image_size") or IMAGE_SIZE.get(cfg.get("name"))
    channels = cfg.get("in_channels")
    return None if size is None or channels is None else (int(channels), int(size), int(size))


DATASETS: dict[str, Callable[[DictConfig], tuple[Dataset, Dataset]]] = {
    "digits": _digits,
    "cifar10": _cifar,
    "cifar100": _cifar,
    "imagenet": _imagenet,
    "dvs_cifar10": _dvs_cifar10,
    "gsc": _gsc,
    "dvs128_gesture": _event_frames,
    "nmnist": _event_frames,
    "shd": _event_frames,
}


class SampleKey(int):
    """A dataset index that also names its epoch: ``run`` = (seed, epoch, rank), from which
    :class:`SeededSamples` derives the sample's augmentation seed (:func:`sample_seed`)."""

    run: tuple[int, int, int]

    def __new__(cls, index: int, run: tuple[int, int, int]):
        key = super().__new__(cls, index)
        key.run = run
        return key

    def __reduce__(self):  # to the loader's worker processes, run included
        return SampleKey, (int(self), self.run)


def sample_seed(seed: int, epoch: int, rank: int, index: int) -> int:
    """The augmentation seed of sample ``index`` in ``epoch`` on ``rank`` (NumPy's SeedSequence)."""
    state = np.random.SeedSequence([seed, epoch, rank, index]).generate_state(2)
    return int(state[0]) << 32 | int(state[1])


class SeededSamples(Dataset):
    """The training set with reproducible augmentation: before loading sample ``key`` (a
    :class:`SampleKey` from :class:`EpochSampler`), Python's ``random``, NumPy's global generator and
    torch's CPU generator are seeded from (run seed, epoch, rank, sample index).

    So a sample's augmentation is a function of those four numbers alone: the same for a seed
    whatever the number of loader workers (which a resumed run may change) and whichever worker
    loads it, different across epochs, ranks and samples, and the same after a resume, also one
    that continues in the middle of an epoch. (With ``num_workers=0`` the main process's generators
    are reseeded the same way; nothing else in a training step draws from them.)"""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name):  # the wrapped dataset's attributes (classes, targets, ...)
        dataset = self.__dict__.get("dataset")
        if dataset is None:
            raise AttributeError(name)
        return getattr(dataset, name)

    def __getitem__(self, key):
        run = getattr(key, "run", None)
        if run is not None:  # a plain index (not from EpochSampler) draws unseeded
            seed_generators(sample_seed(*run, int(key)))
        return self.dataset[int(key)]


def seed_generators(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global generator (32 bits of ``seed``) and torch's CPU
    generator (``torch.manual_seed`` would also seed every accelerator, far slower per sample)."""
    random.seed(seed)
    np.random.seed(seed & 0xFFFF_FFFF)
    torch.default_generator.manual_seed(seed)


class EpochSampler(Sampler[int]):
    """The training order: a permutation that is a pure function of (seed, epoch), split into one
    shard per rank (every rank gets the same number of samples; the last few indices repeat when
    the dataset does not divide, as DistributedSampler does).

    Two things make long runs exact and resumable: ``set_epoch`` (the order of epoch e never depends
    on what ran before) and ``skip`` (a run interrupted after k batches of an epoch resumes at batch
    k + 1 of the same order).

    With ``sample_seeds=True`` each index is a :class:`SampleKey` that also names (seed, epoch,
    rank), from which :class:`SeededSamples` seeds its sample's augmentation."""

    def __init__(
        self,
        size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle=True,
        sample_seeds: bool = False,
    ):
        self.size, self.seed, self.rank, self.world_size = size, seed, rank, world_size
        self.shuffle, self.sample_seeds = shuffle, sample_seeds
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
        indices = order[self.rank :: self.world_size][self.start :].tolist()
        if self.sample_seeds:
            run = (self.seed, self.epoch, self.rank)
            indices = [SampleKey(i, run) for i in indices]
        return iter(indices)

    def __len__(self) -> int:
        return self.per_rank - self.start


def start_epoch(loader: DataLoader, epoch: int, skip_batches: int = 0) -> None:
    """Before iterating ``loader`` in ``epoch``: its order, where to start, and the seed of its
    worker processes (a function of the epoch, so a resumed run draws what the original drew)."""
    loader.sampler.set_epoch(epoch, skip_batches * loader.batch_size)
    if loader.generator is not None:
        sampler = loader.sampler  # augmentation randomness differs per rank
        loader.generator.manual_seed((sampler.seed * 100_003 + epoch) * 1_009 + sampler.rank)


def build_datasets(cfg: DictConfig) -> tuple[Dataset, Dataset]:
    """The training and test sets of a ``dataset`` config: missing files raise FileNotFoundError,
    unreadable ones :class:`DataError` (both name the file and what to do)."""
    if cfg.name not in DATASETS:
        raise ValueError(
            f"unknown dataset.name {cfg.name!r}; available: {sorted(DATASETS)} "
            "(choose one with dataset=<name>)"
        )
    return DATASETS[cfg.name](cfg)


def build_dataloaders(
    cfg: DictConfig, seed: int = 0, rank: int = 0, world_size: int = 1, datasets=None
) -> tuple[DataLoader, DataLoader]:
    """The training loader (an :class:`EpochSampler`: call :func:`start_epoch` before each epoch)
    and the test loader. The training set's augmentation is seeded per sample from (``seed``, epoch,
    rank, index) (:class:`SeededSamples`); the worker processes are seeded from (``seed``, epoch, rank,
    worker) (:func:`start_epoch`). With ``world_size > 1`` (torchrun) each rank loads its shard: the
    training set padded with repeats so that every rank runs the same number of batches, the test set
    through a ``ShardSampler`` (every sample exactly once over the ranks). ``datasets``: the
    (training, test) sets when :func:`build_datasets` already read them."""
    train_set, test_set = build_datasets(cfg) if datasets is None else datasets
    loader_kwargs = dict(
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        # pinned host memory only speeds up copies to a GPU; on a CPU-only machine it is off
        pin_memory=cfg.get("pin_memory", False) and torch.cuda.is_available(),
        persistent_workers=cfg.num_workers > 0 and cfg.get("persistent_workers", True),
    )
    test_sampler = ShardSampler(len(test_set), rank, world_size) if world_size > 1 else None
    train_loader = DataLoader(
        SeededSamples(train_set),
        sampler=EpochSampler(len(train_set), seed, rank, world_size, sample_seeds=True),
        drop_last=False,
        generator=torch.Generator().manual_seed(seed),
        **loader_kwargs,
    )
    test_loader = DataLoader(test_set, shuffle=False, sampler=test_sampler, **loader_kwargs)
    return train_loader, test_loader
