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

# importing bso.train registers the config resolvers
from bso.train import RunDiverged, RunInterrupted, user_error
from bso.train import train as run_training


def run(cfg: DictConfig) -> float:
    """Train ``cfg``; returns the final test top-1 accuracy (for Hydra sweepers).

    Exit status: 0 done (or, with resume=auto, already done), 1 refused or failed (one ``error:``
    line; HYDRA_FULL_ERROR=1 shows the traceback), 3 diverged, 130 interrupted (resume it as the
    log says)."""
    try:
        return run_training(cfg).get("test/acc1", float("nan"))  # nan: a skipped finished job
    except (RunInterrupted, KeyboardInterrupt):  # the run logged how to resume it
        sys.exit(130)
    except RunDiverged:  # the run logged where (status.json: diverged)
        sys.exit(3)
    except Exception as err:
        if not user_error(err):
            raise
        sys.exit(1)  # user_error logged it (once, on rank 0 under torchrun)


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
def _train(cfg: DictConfig) -> float:
    return run(cfg)


def train() -> None:
    """``bso-train``: train a binary spiking network (``bso-train --help`` lists the configs)."""
    _train()
