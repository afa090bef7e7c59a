"""Hydra: every option composes and instantiates; bad input fails early and clearly."""

import json
import os
import subprocess
import sys

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException
from hydra.utils import instantiate

from bso.models import VGG11
from bso.optim import build_optimizer
from conftest import CONFIG_DIR, ROOT, compose_config

GROUPS = ("dataset", "model", "optimizer", "engine", "logger")


def _options(group):
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml") if not p.stem.startswith("_"))


def test_every_group_has_options():
    for group in GROUPS:
        assert _options(group), group


@pytest.mark.parametrize(
    "group,option", [(g, o) for g in GROUPS for o in _options(g)], ids=lambda v: str(v)
)
def test_every_option_composes_and_instantiates(group, option, tmp_path):
    overrides = [f"{group}={option}"]
    if group == "logger" and option == "wandb":
        overrides.append("logger.mode=disabled")  # no wandb run for a composition check
    if group == "optimizer" and option in ("sgd", "adam"):
        overrides.append("model.weights=latent")  # plain optimizers refuse stored +-1 weights
    cfg = compose_config(*overrides, output_dir=tmp_path)
    model = instantiate(cfg.model)
    engine = instantiate(cfg.engine)
    engine.prepare(model)
    router = build_optimizer(model, cfg.optimizer)
    assert router.binary_names
    logger = instantiate(cfg.logger, _partial_=True)(run_dir=tmp_path, run_config={})
    logger.finish()


def test_unknown_group_option_lists_the_available_ones():
    with pytest.raises(MissingConfigException) as err:
        compose_config("optimizer=adamw_please")
    assert "bso" in str(err.value) and "tbso" in str(err.value)


def test_unknown_key_is_rejected():
    with pytest.raises(ConfigCompositionException, match="engine.tracee"):
        compose_config("engine.tracee=ottt")


@pytest.mark.parametrize(
    "override,message",
    [
        ("engine.trace=eligibility", "engine.trace"),
        ("engine.update=sometimes", "engine.update"),
        ("engine.T=0", "engine.T"),
    ],
)
def test_bad_engine_values_fail_with_their_name(override, message):
    cfg = compose_config(override)
    with pytest.raises(Exception, match=message):
        instantiate(cfg.engine)


def test_bso_on_a_full_precision_model_is_refused(tmp_path):
    from bso.train import train

    cfg = compose_config("optimizer=bso", "model.weights=full", output_dir=tmp_path)
    with pytest.raises(ValueError, match="model.weights=binary"):
        train(cfg)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_command_line_trains_and_writes_the_run_directory(tmp_path):
    """The design's command line, with the default (offline) wandb logger, one short epoch."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "train.py",
            "optimizer=tbso",
            "dataset=digits",
            "engine.T=2",
            "dataset.epochs=1",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "epoch   1/1" in out and "final test accuracy" in out
    names = ("config.yaml", "run_info.json", "metrics.jsonl", "last.pt", "best.pt", "status.json")
    for name in (*names, "train.log"):
        assert (run_dir / name).is_file(), name
    assert "epoch   1/1" in (run_dir / "train.log").read_text()
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["packages"]["torch"] and "commit" in info["git"]
    record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    for key in (
        "test/acc1",
        "train/loss",
        "flip_rate/all",
        "memory/peak_rss_mb",
        "memory/activation_peak_mb",
        "memory/persistent/binary_weights_1bit_mb",
        "memory/persistent/optimizer_state_mb",
        "throughput/train_samples_per_s",
        "lr",
        "gamma",
    ):
        assert key in record, key
    assert list((run_dir / "wandb").glob("offline-run-*")), "no offline wandb run"


@pytest.mark.parametrize(
    "dataset,model,in_channels,classes",
    [("digits", "vgg_tiny", 1, 10), ("cifar10", "vgg11", 3, 10), ("cifar100", "vgg11", 3, 100),
     ("dvs_cifar10", "vgg11", 2, 10), ("gsc", "vgg11", 1, 35), ("imagenet", "resnet18", 3, 1000)],
)
def test_a_dataset_brings_its_paper_model_unless_model_is_given(dataset, model, in_channels, classes):
    cfg = compose_config(f"dataset={dataset}")
    assert (cfg.model.name, cfg.model.in_channels, cfg.model.num_classes) == (model, in_channels, classes)
    assert compose_config(f"dataset={dataset}", "model=resnet19").model.name == "resnet19"


def test_headline_command_trains_the_released_recipe():
    """`python train.py optimizer=tbso dataset=cifar10`: VGG-11, the release's trace, schedules and
    initialisation (constant FP lr, gamma and 1-beta1 x0.1 every 50 epochs, beta2 not decayed)."""
    cfg = compose_config("optimizer=tbso", "dataset=cifar10")
    assert cfg.model.name == "vgg11" and cfg.model.layers == VGG11 and cfg.model.init == "release"
    assert cfg.engine.trace == "ndot" and cfg.engine["update"] == "per_step"
    assert cfg.engine.mse_weight == 0.05
    assert cfg.optimizer.lr_schedule == "constant" and cfg.optimizer.other.lr == 0.1
    assert dict(cfg.optimizer.hparam_decay) == {"every_epochs": 50, "factor": 0.1, "betas": ["beta1"]}
    assert (cfg.optimizer.binary.gamma, cfg.optimizer.binary.threshold) == (5e-7, "code")
