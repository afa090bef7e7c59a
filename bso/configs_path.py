"""Where bso's Hydra configs are: ``bso/configs`` in an installed package (the build maps the
checkout's ``configs/`` there, see setup.py), the checkout's ``configs/`` when ``bso`` is imported
from a checkout (editable install, PYTHONPATH)."""

from __future__ import annotations

from pathlib import Path


def config_dir() -> Path:
    """The directory holding ``train.yaml``, ``eval.yaml`` and the config groups."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "configs", package.parent / "configs"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise FileNotFoundError(
        f"bso's Hydra configs are missing: neither {package / 'configs'} (installed package) nor "
        f"{package.parent / 'configs'} (checkout) holds train.yaml; reinstall bso"
    )
