"""Runs that cannot lose work: one run (and one live process) per run directory, printed commands
that paste, divergence stops, I/O failures lose no record, checkpoints that do not fit and bad
config values are refused before any work with one clear message."""

from __future__ import annotations

import errno
import json
import logging
import os
import shlex
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from hydra.core.override_parser.overrides_parser import OverridesParser

import bso.checkpoint as bso_checkpoint
from bso import report as rp
from bso.divergence import FiniteCheck, RunDiverged
from bso.paper import cells
from bso.preflight import config_for_weights
from bso.resolvers import run_dir_resolver
from bso.rundir import MetricsFile, RunRefused, RunStatus, claim, resume_command
from bso.runlock import RunLock
from bso.train import evaluate_checkpoint, train
from bso.validate import ConfigError
from conftest import ROOT, compose_config

pytestmark = pytest.mark.integration  # trains runs, fills disks, spawns train.py

TINY = ("engine.T=1", "dataset.batch_size=128")
ENV = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _train(run_dir, *overrides):
    return train(compose_config(*TINY, *overrides, output_dir=run_dir), overrides=list(overrides))


def _snapshot(run_dir) -> dict:
    return {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A completed 1-epoch run (read-only for the tests: copy it to change it)."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    _train(run_dir, "dataset.epochs=1")
    return run_dir


def _copy(run_dir, to):
    shutil.copytree(run_dir, to)
    (to / "run.lock").unlink(missing_ok=True)
    return to


# --- 1. a run directory belongs to one run -----------------------------------------------------


def test_a_fresh_run_refuses_a_directory_that_holds_a_run(finished, tmp_path):
    before = _snapshot(finished)
    with pytest.raises(RunRefused, match=r"already holds a run \(completed after epoch 1.*resume="):
        _train(finished, "dataset.epochs=1")
    assert _snapshot(finished) == before  # best.pt, last.pt, metrics.jsonl, status untouched
    assert not (finished / "run.lock").exists()
    copy = _copy(finished, tmp_path / "copy")
    (copy / ".hydra" / "run_2026").mkdir(parents=True)  # where Hydra put the new command's files
    (copy / ".hydra" / "run_2026" / "overrides.yaml").write_text("- seed=7\n")
    claim(copy, overwrite=True, hydra_subdir=".hydra/run_2026")  # the old run's files go
    assert not any((copy / name).exists() for name in ("last.pt", "best.pt", "metrics.jsonl"))
    assert (copy / ".hydra" / "overrides.yaml").read_text() == "- seed=7\n"
    assert not (copy / ".hydra" / "run_2026").exists()
    claim(tmp_path / "empty", overwrite=False)  # a new directory is always fine


# --- 2. one live process per run directory ------------------------------------------------------


def test_a_second_live_process_is_refused_and_a_stale_lock_taken_over(finished, tmp_path, caplog):
    run_dir = _copy(finished, tmp_path / "run")
    with RunLock(run_dir):  # this process holds it, as a first `train.py` would
        owner = json.loads((run_dir / "run.lock").read_text())
        assert owner == {**owner, "pid": os.getpid(), "host": socket.gethostname()}
        with pytest.raises(RunRefused, match=f"in use by process {os.getpid()} on host"):
            _train(run_dir, f"resume={run_dir}", "dataset.epochs=2")
    assert RunStatus(run_dir).read()["status"] == "completed"  # the refusal changed nothing
    dead = subprocess.Popen(["true"])
    dead.wait()
    (run_dir / "run.lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    with caplog.at_level(logging.WARNING), RunLock(run_dir) as lock:
        assert (
            lock.held and f"process {dead.pid}" in caplog.text and "no longer runs" in caplog.text
        )
    (run_dir / "run.lock").write_text(json.dumps({"pid": 1, "host": "another-node"}))
    with pytest.raises(RunRefused, match="another-node.*delete .*run.lock"):
        RunLock(run_dir).acquire()  # another node's live job (its heartbeat is fresh)
    old = os.stat(run_dir / "run.lock").st_mtime - RunLock.STALE_S - 1
    os.utime(run_dir / "run.lock", (old, old))  # ... killed there: no heartbeat for STALE_S
    with caplog.at_level(logging.WARNING), RunLock(run_dir) as lock:
        assert "another-node" in caplog.text and "untouched for" in caplog.text


# --- 3. printed commands paste; a refused resume leaves the status as it was --------------------


def test_the_printed_resume_command_pastes_for_a_multirun_directory(finished, tmp_path):
    job = _copy(finished, tmp_path / "multirun" / "2026-01-01_00-00-00" / "0_engine.T=2,seed=1")
    command = resume_command(job)
    argv = shlex.split(command)  # what the shell hands to train.py
    assert argv[:2] == ["python", "train.py"]
    (override,) = OverridesParser.create().parse_overrides(argv[2:])  # what Hydra makes of it
    assert (override.key_or_group, override.value()) == ("resume", str(job))
    assert run_dir_resolver("outputs", override.value()) == str(job)
    cfg = compose_config(argv[2], output_dir=tmp_path / "x")
    assert cfg.resume == str(job)
    assert shlex.split(resume_command(job, world_size=4))[:3] == [
        "torchrun",
        "--nproc_per_node=4",
        "train.py",
    ]


def test_a_mid_epoch_torchrun_checkpoint_is_refused_in_one_process_and_keeps_its_status(
    finished, tmp_path
):
    run_dir = _copy(finished, tmp_path / "run")
    blob = torch.load(run_dir / "last.pt", weights_only=False)
    blob["tally"][0].batches = 3
    blob["tally"], blob["rng"] = blob["tally"] * 2, blob["rng"] * 2  # as 2 ranks write it
    torch.save(blob, run_dir / "last.pt")
    RunStatus(run_dir).write("interrupted", epoch=1)
    status = (run_dir / "status.json").read_text()
    with pytest.raises(
        ValueError,
        match=r"2 process\(es\) in the middle of an epoch.*"
        r"torchrun --nproc_per_node=2 train.py resume=",
    ):
        _train(tmp_path / "hydra", f"resume={run_dir}", "dataset.epochs=2")
    assert (run_dir / "status.json").read_text() == status


def test_another_world_size_at_an_epoch_boundary_warns_that_the_global_batch_changes(
    finished, caplog
):
    from bso.preflight import check_world_size

    blob = torch.load(finished / "last.pt", weights_only=False)
    blob["tally"], blob["rng"] = blob["tally"] * 4, blob["rng"] * 4  # written by 4 processes
    with caplog.at_level(logging.WARNING):
        check_world_size(blob, finished / "last.pt")
    assert (
        "trained by 4 process(es), this run has 1: the global batch changes from 4 x 128 "
        "to 1 x 128" in caplog.text
    )


# --- 4. divergence ------------------------------------------------------------------------------


def test_a_diverging_run_stops_as_diverged_and_is_never_a_result(tmp_path):
    nan = [
        "model.weights=full",
        "optimizer=sgd",
        "optimizer.full_precision.lr=1e8",
        "dataset.epochs=2",
    ]
    with pytest.raises(RunDiverged, match=r"non-finite .* epoch 1, batch \d+") as err:
        _train(tmp_path / "nan", *nan)
    status = RunStatus(tmp_path / "nan").read()
    assert status["status"] == "diverged" and status["diverged_epoch"] == 1
    assert status["diverged_batch"] == err.value.batch >= 1
    assert not list((tmp_path / "nan").glob("best*.pt"))
    (run,) = rp.load_runs(tmp_path)
    assert not run.completed and run.state() == "diverged (epoch 0/2)"
    rows, _ = rp.runs_rows([run])
    assert rows[0]["final"] == "-" and rows[0]["runs"] == "0 (+diverged (epoch 0/2))"


def test_the_finite_check_reads_its_device_flag_only_when_due():
    check = FiniteCheck(epoch=3, device=torch.device("cpu"))
    assert check.every == 1  # on the CPU reading the flag costs nothing
    check.every = 5  # as on a GPU with divergence.check_every=5
    for batch, loss in enumerate([1.0, float("nan"), 2.0, float("inf")], start=1):
        check.observe(torch.tensor(loss), batch)
        assert not check.due(batch)
    with pytest.raises(RunDiverged, match="epoch 3, batch 2"):  # the first bad batch
        check.check()
    check.check_model(torch.nn.Linear(2, 2))  # finite weights pass
    bad = torch.nn.Linear(2, 2)
    bad.bias.data[0] = float("nan")
    with pytest.raises(RunDiverged, match="weights became non-finite .* bias"):
        check.check_model(bad)


# --- 6. I/O failures ----------------------------------------------------------------------------


def test_a_full_disk_fails_the_run_and_loses_no_epoch(tmp_path, monkeypatch):
    """The checkpoint write of epoch 2 hits a full disk half-way: status `failed` with the error,
    no temp file, epoch 2's record kept; freeing space and resuming trains epoch 2 again."""
    run_dir = tmp_path / "run"
    saves, real_save = [], torch.save

    def full_disk(obj, path, *args, **kwargs):
        saves.append(path)
        if isinstance(obj, dict) and obj.get("epoch") == 2:
            with open(path, "wb") as f:
                f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(bso_checkpoint.torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        _train(run_dir, "dataset.epochs=2")
    monkeypatch.undo()
    status = RunStatus(run_dir).read()
    assert status["status"] == "failed" and "No space left" in status["error"]
    assert not list(run_dir.glob(".*.tmp")) and not (run_dir / "run.lock").exists()
    assert [r["epoch"] for r in MetricsFile(run_dir).records()] == [1, 2]
    final = _train(tmp_path / "x", f"resume={run_dir}", "dataset.epochs=2")
    records = MetricsFile(run_dir).records()
    assert [r["epoch"] for r in records] == [1, 2] and records[-1]["test/acc1"] == final[
        "test/acc1"
    ]


def test_a_best_checkpoint_lost_to_a_full_disk_is_restored_on_resume(tmp_path, monkeypatch, caplog):
    import bso.rundir

    run_dir = tmp_path / "run"

    def full_disk(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(bso.rundir, "copy_atomic", full_disk)  # epoch 1's best.pt copy fails
    with pytest.raises(OSError):
        _train(run_dir, "dataset.epochs=2")
    monkeypatch.undo()
    assert not (run_dir / "best.pt").exists() and (run_dir / "last.pt").exists()
    with caplog.at_level(logging.WARNING):
        _train(tmp_path / "x", f"resume={run_dir}", "dataset.epochs=2")
    assert "did not hold the best epoch 1; copied from last.pt" in caplog.text
    best = MetricsFile(run_dir).records()[-1]["best/epoch"]
    assert torch.load(run_dir / "best.pt", weights_only=False)["epoch"] == best


def test_a_lost_metrics_record_is_recreated_from_the_checkpoint(tmp_path):
    metrics = MetricsFile(tmp_path)
    metrics.write({"epoch": 1, "test/acc1": 0.5})
    with metrics.path.open("a") as f:
        f.write('{"epoch": 2, "test/ac')  # cut short by a crash
    metrics.truncate_after(2, record={"epoch": 2, "test/acc1": 0.75})
    assert metrics.records() == [{"epoch": 1, "test/acc1": 0.5}, {"epoch": 2, "test/acc1": 0.75}]


# --- 7. a checkpoint that does not fit ---------------------------------------------------------


def test_a_checkpoint_of_another_dataset_is_refused_before_any_work(finished, tmp_path):
    blob = torch.load(finished / "best_1bit.pt", weights_only=False)
    cifar = compose_config("dataset=cifar10", "model=vgg_tiny")
    blob["config"]["dataset"] = dict(cifar.dataset)
    blob["config"]["model"]["in_channels"] = 3
    path = tmp_path / "cifar_best_1bit.pt"
    torch.save(blob, path)
    refused = tmp_path / "refused"
    shapes = (
        r"trained on cifar10 \(in_channels=3, num_classes=10, image_size=32\).*"
        r"dataset=digits \(in_channels=1, num_classes=10, image_size=8\): in_channels, "
        r"image_size differ"
    )
    evaluation = [f"checkpoint={path}", "dataset=digits"]
    with pytest.raises(ValueError, match=shapes + ". Leave dataset=... out"):
        evaluate_checkpoint(
            compose_config(*evaluation, output_dir=refused, config_name="eval"),
            overrides=evaluation,
        )
    assert not refused.exists()
    with pytest.raises(ValueError, match=shapes + ". Fine-tune on a dataset of the same shape"):
        _train(refused, f"init_from={path}")
    assert not refused.exists()
    # eval without dataset=...: the checkpoint's own dataset, model and T
    evaluated = config_for_weights(
        compose_config(config_name="eval"), blob["config"], [], path, evaluate=True
    )
    assert (evaluated.dataset.name, evaluated.model.in_channels) == ("cifar10", 3)
    assert evaluated.engine.T == blob["config"]["engine"]["T"] == 1


# --- 8. config values --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override,message",
    [
        ("engine.T=2.5", r"engine.T=2.5: expected an integer"),
        ("dataset.epochs=1.5", r"dataset.epochs=1.5: expected an integer"),
        ("+dataset.batchsize=8", r"no config file defines dataset.batchsize.*dataset.batch_size=8"),
        ("optimizer.binary.gamma=1e-6x", r"optimizer.binary.gamma='1e-6x': expected a number"),
        ("seed=abc", r"seed='abc': expected an integer"),
        ("model.neuron.tau=0", r"model.neuron.tau=0.0: must be > 0"),
    ],
)
def test_bad_values_and_unread_keys_are_refused_with_their_key(override, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        _train(tmp_path / "run", override)
    assert not (tmp_path / "run").exists()


def test_typed_values_are_converted_and_constructor_arguments_may_be_added(tmp_path):
    from bso.validate import validate

    cfg = compose_config("seed='3'", "+optimizer.full_precision.nesterov=false")
    cfg = validate(cfg, ["seed='3'", "+optimizer.full_precision.nesterov=false"])
    assert cfg.seed == 3 and isinstance(cfg.seed, int)
    assert isinstance(cfg.optimizer.binary.gamma, float)


# --- 9. reports ---------------------------------------------------------------------------------


def test_the_runs_report_skips_evaluations_and_its_commands_name_real_files(finished, tmp_path):
    run_dir = _copy(finished, tmp_path / "runs" / "trained")
    evaluate_checkpoint(
        compose_config(
            f"checkpoint={run_dir / 'best.pt'}",
            config_name="eval",
            output_dir=tmp_path / "runs" / "evaluated",
        ),
        overrides=[],
    )
    from bso.report import cli as report_cli

    title, rows, _, _ = report_cli.build(report_cli.parse_args(["runs", str(tmp_path / "runs")]))
    assert title.startswith("1 runs") and rows[0]["runs"] == "1"
    commands = " ".join(c.command + " " + (c.before or "") for c in cells("table2"))
    assert "checkpoint.pt" not in commands and "<" not in commands
    assert "init_from=outputs/imagenet_tbso_pretrain/best.pt" in commands


# --- 10. a relaunched sweep --------------------------------------------------------------------


def test_resume_auto_on_a_completed_run_returns_its_result_and_writes_nothing(finished, tmp_path):
    before = _snapshot(finished)
    record = _train(finished, "resume=auto", "dataset.epochs=1")
    assert record == MetricsFile(finished).records()[-1]
    assert _snapshot(finished) == before
    no_checkpoints = _copy(finished, tmp_path / "run")  # a save_checkpoint=false run
    for path in no_checkpoints.glob("*.pt"):
        path.unlink()
    before = _snapshot(no_checkpoints)
    assert _train(no_checkpoints, "resume=auto", "dataset.epochs=1") == record
    assert _snapshot(no_checkpoints) == before


def test_a_relaunched_sweep_skips_finished_jobs_and_exits_0(tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable,
        "train.py",
        "-m",
        "logger=none",
        "device=cpu",
        "dataset.epochs=1",
        *TINY,
        "seed=5",
        "resume=auto",
        f"hydra.sweep.dir={sweep}",
    ]
    first = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    (job,) = [p for p in sweep.iterdir() if p.is_dir() and (p / "last.pt").exists()]
    again = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "already completed 1 epochs; nothing to do" in again.stdout + again.stderr
    assert [r["epoch"] for r in MetricsFile(job).records()] == [1]


# --- 11. short errors, nothing left behind ------------------------------------------------------


def test_user_errors_are_one_line_and_leave_no_directory(tmp_path):
    logs = tmp_path / "logs"  # where a new run directory would appear
    for args in (["resume=" + str(tmp_path / "no_such_run")], ["engine.T=2.5"]):
        proc = subprocess.run(
            [sys.executable, "train.py", "logger=none", f"paths.log_dir={logs}", *args],
            cwd=ROOT,
            env=ENV,
            capture_output=True,
            text=True,
            timeout=300,
        )
        out = proc.stdout + proc.stderr
        assert proc.returncode == 1, out
        assert "Traceback" not in out and out.count("error:") == 1 and len(out.splitlines()) <= 3, (
            out
        )
        assert not list(logs.glob("runs/*")), list(logs.glob("runs/*"))
