"""DVS128 Gesture, N-MNIST and SHD: each loads its real on-disk format (tiny files written here, read
through spikingjelly's classes), says what is wrong with missing or malformed files, and its model
(vgg_gesture, vgg_nmnist, mlp_shd) trains a few batches through train.py with T-BSO."""

from __future__ import annotations

import json
import os

import h5py
import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from bso.data import build_dataloaders
from bso.data.errors import DataError
from bso.data.neuromorphic import EVENT_DATASETS, frames_folder
from bso.data.synthetic import write_dvs128_gesture, write_nmnist, write_shd
from bso.engine import input_at
from bso.layers import binary_weight_values, named_binary_parameters
from bso.models import SpikingMLP, model_size
from bso.models.mlp import parse_hidden
from bso.optim import build_optimizer
from bso.train import train
from conftest import compose_config

WRITERS = {"dvs128_gesture": write_dvs128_gesture, "nmnist": write_nmnist, "shd": write_shd}
# one sample's frames at T=4: [T, C, H, W] or [T, C]
SHAPES = {"dvs128_gesture": (4, 2, 64, 64), "nmnist": (4, 2, 34, 34), "shd": (4, 700)}


def _loaders(dataset, root, *overrides):
    cfg = compose_config(
        f"dataset={dataset}", f"dataset.root={root}", "dataset.num_workers=0", *overrides
    )
    return build_dataloaders(cfg.dataset)


def _own_frames(t, index, T, size):
    """Events split by number into T frames, counted per index (what split_by=number means)."""
    step = len(t) // T
    frames = np.zeros((T, size))
    for k in range(T):
        end = len(t) if k == T - 1 else (k + 1) * step
        np.add.at(frames[k], index[k * step : end], 1)
    return frames


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_each_dataset_loads_its_real_format(name, tmp_path):
    root = WRITERS[name](tmp_path, per_class=1)
    train, test = _loaders(name, root, "engine.T=4", "dataset.batch_size=5")
    x, y = next(iter(train))
    assert x.shape == (5, *SHAPES[name]) and y.dtype == torch.int64
    assert torch.equal(input_at(x, 2), x[:, 2])  # step t gets frame t ([B, T, C] too)
    classes = EVENT_DATASETS[name].classes
    assert len(train.dataset) == len(test.dataset) == classes  # one sample per class
    assert sorted(test.dataset[i][1] for i in range(classes)) == list(range(classes))
    # nothing but spikingjelly's frame cache was written next to the events
    raw = EVENT_DATASETS[name].raw
    assert {p.name for p in root.iterdir()} == {raw, "frames_number_4_split_by_number"}


def test_shd_frames_are_the_spike_counts_of_each_sample(tmp_path):
    root = write_shd(tmp_path, per_class=1, spikes=203)
    _, test = _loaders("shd", root, "engine.T=4")
    base = test.dataset.base
    with h5py.File(root / "events_h5" / "shd_test.h5") as f:
        for i, (path, label) in enumerate(base.samples):
            sample = int(os.path.basename(path).split(".")[0])  # spikingjelly's <label>/<i>.npz
            assert label == f["labels"][sample]
            t, units = f["spikes/times"][sample], f["spikes/units"][sample]
            expected = _own_frames(t, units.astype(int), 4, 700)
            assert np.array_equal(test.dataset[i][0].numpy(), expected)
            assert expected.sum() == 203


def test_dvs_frames_are_the_event_counts_and_labels_the_folder_numbers(tmp_path):
    root = write_nmnist(tmp_path, per_class=1, events=101)
    _, test = _loaders("nmnist", root, "engine.T=4")
    for i, (path, label) in enumerate(test.dataset.base.samples):
        with np.load(
            path.replace(str(frames_folder(root, 4, "number")), str(root / "events_np"))
        ) as e:
            index = e["p"].astype(int) * 34 * 34 + e["y"].astype(int) * 34 + e["x"].astype(int)
            expected = _own_frames(e["t"], index, 4, 2 * 34 * 34).reshape(4, 2, 34, 34)
        assert np.array_equal(test.dataset[i][0].numpy(), expected)
        assert label == int(os.path.basename(os.path.dirname(path)))
    # DVS128 Gesture: spikingjelly's folder order would make folder "10" class 2; here it is 10
    gesture = write_dvs128_gesture(tmp_path / "g", per_class=1, events=64)
    train, _ = _loaders("dvs128_gesture", gesture, "engine.T=2")
    labels = {os.path.basename(os.path.dirname(p)): y for p, y in train.dataset.base.samples}
    assert labels == {str(c): c for c in range(11)}
    x, _ = train.dataset.frames(0)  # 128 -> 64 px averages 2x2 pixels: a quarter of the count
    assert float(x.sum()) == pytest.approx(64 / 4) and x.shape == (2, 2, 64, 64)


