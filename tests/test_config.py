"""Hydra: every option composes and instantiates; bad input fails early and clearly."""

import json
import os
import subprocess
import sys
from importlib import metadata

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException
from hydra.utils import instantiate

from bso.data import input_shape
from bso.models import VGG11
from bso.optim import build_optimizer
from bso.validate import ConfigError, validate
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


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["optimizer.binary.gamma=-1"], "TBSO): flip threshold gamma must be >= 0, got -1.0"),
        (["optimizer.binary.beta1=1"], "TBSO): beta1 must be in [0, 1), got 1.0"),
        (["optimizer=bso", "optimizer.binary.beta=-0.1"], "BSO): beta must be in [0, 1), got -0.1"),
        (["engine.T=0"], "TBSO): num_steps (T) must be >= 1, got 0"),
        (["optimizer.full_precision.lr=-1"], "optimizer.full_precision.lr=-1.0: must be >= 0"),
        (["dataset.batch_size=0"], "dataset.batch_size=0: must be >= 1"),
    ],
)
def test_out_of_range_values_are_refused_by_validate_with_their_key(overrides, message):
    # the binary optimizer's bounds are its constructor's, asked before any work
    with pytest.raises(ConfigError) as err:
        validate(compose_config(*overrides), overrides)
    assert str(err.value).endswith(message)
    assert str(err.value).startswith(("optimizer.binary (bso.optim.", overrides[-1].split("=")[0]))


