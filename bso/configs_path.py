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


def visible_options(options) -> list[str]:
    """A config group's options as users see them: files named ``_*`` are internal (included by
    other files of the group, e.g. ``model/_spiking``)."""
    return sorted(o for o in options if not o.split("/")[-1].startswith("_"))
