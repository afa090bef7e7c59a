"""Console scripts of the installed package: ``bso-train`` and ``bso-eval`` (this module) and
``bso-report`` (:mod:`bso.report.cli`).

``bso-train [group=option ...] [key=value ...]`` is ``python train.py`` and ``bso-eval
checkpoint=<path> [...]`` is ``python eval.py`` from any directory: the same Hydra entry points over
the configs shipped in the package, writing under ``./outputs`` of the current directory
(:func:`bso.configs_path.config_dir` finds the configs).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable

import hydra
from omegaconf import DictConfig

from bso.configs_path import config_dir

# importing bso.train registers the config resolvers
from bso.train import RunDiverged, RunInterrupted, evaluate_checkpoint, user_error
from bso.train import train as run_training
from bso.validate import old_spelling


def run(cfg: DictConfig, task: Callable[[DictConfig], dict] = run_training) -> float:
    """Run ``task`` (training, or :func:`bso.train.evaluate_checkpoint`) on ``cfg``; returns the
    test top-1 accuracy (for Hydra sweepers).

    Exit status: 0 done (or, with resume=auto, already done), 1 refused or failed (one ``error:``
    line; HYDRA_FULL_ERROR=1 shows the traceback), 3 diverged, 130 interrupted (resume it as the
    log says)."""
    try:
        return task(cfg).get("test/acc1", math.nan)  # nan: a skipped finished job
    except (RunInterrupted, KeyboardInterrupt):  # the run logged how to resume it
        sys.exit(130)
    except RunDiverged:  # the run logged where (status.json: diverged)
        sys.exit(3)
    except Exception as err:
        if not user_error(err):
            raise
        sys.exit(1)  # user_error logged it (once, on rank 0 under torchrun)


def refuse_old_spellings(entry: str, argv: list[str] | None = None) -> None:
    """Before Hydra parses the command line: a key or option that is spelled differently now
    (``optimizer.other.lr=...``, ``model=for_cifar10``, ``engine.eval_only=true``) ends the command
    with one ``error:`` line that gives the spelling to use (exit status 1)."""
    message = old_spelling(sys.argv[1:] if argv is None else argv, entry)
    if message:
        raise SystemExit(f"error: {message}")


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
def _train(cfg: DictConfig) -> float:
    return run(cfg)


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="eval")
def _evaluate(cfg: DictConfig) -> float:
    return run(cfg, evaluate_checkpoint)


def train() -> None:
    """``bso-train``: train a binary spiking network (``bso-train --help`` lists the configs)."""
    refuse_old_spellings("train")
    _train()


def evaluate() -> None:
    """``bso-eval checkpoint=<path>``: a saved model's test-set metrics (configs/eval.yaml)."""
    refuse_old_spellings("eval")
    _evaluate()
