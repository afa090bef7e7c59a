"""The real dataset loaders on tiny files written in each dataset's on-disk format."""

import pytest
import torch
from omegaconf import OmegaConf

from bso.data import build_dataloaders
from bso.data.dvs import ensure_fresh_frame_cache, index_split
from bso.data.synthetic import write_cifar, write_cifar10_dvs, write_imagenet, write_speech_commands
from bso.engine import input_at
from conftest import compose_config


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
    assert x.shape == (2, 1, 32, 32) and -1.0 <= float(x.min()) and float(x.max()) <= 1.0
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
