"""A trained model back from a run directory or a checkpoint file, with the config it was trained
with (for export and on-demand metrics)."""

from __future__ import annotations

from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from bso.checkpoint import load_checkpoint, read_checkpoint
from bso.rundir import BEST, BEST_1BIT, LAST, LAST_1BIT

# what a run directory offers, in the order taken: the best epoch's weights first, 1 bit first
RUN_CHECKPOINTS = (BEST_1BIT, BEST, LAST_1BIT, LAST)


def find_checkpoint(path: str | Path) -> Path:
    """``path`` itself if a file; for a run directory its best (else last) checkpoint."""
    path = Path(path)
    if path.is_dir():
        for name in RUN_CHECKPOINTS:
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(
            f"{path} is a directory without a checkpoint ({', '.join(RUN_CHECKPOINTS)}); give a "
            "run directory written with save_checkpoint=true, or a checkpoint file"
        )
    return path


def load_trained(path: str | Path, device: str | torch.device = "cpu"):
    """(model in eval mode with the checkpoint's weights, the run's config, the checkpoint file)
    from a run directory, a training checkpoint (last.pt / best.pt) or a 1-bit export. The model is
    built from the config stored in the checkpoint, with float storage of its +-1 weights."""
    file = find_checkpoint(path)
    blob = read_checkpoint(file)
    config = blob.get("config")
    if config is None and "model_config" in blob:
        config = {"model": blob["model_config"]}
    if not config or "model" not in config or "_target_" not in config["model"]:
        raise ValueError(
            f"{file} holds no model config (a checkpoint written by bso's training stores it); "
            "build the model yourself and load it with bso.checkpoint.load_checkpoint"
        )
    cfg: DictConfig = OmegaConf.create(config)
    model = instantiate(cfg.model)
    load_checkpoint(model, file, blob)
    return model.to(device).eval(), cfg, file
