"""The parts of a run built from its config: the seed, the model and its engine, weights from a
checkpoint (with an error that names both models). :mod:`bso.train` builds the run with them and
:mod:`bso.preflight` builds a throwaway copy to refuse what would fail."""

from __future__ import annotations

import random

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from bso import backend
from bso.checkpoint import load_checkpoint
from bso.validate import constructor_error


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_model(cfg: DictConfig, device: torch.device, run_on: torch.device | None = None):
    """The model on ``device`` and its engine, prepared, on ``cfg.backend`` (``run_on``: the run's
    device, where the model is built elsewhere, as preflight's CPU copy)."""
    model = _instantiate(cfg, "model").to(device)
    engine = _instantiate(cfg, "engine")
    engine.prepare(model)
    backend.apply(model, cfg.backend, run_on or device)  # after prepare: fused needs online neurons
    return model, engine


def _instantiate(cfg: DictConfig, key: str, **kwargs):
    """``instantiate(cfg.<key>)``; a constructor that refuses its arguments raises ConfigError with
    the constructor's own message (:func:`bso.validate.constructor_error`)."""
    from hydra.errors import InstantiationException

    try:
        return instantiate(cfg[key], **kwargs)
    except InstantiationException as err:
        raise constructor_error(key, cfg[key], err) from err


def load_weights(model, path, blob: dict, saved: dict | None, cfg: DictConfig) -> dict:
    """Load ``path`` (read as ``blob``) into ``model`` with an error that names the checkpoint's
    model and this one."""
    try:
        return load_checkpoint(model, path, blob)
    except ValueError as err:
        theirs = (saved or {}).get("model", {})
        held = (
            f"{theirs.get('name', '?')} ({theirs.get('_target_', '?')}, layers="
            f"{theirs.get('layers', '-')}, weights={theirs.get('weights', '?')})"
        )
        built = (
            f"{cfg.model.get('name')} ({cfg.model._target_}, layers={cfg.model.get('layers', '-')}, "
            f"weights={cfg.model.weights})"
        )
        if held == built:  # the same model: the file's weights are not what its config says
            raise ValueError(
                f"{path} says it holds model {held}, but its weights do not fit that model: the file "
                f"is damaged or was changed; use another checkpoint of the run. {err}"
            ) from err
        raise ValueError(
            f"{path} holds model {held}, but this run builds model {built}. {err}"
        ) from err
