"""The installable package: the configs ship inside the wheel, the console scripts (bso-train,
bso-eval, bso-report, bso-env) are declared, the version has one source. (The fresh-virtual-environment
check, `pip install <checkout>` then `bso-train` elsewhere, is in docs/library.md.)"""

from __future__ import annotations

import subprocess
import sys
import tomllib
import zipfile

import pytest

import bso
from bso.configs_path import config_dir
from conftest import CONFIG_DIR, ROOT


def test_config_dir_is_the_checkouts_configs_here():
    assert config_dir() == CONFIG_DIR.resolve()


@pytest.mark.integration
def test_the_wheel_holds_every_config_and_the_console_scripts(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(ROOT),
            "--no-deps",
            "--no-build-isolation",
            "--quiet",
            "--disable-pip-version-check",
            "-w",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0:
        pytest.fail(f"pip wheel failed:\n{proc.stdout}\n{proc.stderr}")
    (wheel,) = tmp_path.glob("bso-*.whl")
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert wheel.name.startswith(f"bso-{version}-")
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = sorted(p.relative_to(CONFIG_DIR).as_posix() for p in CONFIG_DIR.rglob("*.yaml"))
    assert len(configs) > 50
    missing = [c for c in configs if f"bso/configs/{c}" not in names]
    assert not missing, f"configs missing from the wheel: {missing}"
    for module in ("__init__", "cli", "conversion", "step", "report/cli", "optim/case", "train"):
        assert f"bso/{module}.py" in names
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry).decode()
    assert "bso-train = bso.cli:train" in text and "bso-report = bso.report.cli:main" in text
    assert "bso-eval = bso.cli:evaluate" in text and "bso-env = bso.env:main" in text
    assert {
        "bso/configs/train.yaml",
        "bso/configs/eval.yaml",
    } <= names  # both entry points' configs
    assert bso.__version__ == version
