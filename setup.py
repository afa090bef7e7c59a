"""Package layout (the metadata is in pyproject.toml): the ``bso`` packages, plus the Hydra configs
of the checkout's ``configs/`` directory (train.yaml, eval.yaml and the groups) shipped inside the
package as ``bso/configs`` (so an installed ``bso-train`` / ``bso-eval`` finds them; ``python train.py``
and ``python eval.py`` in a checkout read ``configs/`` directly)."""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["bso", "bso.*"]), "bso.configs"],
    package_dir={"bso.configs": "configs"},
    package_data={"bso.configs": ["*.yaml", "**/*.yaml"]},
)