def test_bso_on_a_full_precision_model_is_refused(tmp_path):
    from bso.train import train

    cfg = compose_config("optimizer=bso", "model.weights=full", output_dir=tmp_path)
    with pytest.raises(ValueError, match="model.weights=binary"):
        train(cfg)
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.integration
def test_command_line_trains_and_writes_the_run_directory(tmp_path):
    """The design's command line, with the default (offline) wandb logger, one short epoch; then
    `python eval.py checkpoint=<run>/best.pt` evaluates it into an evaluation directory of its own."""
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
    names = ("config.yaml", "run_info.json", "environment.json", "metrics.jsonl", "last.pt")
    names += ("best.pt", "status.json")
    for name in (*names, "train.log"):
        assert (run_dir / name).is_file(), name
    assert "epoch   1/1" in (run_dir / "train.log").read_text()
    recorded = json.loads((run_dir / "environment.json").read_text())
    assert recorded["distributions"]["torch"] == metadata.version("torch")
    assert {"hydra-core", "spikingjelly", "omegaconf", "pytest"} <= set(recorded["distributions"])
    assert len(recorded["git"]["commit"]) == 40 and recorded["lock"]["sha256"]
    assert recorded["torch_build"]["torch"] == torch.__version__
    assert recorded["threads"]["torch_intra_op"] > 0
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

    evaluation = subprocess.run(
        [
            sys.executable,
            "eval.py",
            f"checkpoint={run_dir / 'best.pt'}",
            f"paths.log_dir={tmp_path}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    (eval_dir,) = (tmp_path / "evals").iterdir()
    (evaluated,) = [
        json.loads(line) for line in (eval_dir / "metrics.jsonl").read_text().splitlines()
    ]
    assert evaluated["checkpoint"] == str(run_dir / "best.pt")
    assert evaluated["test/acc1"] == record["test/acc1"] and "firing_rate/all" in evaluated
    status = json.loads((eval_dir / "status.json").read_text())
    assert status["status"] == "completed" and status["evaluated"] == str(run_dir / "best.pt")
    assert "test loss" in (eval_dir / "eval.log").read_text()
    assert (eval_dir / "config.yaml").is_file() and not (eval_dir / "best.pt").exists()


# Every (optimizer, dataset) pair's gamma, full-precision lr and decay period, as composed: the
# values that differ per dataset are in configs/optimizer_dataset/<optimizer>_<dataset>.yaml.
PAIR_VALUES = {  # dataset: (BSO's (gamma, lr, every_epochs), T-BSO's)
    "digits": ((5e-7, 0.1, 2), (5e-7, 0.1, 2)),
    "cifar10": ((5e-7, 0.1, 50), (5e-7, 0.1, 50)),
    "cifar100": ((5e-7, 0.1, 50), (5e-7, 0.1, 50)),
    "dvs_cifar10": ((1e-6, 0.1, 50), (1e-6, 0.1, 50)),
    "gsc": ((5e-7, 0.1, 50), (5e-7, 0.1, 50)),
    "imagenet": ((5e-7, 0.1, 50), (1e-6, 0.2, 20)),
    "dvs128_gesture": ((1e-6, 0.1, 25), (1e-6, 0.1, 25)),
    "nmnist": ((1e-6, 0.1, 10), (1e-6, 0.1, 10)),
    "shd": ((5e-7, 0.1, 25), (5e-7, 0.1, 25)),
}


@pytest.mark.parametrize("dataset", sorted(PAIR_VALUES))
def test_each_dataset_sets_its_binary_optimizer_values(dataset):
    for optimizer, expected in zip(("bso", "tbso"), PAIR_VALUES[dataset], strict=True):
        cfg = compose_config(f"optimizer={optimizer}", f"dataset={dataset}").optimizer
        got = (cfg.binary.gamma, cfg.full_precision.lr, cfg.hparam_decay.every_epochs)
        assert got == expected, (optimizer, dataset)
        assert cfg.hparam_decay.factor == 0.1
    for optimizer, lr in (("sgd", 0.1), ("adam", 1e-3)):  # one optimizer for every parameter
        cfg = compose_config(f"optimizer={optimizer}", f"dataset={dataset}").optimizer
        assert cfg.binary is None and cfg.full_precision.lr == lr and "hparam_decay" not in cfg
    # the command line (and an experiment file) still sets any of them
    cfg = compose_config(
        "optimizer=tbso",
        f"dataset={dataset}",
        "optimizer.binary.gamma=2e-6",
        "optimizer.full_precision.lr=0.3",
    ).optimizer
    assert (cfg.binary.gamma, cfg.full_precision.lr) == (2e-6, 0.3)


def test_every_per_dataset_optimizer_file_is_selected_by_its_pair():
    # an `optional` defaults entry skips a file whose name matches no (optimizer, dataset) pair
    # silently: each file must be named <optimizer>_<dataset> of existing options, and composing
    # that pair must give the file's values
    from omegaconf import OmegaConf

    files = sorted((CONFIG_DIR / "optimizer_dataset").glob("*.yaml"))
    assert files
    for path in files:
        optimizer, dataset = path.stem.split("_", 1)
        assert optimizer in _options("optimizer") and dataset in _options("dataset"), path.name
        own = OmegaConf.load(path)
        composed = compose_config(f"optimizer={optimizer}", f"dataset={dataset}").optimizer
        assert OmegaConf.merge(composed, own) == composed, path.name
        assert "tbso" not in compose_config(f"dataset={dataset}").dataset  # one place, not two


def test_the_imagenet_experiments_train_the_released_values():
    pretrain = compose_config("experiment=imagenet_tbso_pretrain")
    assert (pretrain.engine.T, pretrain.dataset.epochs, pretrain.optimizer.binary.gamma) == (
        1,
        100,
        1e-6,
    )
    assert (pretrain.optimizer.full_precision.lr, pretrain.optimizer.hparam_decay.every_epochs) == (
        0.2,
        20,
    )
    finetune = compose_config("experiment=imagenet_tbso_finetune")
    assert (finetune.engine.T, finetune.dataset.epochs) == (4, 30)
    assert (finetune.optimizer.binary.gamma, finetune.optimizer.binary.beta1) == (1e-11, 0.99999999)
    assert finetune.model.name == "resnet18" and finetune.optimizer.full_precision.lr == 0.2


@pytest.mark.parametrize(
    "dataset,shape",
    [
        ("digits", (1, 8, 8)),
        ("cifar10", (3, 32, 32)),
        ("cifar100", (3, 32, 32)),
        ("dvs_cifar10", (2, 48, 48)),
        ("gsc", (1, 32, 32)),
        ("imagenet", (3, 224, 224)),
    ],
)
def test_every_dataset_knows_its_input_shape(dataset, shape):
    assert input_shape(compose_config(f"dataset={dataset}").dataset) == shape


def test_the_resolvers_are_registered_by_the_entry_points_not_by_importing_the_library():
    code = (
        "from omegaconf import OmegaConf\n"
        "import bso.train, bso.rundir, bso.preflight\n"
        "names = ['bso_run_dir', 'bso_rank_dir', 'bso_hydra_subdir', 'bso_sweep_dir', "
        "'bso_config_groups']\n"
        "print([OmegaConf.has_resolver(n) for n in names])\n"
        "import bso.cli\n"
        "print([OmegaConf.has_resolver(n) for n in names])\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [str([False] * 5), str([True] * 5)]


def test_train_and_eval_write_to_their_own_directories():
    from bso.resolvers import register_resolvers

    register_resolvers()  # what the entry points do before Hydra composes: the run directory's
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        train_cfg = compose("train", overrides=["paths.log_dir=logs"], return_hydra_config=True)
        eval_cfg = compose(
            "eval", overrides=["paths.log_dir=logs", "checkpoint=a.pt"], return_hydra_config=True
        )
    assert train_cfg.hydra.run.dir.startswith("logs/runs/") and train_cfg.hydra.job.name == "train"
    assert eval_cfg.hydra.run.dir.startswith("logs/evals/") and eval_cfg.hydra.job.name == "eval"
    assert "checkpoint" not in train_cfg and "optimizer" not in eval_cfg
    assert eval_cfg.metrics == train_cfg.metrics  # one file: configs/metrics/default.yaml


@pytest.mark.parametrize(
    "dataset,model,in_channels,classes",
    [
        ("digits", "vgg_tiny", 1, 10),
        ("cifar10", "vgg11", 3, 10),
        ("cifar100", "vgg11", 3, 100),
        ("dvs_cifar10", "vgg11", 2, 10),
        ("gsc", "vgg11", 1, 35),
        ("imagenet", "resnet18", 3, 1000),
    ],
)
def test_a_dataset_brings_its_paper_model_unless_model_is_given(
    dataset, model, in_channels, classes
):
    cfg = compose_config(f"dataset={dataset}")
    assert (cfg.model.name, cfg.model.in_channels, cfg.model.num_classes) == (
        model,
        in_channels,
        classes,
    )
    assert compose_config(f"dataset={dataset}", "model=resnet19").model.name == "resnet19"
    assert compose_config("model=resnet19", f"dataset={dataset}").model.name == "resnet19"


def test_an_experiment_names_its_model_and_the_command_line_may_change_it():
    assert compose_config("experiment=cifar10_tbso").model.name == "vgg11"
    assert compose_config("experiment=cifar10_tbso", "model=vgg_tiny").model.name == "vgg_tiny"
    assert not list((CONFIG_DIR / "model").glob("for_*.yaml"))  # no per-dataset alias files


def test_headline_command_trains_the_released_recipe():
    """`python train.py optimizer=tbso dataset=cifar10`: VGG-11, the release's trace, schedules and
    initialisation (constant FP lr, gamma and 1-beta1 x0.1 every 50 epochs, beta2 not decayed)."""
    cfg = compose_config("optimizer=tbso", "dataset=cifar10")
    assert cfg.model.name == "vgg11" and cfg.model.layers == VGG11 and cfg.model.init == "release"
    assert cfg.engine.trace == "ndot" and cfg.engine["update"] == "per_step"
    assert cfg.engine.mse_weight == 0.05
    assert cfg.optimizer.lr_schedule == "constant" and cfg.optimizer.full_precision.lr == 0.1
    assert dict(cfg.optimizer.hparam_decay) == {
        "every_epochs": 50,
        "factor": 0.1,
        "betas": ["beta1"],
    }
    assert (cfg.optimizer.binary.gamma, cfg.optimizer.binary.threshold) == (5e-7, "code")
