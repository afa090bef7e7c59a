"""Data: the embedded digits, every dataset loader on tiny files in its on-disk format, the released
code's CIFAR pipeline image by image (tests/fixtures/release/README.md: the augmentation golden and
its RNG protocol), Cutout, and the per-sample seeding of the augmentation."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from bso.data import build_dataloaders, build_transform
from bso.data.augment import CIFAR10_POLICY, Cutout
from bso.data.digits import digits_datasets
from bso.data.dvs import ensure_fresh_frame_cache, index_split
from bso.data.synthetic import write_cifar, write_cifar10_dvs, write_imagenet, write_speech_commands
from bso.engine import input_at
from conftest import CONFIG_DIR, compose_config

# --- the embedded digits -------------------------------------------------------------------------


def test_digits_split_is_fixed_stratified_and_disjoint():
    train, test = digits_datasets(test_fraction=0.2, split_seed=0)
    assert len(train) + len(test) == 1797 and len(test) == 360
    x_train, y_train = train.tensors
    x_test, y_test = test.tensors
    assert x_train.shape[1:] == (1, 8, 8)
    # stratified: each class's 20 % (of 178, 182, 177, 183, 181, 182, 181, 179, 174, 180), rounded
    assert torch.bincount(y_test, minlength=10).tolist() == [36, 36, 35, 37, 36, 37, 36, 36, 35, 36]
    assert abs(float(x_train.mean())) < 1e-4 and abs(float(x_train.std()) - 1) < 1e-4
    # no test image appears in the training set
    train_rows = {tuple(r.tolist()) for r in x_train.flatten(1)}
    assert not any(tuple(r.tolist()) in train_rows for r in x_test.flatten(1))
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


# --- the dataset loaders on tiny files ------------------------------------------------------------


def _files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _loaders(dataset, root, *overrides):
    cfg = compose_config(
        f"dataset={dataset}", f"dataset.root={root}", "dataset.num_workers=0", *overrides
    )
    return build_dataloaders(cfg.dataset), cfg


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_loads_through_torchvision_without_writing(name, tmp_path):
    root = write_cifar(tmp_path, name, per_file=4)
    before = _files(root)
    (train, test), cfg = _loaders(name, root, "dataset.batch_size=8")
    x, y = next(iter(train))
    assert x.shape == (8, 3, 32, 32) and y.max() < cfg.dataset.num_classes
    assert len(train.dataset) == 20 and len(test.dataset) == 4
    xt, _ = next(iter(test))
    assert abs(float(xt.mean())) < 1.0  # normalised
    assert _files(root) == before  # nothing written into the dataset folder


def test_imagenet_imagefolder_crops(tmp_path):
    root = write_imagenet(tmp_path)
    before = _files(root)
    (train, test), _ = _loaders("imagenet", root, "dataset.batch_size=2")
    assert next(iter(train))[0].shape == (2, 3, 224, 224)
    assert next(iter(test))[0].shape == (2, 3, 224, 224)
    assert train.dataset.classes == ["n00000000", "n00000001"]
    assert _files(root) == before


def test_dvs_split_is_the_configured_index_split(tmp_path):
    root = write_cifar10_dvs(tmp_path, per_class=12, events=200)
    (train, test), _ = _loaders(
        "dvs_cifar10", root, "engine.T=4", "dataset.train_per_class=9", "dataset.batch_size=6"
    )
    base = train.dataset.base

    def indices(ds):
        return {
            (base.samples[i][1], int(base.samples[i][0].split("_")[-1][:-4])) for i in ds.indices
        }

    tr, te = indices(train.dataset), indices(test.dataset)
    assert tr == {(c, i) for c in range(10) for i in range(9)}  # numeric order: 0..8, not 0,1,10,11
    assert te == {(c, i) for c in range(10) for i in range(9, 12)}
    assert not tr & te
    x, y = next(iter(train))
    assert x.shape == (6, 4, 2, 48, 48)  # [B, T, C, H, W]
    assert input_at(x, 3).shape == (6, 2, 48, 48) and torch.equal(input_at(x, 3), x[:, 3])
    # nothing but spikingjelly's frame cache was written
    written = {p.split("/")[0] for p in _files(root)} - {"events_np"}
    assert written == {"frames_number_4_split_by_number"}


def test_dvs_statistics_are_global_and_the_test_set_is_not_augmented(tmp_path):
    root = write_cifar10_dvs(tmp_path, per_class=3, events=300)
    (train, test), _ = _loaders("dvs_cifar10", root, "engine.T=2", "dataset.train_per_class=2")
    frames = torch.stack([train.dataset.frames(i)[0] for i in range(len(train.dataset))])
    assert train.dataset.mean == pytest.approx(float(frames.mean()), rel=1e-4)
    assert train.dataset.std == pytest.approx(float(frames.std(unbiased=False)), rel=1e-3)
    a, b = test.dataset[0][0], test.dataset[0][0]
    assert torch.equal(a, b)


def test_index_split_by_number():
    samples = [(f"/d/c/cifar10_cat_{i}.npz", 0) for i in (10, 2, 1, 0, 11)]
    train, test = index_split(samples, train_per_class=3)
    assert [samples[i][0][-6:] for i in train] == ["_0.npz", "_1.npz", "_2.npz"]
    assert [samples[i][0][-7:] for i in test] == ["_10.npz", "_11.npz"]


def test_partial_frame_cache_is_rebuilt(tmp_path):
    root = write_cifar10_dvs(tmp_path, per_class=2, events=100)
    _loaders("dvs_cifar10", root, "engine.T=2", "dataset.train_per_class=1")
    frames = root / "frames_number_2_split_by_number"
    victim = next((frames / "cat").glob("*.npz"))
    victim.unlink()  # an interrupted build
    assert ensure_fresh_frame_cache(root, 2, "number") == frames and not frames.exists()
    (train, _), _ = _loaders("dvs_cifar10", root, "engine.T=2", "dataset.train_per_class=1")
    assert victim.exists() and len(train.dataset) == 10
    marker = frames.with_name(frames.name + ".building")
    marker.touch()  # spikingjelly's marker of an unfinished build
    ensure_fresh_frame_cache(root, 2, "number")
    assert not frames.exists() and not marker.exists()


def test_speech_commands_features_and_split(tmp_path):
    root = write_speech_commands(tmp_path)
    before = _files(root)
    (train, test), _ = _loaders("gsc", root, "dataset.batch_size=2")
    assert len(train.dataset) == 6 and len(test.dataset) == 3  # lists hold out 1 test + 1 val each
    x, y = next(iter(train))
    assert x.shape == (2, 1, 32, 32) and y.dtype == torch.long
    # log-Mel scaled to [0, 1] per clip, then (x - 0.5) / 0.5: the same image at any loudness
    from bso.data.speech import read_wav

    wav = read_wav(train.dataset.files[0])
    quiet, loud = train.dataset.features(wav), train.dataset.features(4 * wav)
    torch.testing.assert_close(loud, quiet, rtol=0, atol=1e-4)
    assert -1.0 <= float(x.min()) < -0.5 and 0.9 < float(x.max()) <= 1.0
    assert sorted(train.dataset.class_to_idx) == ["no", "up", "yes"]
    assert _files(root) == before


@pytest.mark.parametrize(
    "dataset,message",
    [
        ("cifar10", "cifar-10-batches-py/ with data_batch_1"),
        ("cifar100", "dataset=cifar100 dataset.download=true"),
        ("imagenet", "train/<class>/\\*.JPEG"),
        ("dvs_cifar10", "events_np/<class>/cifar10_<class>_<i>.npz"),
        ("gsc", "validation_list.txt"),
    ],
)
def test_missing_dataset_says_where_what_and_how(dataset, message, tmp_path):
    cfg = compose_config(f"dataset={dataset}", f"dataset.root={tmp_path / 'nowhere'}")
    with pytest.raises(FileNotFoundError, match=message) as err:
        build_dataloaders(cfg.dataset)
    assert str(tmp_path / "nowhere") in str(err.value)


def test_corrupt_files_are_named(tmp_path):
    root = write_cifar(tmp_path / "c", "cifar10", per_file=2)
    (root / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(RuntimeError, match="corrupt"):
        _loaders("cifar10", root)
    gsc = write_speech_commands(tmp_path / "g")
    (gsc / "yes" / "speaker02_nohash_0.wav").write_bytes(b"RIFF....")
    (train, _), _ = _loaders("gsc", gsc, "dataset.batch_size=1")
    with pytest.raises(RuntimeError, match="speaker02_nohash_0.wav"):
        for _ in train:
            pass


def test_data_dir_comes_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("BSO_DATA_DIR", str(tmp_path / "elsewhere"))
    cfg = compose_config("dataset=cifar10")
    assert cfg.dataset.root == str(tmp_path / "elsewhere")
    assert OmegaConf.select(cfg, "paths.data_dir") == str(tmp_path / "elsewhere")


# --- the released code's CIFAR pipeline ----------------------------------------------------------


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
        build_transform(
            compose_config("dataset=cifar10", "dataset.augment.policy=imgnet").dataset, True
        )


@pytest.mark.integration  # composes every CIFAR experiment file
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


# --- Cutout ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seed", "rows", "cols"),
    [
        (1, (3, 7), (1, 5)),  # centre (y, x) = (5, 3): the whole 4 x 4 hole
        (0, (2, 6), (5, 8)),  # centre (4, 7): clipped at the right border, 4 x 3
        (2, (0, 2), (5, 8)),  # centre (0, 7): clipped at the top and the right, 2 x 3
    ],
)
def test_cutout_zeroes_the_hole_around_the_drawn_centre(seed, rows, cols):
    """Cutout(4) on a 2 x 8 x 8 image: the centre is NumPy's randint(8) for y, then for x; the hole
    is [y - 2, y + 2) x [x - 2, x + 2), clipped, in every channel; nothing else changes."""
    image = torch.arange(1, 129, dtype=torch.float32).view(2, 8, 8)
    np.random.seed(seed)
    out = Cutout(4)(image)
    expected = image.clone()
    expected[:, rows[0] : rows[1], cols[0] : cols[1]] = 0.0
    assert torch.equal(out, expected)
    assert torch.equal(image, torch.arange(1, 129, dtype=torch.float32).view(2, 8, 8))  # a copy
    assert int((out == 0).sum()) == 2 * (rows[1] - rows[0]) * (cols[1] - cols[0])
    # exactly two draws from NumPy's global generator (the release's RNG order for what follows)
    replay = np.random.RandomState(seed)
    replay.randint(8), replay.randint(8)
    assert np.random.randint(2**31) == replay.randint(2**31)


def test_cutout_odd_length_is_the_release_arithmetic_and_bad_lengths_are_refused():
    image = torch.ones(1, 8, 8)
    np.random.seed(1)  # centre (5, 3)
    out = Cutout(5)(image)  # half = 5 // 2 = 2: the same 4 x 4 hole as length 4, as the release
    assert torch.equal((out == 0).nonzero()[[0, -1]], torch.tensor([[0, 3, 1], [0, 6, 4]]))
    assert int((out == 0).sum()) == 16
    with pytest.raises(ValueError, match="Cutout length must be >= 1, got 0"):
        Cutout(0)


@pytest.mark.parametrize("length", [16, 8, 0])
def test_cutout_size_comes_from_the_dataset_config(length):
    """dataset.augment.cutout is the hole's side, after ToTensor and before Normalize; 0: none."""
    cfg = compose_config("dataset=cifar10", f"dataset.augment.cutout={length}").dataset
    steps = build_transform(cfg, train=True).transforms
    names = [type(s).__name__ for s in steps]
    cutouts = [s for s in steps if isinstance(s, Cutout)]
    if length == 0:
        assert not cutouts
        return
    assert [c.length for c in cutouts] == [length]
    assert names.index("ToTensor") < names.index("Cutout") == names.index("Normalize") - 1
    assert not any(isinstance(s, Cutout) for s in build_transform(cfg, train=False).transforms)


