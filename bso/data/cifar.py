"""CIFAR-10 / CIFAR-100 through torchvision, with the released code's augmentation (docs/parity.md):
random crop 32 (padding 4), horizontal flip, the release's AutoAugment CIFAR-10 policy
(:mod:`bso.data.augment`; ``augment.policy=torchvision`` for torchvision's, ``none`` for neither),
to tensor, Cutout 16 (before normalisation, as the release), per-channel normalisation with the
release's constants (``dataset.mean`` / ``dataset.std``).

Files are checked for presence, not MD5 (torchvision hashes ~170 MB at every start otherwise;
``dataset.download=true`` verifies the archive when it fetches it).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

from torchvision import datasets, transforms

from bso.data.augment import Cutout, ReleaseCIFAR10Policy
from bso.data.errors import DataError

# the released code's normalisation (configs/dataset/cifar*.yaml hold them as dataset.mean / .std)
RELEASE_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
}
POLICIES = ("release", "torchvision", "none")
URLS = {
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
}


class _PresenceChecked:
    """torchvision's CIFAR loader, checking that the files exist instead of hashing them."""

    def _check_integrity(self) -> bool:
        folder = Path(self.root) / self.base_folder
        return all((folder / name).is_file() for name, _ in self.train_list + self.test_list)

    def _load_meta(self) -> None:
        path = os.path.join(self.root, self.base_folder, self.meta["filename"])
        with open(path, "rb") as f:
            self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}


class CIFAR10(_PresenceChecked, datasets.CIFAR10):
    pass


class CIFAR100(_PresenceChecked, datasets.CIFAR100):
    pass


LOADERS = {"cifar10": CIFAR10, "cifar100": CIFAR100}


def expected_files(name: str) -> list[str]:
    loader = LOADERS[name]
    return [loader.base_folder + "/" + f for f, _ in loader.train_list + loader.test_list] + [
        loader.base_folder + "/" + loader.meta["filename"]
    ]


def check_present(name: str, root: Path) -> None:
    missing = [f for f in expected_files(name) if not (root / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{name} not found under {root.resolve()} (missing: {', '.join(missing)}).\n"
            f"Expected layout: {root}/{LOADERS[name].base_folder}/ with "
            f"{', '.join(f.split('/')[-1] for f in expected_files(name))} (the python version).\n"
            f"Get it with `python train.py dataset={name} dataset.download=true`, or download "
            f"{URLS[name]} and extract it into {root} (set paths.data_dir or BSO_DATA_DIR to move it)."
        )


def cifar_transform(
    train: bool,
    mean=RELEASE_STATS["cifar10"][0],
    std=RELEASE_STATS["cifar10"][1],
    policy: str = "release",
    cutout: int = 16,
) -> transforms.Compose:
    """PIL image -> normalised tensor. Training: crop 32 (pad 4), flip, the AutoAugment ``policy``,
    to tensor, Cutout ``cutout`` (0: none; before normalisation), normalise. Test: to tensor,
    normalise."""
    if policy not in POLICIES:
        raise ValueError(
            f"unknown dataset.augment.policy={policy!r}; choose one of {POLICIES} (release: the "
            "released code's AutoAugment, what the paper rows train; torchvision: torchvision's "
            "AutoAugment CIFAR10 policy; none: no AutoAugment)"
        )
    normalize = transforms.Normalize(tuple(mean), tuple(std))
    if not train:
        return transforms.Compose([transforms.ToTensor(), normalize])
    steps = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()]
    if policy == "release":
        steps.append(ReleaseCIFAR10Policy())
    elif policy == "torchvision":
        steps.append(transforms.AutoAugment(transforms.AutoAugmentPolicy.CIFAR10))
    steps.append(transforms.ToTensor())
    if int(cutout) > 0:
        steps.append(Cutout(int(cutout)))
    return transforms.Compose([*steps, normalize])


def cifar_datasets(
    name: str,
    root: str | Path,
    download: bool = False,
    train_transform=None,
    test_transform=None,
):
    """The training and test sets of ``name`` (cifar10 | cifar100) under ``root``, with these
    transforms (default: :func:`cifar_transform` with the release's recipe and constants)."""
    root = Path(root)
    if not download:
        check_present(name, root)
    mean, std = RELEASE_STATS[name]
    train_transform = train_transform or cifar_transform(True, mean, std)
    test_transform = test_transform or cifar_transform(False, mean, std)
    loader = LOADERS[name]
    try:
        train = loader(root, train=True, transform=train_transform, download=download)
        test = loader(root, train=False, transform=test_transform, download=download)
    except (pickle.UnpicklingError, KeyError, ValueError, EOFError) as err:
        raise DataError(
            f"{name} files under {root / loader.base_folder} are corrupt or not CIFAR pickles "
            f"({type(err).__name__}: {err}); delete them and download again"
        ) from err
    return train, test
