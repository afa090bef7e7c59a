"""CIFAR-10 / CIFAR-100 through torchvision, with the paper's augmentation (spec section 4):
random crop 32 (padding 4), horizontal flip, optional AutoAugment (on in the released code), Cutout,
per-channel normalisation.

Files are checked for presence, not MD5 (torchvision hashes ~170 MB at every start otherwise;
``dataset.download=true`` verifies the archive when it fetches it).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch
from torchvision import datasets, transforms

STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
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


class Cutout:
    """Zero one random ``length`` x ``length`` square (clipped at the border) of a CHW tensor."""

    def __init__(self, length: int = 16):
        self.length = length

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        h, w = img.shape[-2:]
        y, x = int(torch.randint(h, (1,))), int(torch.randint(w, (1,)))
        half = self.length // 2
        img = img.clone()
        img[..., max(0, y - half) : y + half, max(0, x - half) : x + half] = 0.0
        return img


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


def cifar_datasets(
    name: str,
    root: str | Path,
    download: bool = False,
    autoaugment: bool = True,
    cutout_length: int = 16,
):
    root = Path(root)
    if not download:
        check_present(name, root)
    mean, std = STATS[name]
    train_tf = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()]
    if autoaugment:
        train_tf.append(transforms.AutoAugment(transforms.AutoAugmentPolicy.CIFAR10))
    train_tf += [transforms.ToTensor(), transforms.Normalize(mean, std)]
    if cutout_length > 0:
        train_tf.append(Cutout(cutout_length))
    test_tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])
    loader = LOADERS[name]
    try:
        train = loader(root, train=True, transform=transforms.Compose(train_tf), download=download)
        test = loader(root, train=False, transform=test_tf, download=download)
    except (pickle.UnpicklingError, KeyError, ValueError, EOFError) as err:
        raise RuntimeError(
            f"{name} files under {root / loader.base_folder} are corrupt or not CIFAR pickles "
            f"({type(err).__name__}: {err}); delete them and download again"
        ) from err
    return train, test
