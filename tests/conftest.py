"""Shared test helpers: Hydra composition of tiny configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs"


def compose_config(
    *overrides: str, output_dir: Path | None = None, config_name: str = "train"
) -> DictConfig:
    """Compose configs/train.yaml (or ``config_name``: ``eval``) with ``overrides``, logging nowhere
    but ``output_dir``."""
    base = ["logger=none", "device=cpu"] if config_name == "train" else ["device=cpu"]
    if output_dir is not None:
        base.append(f"paths.output_dir={output_dir}")
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=[*base, *overrides])


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    torch.set_num_threads(2)
    yield
