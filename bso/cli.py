"""Console scripts of the installed package: ``bso-train`` (this module) and ``bso-report``
(:mod:`bso.report_cli`).

``bso-train [group=option ...] [key=value ...]`` is ``python train.py`` from any directory: the same
Hydra entry point over the configs shipped in the package, writing runs under ``./outputs`` of the
current directory (:func:`bso.configs_path.config_dir` finds the configs).
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from bso.configs_path import config_dir
from bso.train import RunInterrupted  # importing bso.train registers the config resolvers
from bso.train import train as run_training


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
def _train(cfg: DictConfig) -> float:
    try:
        return run_training(cfg)["test/acc1"]
    except (RunInterrupted, KeyboardInterrupt):  # the run logged how to resume it
        sys.exit(130)


def train() -> None:
    """``bso-train``: train a binary spiking network (``bso-train --help`` lists the configs)."""
    _train()
