"""Every paper row in configs/experiment composes and trains 2 batches on CPU (narrowed model),
on tiny CIFAR files written in the real format, and trains the method bso.paper.METHODS defines;
the baselines learn the digits with those same overrides."""

import json
import math

import pytest
import torch

from bso import paper
from bso.compose import compose_configs
from bso.data.synthetic import (
    write_cifar,
    write_cifar10_dvs,
    write_dvs128_gesture,
    write_imagenet,
    write_nmnist,
    write_shd,
    write_speech_commands,
)
from bso.train import train
from conftest import CONFIG_DIR, compose_config

EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))

# Each dataset's tiny real-format fixture and the overrides that make a run two small batches.
FIXTURES = {
    "cifar10": (lambda root: write_cifar(root, "cifar10", per_file=2), ["dataset.batch_size=5"]),
    "cifar100": (lambda root: write_cifar(root, "cifar100", per_file=2), ["dataset.batch_size=5"]),
    "imagenet": (
        write_imagenet,
        ["dataset.batch_size=2", "dataset.image_size=32", "dataset.resize=36"],
    ),
    "dvs_cifar10": (write_cifar10_dvs, ["dataset.batch_size=10", "dataset.train_per_class=2"]),
    "gsc": (write_speech_commands, ["dataset.batch_size=3"]),
    "dvs128_gesture": (write_dvs128_gesture, ["dataset.batch_size=11", "dataset.image_size=16"]),
    "nmnist": (write_nmnist, ["dataset.batch_size=10"]),
    "shd": (write_shd, ["dataset.batch_size=20"]),
}
NARROW = {  # per model family: a narrow network, T=2, one epoch, no workers
    "bso.models.SpikingVGG": ["model.layers=8C3-AP2-16C3-AP2"],
    "bso.models.SpikingMLP": ["model.hidden=[16,16]"],
    "bso.models.BiRealResNet18": [
        "model.widths=[8,16,16,16]",
        "model.blocks_per_stage=1",
        "model.stem_stride=1",
    ],
}
COMMON = ["engine.T=2", "dataset.epochs=1", "dataset.num_workers=0"]


def test_there_is_one_experiment_per_table2_method():
    assert {f"cifar10_{m}" for m in paper.METHOD_OVERRIDES} <= set(EXPERIMENTS)


def _method_keys(cfg) -> dict:
    """What makes a method: the engine and, online, its trace and update; the optimizer; the
    weights (and AGMM's gate)."""
    online = cfg.engine._target_.endswith("OnlineEngine")
    return {
        "engine": cfg.engine._target_,
        "trace": cfg.engine.trace if online else None,
        "update": cfg.engine["update"] if online else None,
        "optimizer": cfg.optimizer.name,
        "weights": cfg.model.weights,
        "agmm": bool(cfg.model.get("agmm")),
    }


@pytest.mark.integration
def test_every_experiment_trains_the_method_bso_paper_defines():
    """configs/experiment/<dataset>_<method>[_stage].yaml spells out paper.METHODS[<method>]: the
    same engine, trace, update, optimizer and weights as the method's overrides on that dataset."""
    experiments = compose_configs([[f"experiment={e}", "logger=none"] for e in EXPERIMENTS])
    wanted = []
    for name, cfg in zip(EXPERIMENTS, experiments, strict=True):
        rest = name.removeprefix(f"{cfg.dataset.name}_")
        method = next(m for m in paper.METHOD_OVERRIDES if rest == m or rest.startswith(f"{m}_"))
        wanted.append([f"dataset={cfg.dataset.name}", *paper.METHOD_OVERRIDES[method]])
    for name, cfg, ref in zip(EXPERIMENTS, experiments, compose_configs(wanted), strict=True):
        assert _method_keys(cfg) == _method_keys(ref), name


@pytest.mark.integration
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_runs_two_batches(experiment, tmp_path):
    plain = compose_config(f"experiment={experiment}")
    write, data_overrides = FIXTURES[plain.dataset.name]
    data = write(tmp_path / "data")
    cfg = compose_config(
        f"experiment={experiment}",
        f"dataset.root={data}",
        *data_overrides,
        *NARROW[plain.model._target_],
        *COMMON,
        output_dir=tmp_path / "run",
    )
    assert cfg.engine.T == 2
    record = train(cfg)
    assert record["epoch"] == 1 and math.isfinite(record["test/loss"])
    if cfg.model.weights != "full":
        assert "flip_rate/all" in record
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    for name in ckpt["binary_weights"]:
        if cfg.model.weights == "binary":
            assert set(ckpt["model"][name].unique().tolist()) <= {-1.0, 1.0}


@pytest.mark.integration
@pytest.mark.parametrize("method", [m for m in paper.METHOD_OVERRIDES if m not in ("bso", "tbso")])
def test_baselines_learn_the_digits(method, tmp_path):
    """Same budget as the foundation's T-BSO/BSO test (vgg_tiny, T=4, 8 epochs)."""
    overrides = paper.METHOD_OVERRIDES[method]
    cfg = compose_config(*overrides, "engine.T=4", "save_checkpoint=false", output_dir=tmp_path)
    final = train(cfg)
    assert final["test/acc1"] >= 0.85, (method, final)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    if "model.weights=latent" in overrides:  # sign-flip ratio of the latent weights is logged
        assert records[0]["flip_rate/all"] > 0
