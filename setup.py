"""Package layout (the metadata is in pyproject.toml): the ``bso`` packages, plus the Hydra configs
of the checkout's ``configs/`` directory shipped inside the package as ``bso/configs`` (so an
installed ``bso-train`` finds them; ``python train.py`` in a checkout reads ``configs/`` directly)."""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["bso", "bso.*"]), "bso.configs"],
    package_dir={"bso.configs": "configs"},
    package_data={"bso.configs": ["*.yaml", "**/*.yaml"]},
)