@pytest.mark.parametrize(
    ("name", "layout"),
    [
        ("dvs128_gesture", "events_np/{train,test}/<label 0..10>/*.npz"),
        ("nmnist", "events_np/{train,test}/<label 0..9>/*.npz"),
        ("shd", "events_h5/shd_train.h5 and shd_test.h5"),
    ],
)
def test_missing_dataset_says_where_what_and_how(name, layout, tmp_path):
    with pytest.raises(FileNotFoundError, match="Get the release from") as err:
        _loaders(name, tmp_path / "nowhere")
    message = str(err.value)
    assert str(tmp_path / "nowhere") in message and layout in message and "\n" not in message
    # an incomplete copy names what is missing
    root = WRITERS[name](tmp_path / "partial", per_class=1)
    if name == "shd":
        (root / "events_h5" / "shd_test.h5").unlink()
        missing = "shd_test.h5 is missing"
    else:
        for f in (root / "events_np" / "test" / "7").glob("*.npz"):
            f.unlink()
        missing = r"for labels \[7\] in .*events_np/test"
    with pytest.raises(FileNotFoundError, match=missing):
        _loaders(name, root)


def test_a_corrupt_archive_is_refused_and_kept(tmp_path):
    download = tmp_path / "download"
    download.mkdir()
    for name in ("DvsGesture.tar.gz", "gesture_mapping.csv", "LICENSE.txt", "README.txt"):
        (download / name).write_bytes(b"not the release")
    with pytest.raises(DataError, match=r"DvsGesture.tar.gz is not the released file \(MD5"):
        _loaders("dvs128_gesture", tmp_path)
    assert (download / "DvsGesture.tar.gz").exists()  # spikingjelly would have deleted it
    (download / "README.txt").unlink()
    with pytest.raises(FileNotFoundError, match="README.txt is missing"):
        _loaders("dvs128_gesture", tmp_path)


def test_malformed_shd_files_are_named(tmp_path):
    root = write_shd(tmp_path, per_class=1)
    path = root / "events_h5" / "shd_test.h5"
    path.write_bytes(b"not hdf5")
    with pytest.raises(DataError, match="shd_test.h5 is not a readable HDF5 file"):
        _loaders("shd", root)
    with h5py.File(path, "w") as f:
        f.create_dataset("labels", data=np.zeros(3, dtype=np.uint16))
    with pytest.raises(DataError, match="shd_test.h5 has no 'spikes/times'"):
        _loaders("shd", root)
    write_shd(tmp_path, per_class=1)
    with h5py.File(path, "a") as f:  # a channel the cochlea model does not have
        f["spikes/units"][3] = np.full(500, 700, dtype=np.uint16)
    with pytest.raises(DataError, match=r"shd_test.h5, sample 3: units must be 0..699"):
        _loaders("shd", root)
    assert not frames_folder(root, 4, "number").exists()  # no half-built cache is left


def test_malformed_event_files_and_empty_time_bins_are_named(tmp_path):
    root = write_nmnist(tmp_path, per_class=1)
    victim = root / "events_np" / "train" / "3" / "00003.npz"
    victim.write_bytes(b"not an npz")
    with pytest.raises(DataError, match="00003.npz: not an event file with arrays t, x, y, p"):
        _loaders("nmnist", root)
    write_nmnist(tmp_path, per_class=1)
    # every event in the first tenth of the recording: split_by=time has empty bins
    t = np.sort(np.random.default_rng(0).integers(0, 1000, 200)).astype(np.int64)
    t[-1] = 10_000
    with np.load(victim) as e:
        np.savez(victim, t=t, x=e["x"], y=e["y"], p=e["p"])
    with pytest.raises(DataError, match="00003.npz: no event in time bin 1 of 4 .*split_by=number"):
        _loaders("nmnist", root, "dataset.split_by=time")
    assert not frames_folder(root, 4, "time").exists()
    train, _ = _loaders("nmnist", root, "dataset.split_by=number")  # the same file, by number
    assert len(train.dataset) == 10


def test_an_incomplete_frame_cache_is_rebuilt(tmp_path):
    root = write_shd(tmp_path, per_class=1)
    _loaders("shd", root, "engine.T=2")
    frames = frames_folder(root, 2, "number")
    victim = next((frames / "train" / "5").glob("*.npz"))
    victim.unlink()
    train, _ = _loaders("shd", root, "engine.T=2")
    assert victim.exists() and len(train.dataset) == 20
    marker = frames.with_name(frames.name + ".building")
    marker.touch()  # spikingjelly's marker of an unfinished build
    _loaders("shd", root, "engine.T=2")
    assert not marker.exists() and victim.exists()


# --- models -----------------------------------------------------------------------------------


