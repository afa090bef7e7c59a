"""``configs/train.yaml`` composed with overrides, without a Hydra run: what the tests, the
benchmarks and the report use to get the config a ``python train.py <overrides>`` command trains.

    from bso.compose import compose_config
    cfg = compose_config("experiment=cifar10_tbso", "engine.T=2")  # logger=none, device=cpu
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig

from bso.configs_path import config_dir
from bso.resolvers import register_resolvers


def compose_configs(batch: Sequence[Sequence[str]], config_name: str = "train") -> list[DictConfig]:
    """``<config_name>.yaml`` (``train`` or ``eval``) composed with each list of overrides, exactly
    as given (one Hydra initialisation for the whole batch)."""
    from hydra import compose, initialize_config_dir

    register_resolvers()  # configs/hydra/*.yaml read them
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return [compose(config_name=config_name, overrides=list(overrides)) for overrides in batch]


def compose_config(
    *overrides: str, output_dir: Path | str | None = None, config_name: str = "train"
) -> DictConfig:
    """``train.yaml`` (or ``eval.yaml``) with ``overrides`` on the CPU, logging nowhere but
    ``output_dir`` (``paths.output_dir``; without it, interpolations that need a Hydra run stay
    unresolved)."""
    base = ["logger=none", "device=cpu"] if config_name == "train" else ["device=cpu"]
    if output_dir is not None:
        base.append(f"paths.output_dir={output_dir}")
    (cfg,) = compose_configs([[*base, *overrides]], config_name)
    return cfg
