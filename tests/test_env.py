"""bso.env: the environment every run records (environment.json), the lock file's match, the
`bso-env` screen, and `bso-report runs --env` telling results of different environments apart."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from importlib import metadata

import torch

from bso import env, rundir
from bso.report import cli as report_cli
from bso.report import runs, tables
from conftest import ROOT
from test_report import write_run


def test_the_lock_is_read_by_canonical_name_and_matched_exactly(tmp_path):
    lock = tmp_path / "requirements.lock"
    lock.write_text("# header\nHydra_Core==1.3.8\ntorch==2.14.1\n\nnumpy==2.4.6  # via torch\n")
    assert env.read_lock(lock) == {"hydra-core": "1.3.8", "torch": "2.14.1", "numpy": "2.4.6"}
    installed = {"hydra-core": "1.3.8", "torch": "2.14.1", "numpy": "2.4.6", "extra": "1.0"}
    state = env.lock_state(installed, lock)
    assert state["matches"] is True and state["differences"] == {}  # extras do not count
    assert len(state["sha256"]) == 64 and state["path"] == str(lock)
    state = env.lock_state({**installed, "torch": "2.15.0", "numpy": None}, lock)
    assert state["matches"] is False
    assert state["differences"] == {
        "torch": {"locked": "2.14.1", "installed": "2.15.0"},
        "numpy": {"locked": "2.4.6", "installed": None},
    }
    assert env.lock_state(installed, tmp_path / "none.lock")["path"] is None


def test_the_checkouts_lock_pins_every_direct_dependency():
    pins = env.read_lock(ROOT / env.LOCK_NAME)
    for name in ("torch", "torchvision", "hydra-core", "spikingjelly", "pytest", "ruff", "nir"):
        assert name in pins, name


def test_describe_records_every_distribution_git_torch_and_threads():
    record = env.describe()
    installed = record["distributions"]
    assert installed["torch"] == metadata.version("torch") and installed["bso"]
    assert {"pytest", "hydra-core", "spikingjelly", "nirtorch", "ruff"} <= set(installed)
    assert record["git"]["commit"] and len(record["git"]["commit"]) == 40
    assert record["lock"]["path"].endswith("requirements.lock")
    assert record["torch_build"]["torch"] == torch.__version__
    assert record["torch_build"]["cuda_available"] == torch.cuda.is_available()
    assert record["threads"]["torch_intra_op"] == torch.get_num_threads()
    json.dumps(record)  # a JSON file


def test_a_resume_in_another_environment_keeps_the_first_and_says_what_changed(
    tmp_path, monkeypatch, caplog
):
    first = env.describe()
    monkeypatch.setattr(rundir, "describe", lambda: first)
    assert rundir.write_environment(tmp_path) == tmp_path / "environment.json"
    assert rundir.write_environment(tmp_path) is None  # the same environment: nothing new
    changed = json.loads(json.dumps(first))
    changed["distributions"]["torch"] = "9.9.9"
    changed["distributions"].pop("numpy")
    changed["lock"]["sha256"] = "0" * 64
    monkeypatch.setattr(rundir, "describe", lambda: changed)
    with caplog.at_level(logging.WARNING, logger="bso.rundir"):
        path = rundir.write_environment(tmp_path)
    assert path.name.startswith("environment_") and path != tmp_path / "environment.json"
    assert json.loads((tmp_path / "environment.json").read_text()) == first
    assert json.loads(path.read_text())["distributions"]["torch"] == "9.9.9"
    (message,) = [r.getMessage() for r in caplog.records]
    assert f"numpy {first['distributions']['numpy']} -> absent" in message
    assert f"torch {first['distributions']['torch']} -> 9.9.9" in message
    assert "lock sha256" in message and path.name in message


def test_bso_env_prints_one_screen_and_json():
    out = subprocess.run(
        [sys.executable, "-m", "bso.env"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) < 40
    text = out.stdout
    for label in ("Python", "torch", "spikingjelly", "CUDA devices", "threads", "environment"):
        assert any(line.startswith(label) for line in lines), label
    for label in ("C++ compiler", "backend=fused", "fast.compile", "wandb", "private APIs"):
        assert label in text, label
    assert torch.__version__ in text and "requirements.lock" in text
    record = json.loads(
        subprocess.run(
            [sys.executable, "-m", "bso.env", "--json"], cwd=ROOT, capture_output=True, timeout=120
        ).stdout
    )
    assert record["distributions"]["torch"] == metadata.version("torch")


def test_runs_of_one_setting_in_two_environments_get_two_rows(tmp_path, capsys):
    base = env.describe()
    for name, torch_version, accs in (("a", "2.14.1", [0.5, 0.8]), ("b", "2.15.0", [0.5, 0.6])):
        run_dir = write_run(tmp_path / name, ["seed=0"], accs)
        record = json.loads(json.dumps(base))
        record["distributions"]["torch"] = torch_version
        (run_dir / "environment.json").write_text(json.dumps(record))
    write_run(tmp_path / "c", ["seed=0"], [0.5, 0.7])  # recorded no environment
    loaded = runs.load_runs(tmp_path)
    rows, _ = tables.runs_rows(loaded)
    assert len(rows) == 1 and rows[0]["runs"] == "3"  # no --env: one setting
    rows, _ = tables.runs_rows(loaded, ["torch", "lock"])
    by_torch = {r["env:torch"]: r for r in rows}
    assert set(by_torch) == {"2.14.1", "2.15.0", "-"}
    assert by_torch["2.15.0"]["final"] == "60.00" and by_torch["-"]["env:lock"] == "-"
    lock = base["lock"]["sha256"][:12] + ("" if base["lock"]["matches"] else "*")
    assert by_torch["2.14.1"]["env:lock"] == lock
    report_cli.main(["runs", str(tmp_path), "--env", "torch"])
    assert "| env:torch |" in capsys.readouterr().out