def test_mlp_layers_weights_and_size():
    model = SpikingMLP(hidden=[512, 512, 512], in_channels=700, num_classes=20)
    binary = named_binary_parameters(model)
    assert [n for n, _ in binary] == ["blocks.1.linear.weight", "blocks.2.linear.weight"]
    for _, w in binary_weight_values(model):
        assert torch.all(w.abs() == 1)
    size = model_size(model)
    assert size.binary_params == 2 * 512 * 512
    # first layer 700*512 + 512, BN 3 x 2 x 512, classifier 512*20 + 20
    assert size.full_precision_params == 700 * 512 + 512 + 3 * 1024 + 512 * 20 + 20
    assert model(torch.rand(3, 700)).shape == (3, 20)
    assert model_size(SpikingMLP(hidden=[64, 64], weights="full")).binary_params == 0
    assert parse_hidden("256-128") == [256, 128] and parse_hidden(32) == [32]
    with pytest.raises(ValueError, match="model.hidden"):
        parse_hidden([])
    with pytest.raises(ValueError, match="model.agmm"):
        SpikingMLP(hidden=[8], agmm=True)


@pytest.mark.parametrize(
    ("model", "binary"),
    [
        ("vgg_gesture", 73_728 + 147_456 + 294_912 + 2 * 589_824),
        ("vgg_nmnist", 73_728 + 2 * 147_456),
    ],
)
def test_dvs_models_sizes_and_shapes(model, binary):
    dataset = {"vgg_gesture": "dvs128_gesture", "vgg_nmnist": "nmnist"}[model]
    cfg = compose_config(f"dataset={dataset}")
    assert cfg.model.name == model  # each dataset selects its model
    net = instantiate(cfg.model)
    assert model_size(net).binary_params == binary
    size = cfg.dataset.image_size
    assert net(torch.rand(2, 2, size, size)).shape == (2, cfg.dataset.num_classes)


@pytest.mark.parametrize("engine", ["online", "bptt"])
@pytest.mark.parametrize("weights", ["binary", "latent", "full"])
def test_mlp_trains_one_batch_with_each_weight_mode_and_engine(weights, engine):
    optimizer = {"binary": "tbso", "latent": "adam", "full": "sgd"}[weights]
    overrides = [f"engine={engine}", "engine.T=3", f"optimizer={optimizer}"]
    overrides += ["engine.update=per_step"] if engine == "online" else []
    cfg = compose_config(
        "dataset=shd", "model.hidden=[32,16]", f"model.weights={weights}", *overrides
    )
    model = instantiate(cfg.model)
    eng = instantiate(cfg.engine)
    eng.prepare(model)
    router = build_optimizer(model, cfg.optimizer)
    x, y = torch.poisson(torch.full((4, 3, 700), 0.2)), torch.randint(0, 20, (4,))
    summed, loss, flips = eng.train_batch(model, router, x, y)
    assert summed.shape == (4, 20) and torch.isfinite(loss)
    assert len(flips) == (0 if weights == "full" else 1)
    for _, w in binary_weight_values(model):  # float or packed (engine.lean) storage
        assert torch.all(w.abs() == 1)


# --- a few batches through train.py ------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("name", sorted(WRITERS))
def test_each_model_trains_a_few_batches_with_tbso(name, tmp_path):
    """train.py's training (bso.train.train) of experiment=<name>_tbso with the dataset's own model
    (not narrowed), T=2, three batches of 4 of its real-format files, then the evaluation."""
    root = WRITERS[name](tmp_path / "data", per_class=1)
    cfg = compose_config(
        f"experiment={name}_tbso",
        f"dataset.root={root}",
        "engine.T=2",
        "dataset.epochs=1",
        "dataset.batch_size=4",
        "dataset.num_workers=0",
        "save_checkpoint=false",
        output_dir=tmp_path / "run",
    )
    final = train(cfg)
    assert cfg.model.name == {"shd": "mlp_shd"}.get(name, f"vgg_{name.split('128_')[-1]}")
    assert final["epoch"] == 1 and np.isfinite(final["train/loss"]) and final["flip_rate/all"] > 0
    (record,) = [
        json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert record["test/acc1"] == final["test/acc1"] and record["firing_rate/all"] > 0


# --- the long-T memory benchmark (scripts/bench/memory_vs_T.py --dataset shd) --------------------


def test_shd_shaped_training_memory_is_flat_online_and_linear_with_bptt():
    """Activation memory of one batch on the SHD shape (a new frame per step): the online methods
    hold one step's tensors whatever T (frame t is a copy, not a view of all T frames); BPTT's grow by
    the same amount with every step."""
    from memory_vs_T import measure

    act = {
        (method, T): measure(method, T, 2, "16-16", "cpu", dataset="shd")["activation_peak_bytes"]
        for method in ("bptt_latent", "tbso", "bso")
        for T in (2, 4, 6)
    }
    for method in ("tbso", "bso"):
        assert act[(method, 2)] == act[(method, 4)] == act[(method, 6)] > 0
    step = act[("bptt_latent", 4)] - act[("bptt_latent", 2)]
    assert step > 0 and act[("bptt_latent", 6)] - act[("bptt_latent", 4)] == step
