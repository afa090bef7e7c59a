"""ImageNet as an ImageFolder: ``<root>/train/<class>/*.JPEG`` and ``<root>/val/<class>/*.JPEG``.
Training: RandomResizedCrop 224 + horizontal flip; evaluation: resize 256, center crop 224."""

from __future__ import annotations

from pathlib import Path

from torchvision import datasets, transforms

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def check_present(root: Path) -> None:
    for split in ("train", "val"):
        folder = root / split
        if not folder.is_dir() or not any(p.is_dir() for p in folder.iterdir()):
            raise FileNotFoundError(
                f"ImageNet split '{split}' not found at {folder.resolve()}.\n"
                f"Expected layout: {root}/train/<class>/*.JPEG and {root}/val/<class>/*.JPEG "
                "(validation images sorted into class folders, e.g. with the usual valprep script). "
                "ImageNet cannot be downloaded automatically: get ILSVRC2012 from image-net.org, "
                "then set paths.data_dir / BSO_DATA_DIR or dataset.root."
            )


def imagenet_transform(train: bool, image_size: int = 224, resize: int = 256):
    """PIL image -> normalised tensor, as the released code's ImageNet script: training
    RandomResizedCrop ``image_size`` + horizontal flip; evaluation resize ``resize``, center crop."""
    normalize = transforms.Normalize(MEAN, STD)
    if train:
        steps = [transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip()]
    else:
        steps = [transforms.Resize(resize), transforms.CenterCrop(image_size)]
    return transforms.Compose([*steps, transforms.ToTensor(), normalize])


def imagenet_datasets(root, image_size: int = 224, resize: int = 256):
    root = Path(root)
    check_present(root)
    return (
        datasets.ImageFolder(
            root / "train", transform=imagenet_transform(True, image_size, resize)
        ),
        datasets.ImageFolder(root / "val", transform=imagenet_transform(False, image_size, resize)),
    )