# --- reproducible augmentation: seeded per sample from (seed, epoch, rank, index) -----------------


def _epoch_batches(root, epoch, *overrides, rank=0, world_size=1, skip=0, seed=0):
    from bso.data import start_epoch

    cfg = compose_config(
        "dataset=cifar10", f"dataset.root={root}", "dataset.batch_size=4", *overrides
    )
    train, _ = build_dataloaders(cfg.dataset, seed=seed, rank=rank, world_size=world_size)
    start_epoch(train, epoch, skip_batches=skip)
    return [x for x, _ in train]


@pytest.mark.integration
def test_augmentation_is_a_function_of_seed_epoch_rank_and_sample(tmp_path):
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
    assert (
        all(torch.equal(a, b) for a, b in zip(first[2:], resumed, strict=True))
        and len(resumed) == 3
    )
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
    assert (
        len(
            {
                base,
                sample_seed(1, 1, 0, 5),
                sample_seed(0, 2, 0, 5),
                sample_seed(0, 1, 1, 5),
                sample_seed(0, 1, 0, 6),
            }
        )
        == 5
    )


def test_frames_are_built_in_one_thread_where_cpython_cannot_parse_in_parallel():
    """numpy reads event files' headers with ast.literal_eval, which CPython before 3.13 can fail
    on in parallel threads: spikingjelly's frame builder runs in one thread there, and its own
    setting is back afterwards."""
    import sys

    from spikingjelly import configure

    from bso.data.dvs import frame_building_threads

    before = configure.max_threads_number_for_datasets_preprocess
    with frame_building_threads():
        inside = configure.max_threads_number_for_datasets_preprocess
    assert inside == (1 if sys.version_info < (3, 13) else before)
    assert configure.max_threads_number_for_datasets_preprocess == before
