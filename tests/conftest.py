"""Shared test helpers: the checkout's paths, Hydra composition of tiny configs (bso.compose)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bso.compose import compose_config

__all__ = ["CONFIG_DIR", "ROOT", "compose_config"]

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs"


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    torch.set_num_threads(2)
    yield
