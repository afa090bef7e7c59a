"""The released code's CIFAR pipeline, image by image (tests/fixtures/release/README.md: the
augmentation golden and its RNG protocol), and what every paper row composes."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bso.data import build_transform
from bso.data.augment import CIFAR10_POLICY
from conftest import CONFIG_DIR, compose_config

GOLDEN = Path(__file__).parent / "fixtures" / "release" / "release_augment_cifar10_s0.pt"


@pytest.fixture(scope="module")
def golden():
    return torch.load(GOLDEN, weights_only=True)


def _release_protocol(cfg, golden):
    """Build the transforms, seed Python, NumPy and torch once, run the train transform on the 64
    images in order, then the test transform (it draws nothing)."""
    train, test = build_transform(cfg, train=True), build_transform(cfg, train=False)
    s = golden["seed"]
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)
    images = [Image.fromarray(x) for x in golden["images"].numpy()]
    return torch.stack([train(x) for x in images]), torch.stack([test(x) for x in images])


def test_the_policy_table_is_the_releases(golden):
    assert [list(p) for p in CIFAR10_POLICY] == [list(p) for p in golden["policy_table"]]


def test_default_cifar10_transform_reproduces_every_release_image(golden):
    cfg = compose_config("experiment=cifar10_tbso").dataset
    assert [list(cfg.mean), list(cfg.std)] == [list(v) for v in golden["mean_std"]]
    train, test = _release_protocol(cfg, golden)
    for i in range(len(train)):  # every image, train and test, exactly
        assert torch.equal(train[i], golden["train"][i]), f"train image {i}"
        assert torch.equal(test[i], golden["test"][i]), f"test image {i}"
    # the golden exercises what could differ: every sub-policy kind, flips, crops, clipped holes
    assert len(set(golden["policy_index"].tolist())) > 15 and golden["op_applied"].any()
    hole = -torch.tensor(golden["mean_std"][0]) / torch.tensor(golden["mean_std"][1])
    y, x = golden["cutout_center"][0].tolist()
    assert torch.allclose(train[0][:, y, x], hole)  # Cutout ran before normalisation


def test_torchvision_policy_is_a_named_option_that_trains_differently(golden):
    cfg = compose_config("dataset=cifar10", "dataset.augment.policy=torchvision").dataset
    train, _ = _release_protocol(cfg, golden)
    assert not torch.equal(train, golden["train"])
    with pytest.raises(ValueError, match="augment.policy"):
        build_transform(compose_config("dataset=cifar10", "dataset.augment.policy=imgnet").dataset, True)


def test_every_cifar_paper_row_composes_the_release_pipeline():
    """Every CIFAR-10/100 experiment= file and sweep trains the release's pipeline and constants."""
    rows = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("cifar*.yaml"))
    assert len(rows) >= 10
    for row in rows:
        cfg = compose_config(f"experiment={row}").dataset
        name = cfg.name
        assert cfg.augment.policy == "release" and cfg.augment.cutout == 16, row
        expected = {
            "cifar10": ([0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010]),
            "cifar100": ([0.5071, 0.4867, 0.4408], [0.2675, 0.2565, 0.2761]),
        }[name]
        assert (list(cfg.mean), list(cfg.std)) == expected, row
    sweeps = " ".join(p.read_text() for p in (CONFIG_DIR / "sweep").glob("*.yaml"))
    assert "augment" not in sweeps and "dataset.mean" not in sweeps  # no sweep overrides them


# --- reproducible augmentation: seeded per sample from (seed, epoch, rank, index) -----------------


def _epoch_batches(root, epoch, *overrides, rank=0, world_size=1, skip=0, seed=0):
    from bso.data import build_dataloaders, start_epoch

    cfg = compose_config("dataset=cifar10", f"dataset.root={root}", "dataset.batch_size=4", *overrides)
    train, _ = build_dataloaders(cfg.dataset, seed=seed, rank=rank, world_size=world_size)
    start_epoch(train, epoch, skip_batches=skip)
    return [x for x, _ in train]


def test_augmentation_is_a_function_of_seed_epoch_rank_and_sample(tmp_path):
    from bso.data.synthetic import write_cifar

    root = write_cifar(tmp_path, "cifar10", per_file=4)  # 20 training images
    first = _epoch_batches(root, 1, "dataset.num_workers=0")
    torch.manual_seed(123)  # what the main process drew before does not matter
    again = _epoch_batches(root, 1, "dataset.num_workers=0")
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    # the same whatever the number of workers (a resumed run may change it)
    workers = _epoch_batches(root, 1, "dataset.num_workers=2")
    assert all(torch.equal(a, b) for a, b in zip(first, workers, strict=True))
    # a run resumed after 2 batches of the epoch draws what the uninterrupted run drew
    resumed = _epoch_batches(root, 1, "dataset.num_workers=0", skip=2)
    assert all(torch.equal(a, b) for a, b in zip(first[2:], resumed, strict=True)) and len(resumed) == 3
    # other epochs, ranks and seeds augment differently (same images in another order otherwise)
    for other in (
        _epoch_batches(root, 2, "dataset.num_workers=0"),
        _epoch_batches(root, 1, "dataset.num_workers=0", seed=1),
    ):
        assert not any(torch.equal(a, b) for a, b in zip(first, other, strict=True))
    ranks = [_epoch_batches(root, 1, "dataset.num_workers=0", rank=r, world_size=2) for r in (0, 1)]
    assert not any(torch.equal(a, b) for a, b in zip(*ranks, strict=True))


def test_sample_seeds_depend_on_every_key():
    from bso.data import sample_seed

    base = sample_seed(0, 1, 0, 5)
    assert base == sample_seed(0, 1, 0, 5)
    assert len({base, sample_seed(1, 1, 0, 5), sample_seed(0, 2, 0, 5), sample_seed(0, 1, 1, 5),
                sample_seed(0, 1, 0, 6)}) == 5
