"""Sweeps through Hydra's launcher plugins: Slurm (submitit) and local parallel processes (joblib).
The configs must compose with the overrides the README shows; the joblib sweep runs (slow)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir

from conftest import CONFIG_DIR, ROOT


def _compose_with_hydra(*overrides):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides), return_hydra_config=True)


def test_slurm_launcher_composes_with_partition_gpus_time_and_requeue():
    cfg = _compose_with_hydra(
        "hydra/launcher=slurm",
        "experiment=cifar100_tbso",
        "engine.T=12",  # one point of the Figure 5 sweep
        "hydra.launcher.partition=gpu",
        "hydra.launcher.gpus_per_node=4",
        "hydra.launcher.timeout_min=2880",
    )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.partition, launcher.gpus_per_node, launcher.timeout_min) == ("gpu", 4, 2880)
    assert launcher.tasks_per_node == 4  # one training process per GPU, joined by bso.distributed
    assert launcher.max_num_timeout > 0  # requeued on preemption / time limit
    assert cfg.engine.T == 12 and cfg.dataset.name == "cifar100"
    with pytest.raises(Exception, match="gpus"):  # a misspelt launcher key is refused
        _compose_with_hydra("hydra/launcher=slurm", "hydra.launcher.gpus=4")


def test_parallel_launcher_composes():
    cfg = _compose_with_hydra("hydra/launcher=parallel", "hydra.launcher.n_jobs=3")
    assert cfg.hydra.launcher._target_.endswith("joblib_launcher.JoblibLauncher")
    assert cfg.hydra.launcher.n_jobs == 3


@pytest.mark.slow
def test_parallel_sweep_trains_each_point_in_its_own_directory(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "train.py",
            "-m",
            "hydra/launcher=parallel",
            "engine.T=1,2",
            "dataset.epochs=1",
            "logger=none",
            "save_checkpoint=false",
            f"hydra.sweep.dir={tmp_path}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted(p.parent.name for p in tmp_path.glob("*/metrics.jsonl"))
    assert len(runs) == 2 and "engine.T=1" in runs[0] and "engine.T=2" in runs[1], runs
