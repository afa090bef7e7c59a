"""Long runs that survive: per-epoch checkpoints, exact resume, clean interruption, run records."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

import bso.loop
import bso.train as bso_train
from bso.data import EpochSampler
from bso.engine import OnlineEngine
from bso.resolvers import run_dir_resolver
from bso.rundir import RunStatus, find_resume_checkpoint
from bso.train import RunInterrupted, evaluate_checkpoint, train
from conftest import ROOT, compose_config

pytestmark = pytest.mark.integration  # trains, spawns processes or builds the wheel

FAST = ("engine.T=2", "dataset.batch_size=128")
# what must be identical between a straight and a resumed run (time, speed and RSS may differ)
EXACT_KEYS = (
    "epoch",
    "train/loss",
    "train/acc1",
    "test/loss",
    "test/acc1",
    "lr",
    "gamma",
    "flip_rate/all",
    "best/epoch",
    "best/test_acc1",
)


def _records(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: r.get(k) for k in EXACT_KEYS} for r in map(json.loads, lines)]


def _state(run_dir, name="last.pt"):
    return torch.load(run_dir / name, weights_only=False)


def _assert_same_training(a, b):
    sa, sb = _state(a), _state(b)
    assert sa["epoch"] == sb["epoch"]
    for key, value in sa["model"].items():
        assert torch.equal(value, sb["model"][key]), key
    moms_a = [s["momentum"] for s in sa["optimizer"]["binary"]["state"].values()]
    moms_b = [s["momentum"] for s in sb["optimizer"]["binary"]["state"].values()]
    assert all(torch.equal(x, y) for x, y in zip(moms_a, moms_b, strict=True))
    assert _records(a) == _records(b)


def _interrupt_on_call(monkeypatch, owner, name, call):
    """Raise SIGINT inside the ``call``-th call of ``owner.name`` (as Ctrl-C would arrive)."""
    original, calls = getattr(owner, name), []

    def wrapped(*args, **kwargs):
        out = original(*args, **kwargs)
        calls.append(1)
        if len(calls) == call:
            signal.raise_signal(signal.SIGINT)
        return out

    monkeypatch.setattr(owner, name, wrapped)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("straight")
    train(compose_config("dataset.epochs=4", *FAST, output_dir=run_dir), overrides=[])
    return run_dir


def test_two_epochs_plus_resumed_two_equal_four_straight(straight_run, tmp_path, monkeypatch):
    """Interrupted after epoch 2 (the signal arrives during its evaluation), then resumed."""
    run_dir = tmp_path / "run"
    _interrupt_on_call(monkeypatch, bso.loop, "evaluate", call=2)
    with pytest.raises(RunInterrupted):
        train(compose_config("dataset.epochs=4", *FAST, output_dir=run_dir), overrides=[])
    status = RunStatus(run_dir).read()
    assert status["status"] == "interrupted" and status["epoch"] == 2
    assert [r["epoch"] for r in _records(run_dir)] == [1, 2]
    monkeypatch.undo()

    cfg = compose_config(f"resume={run_dir}", output_dir=tmp_path / "hydra_dir_of_the_resume")
    final = train(cfg, overrides=[f"resume={run_dir}"])
    assert final["epoch"] == 4 and RunStatus(run_dir).read()["status"] == "completed"
    _assert_same_training(run_dir, straight_run)


def test_interrupt_mid_epoch_resumes_at_the_next_batch(straight_run, tmp_path, monkeypatch):
    """SIGINT during batch 5 of epoch 2 (12 batches per epoch): the batch finishes, the checkpoint
    holds the cut-short epoch's sums, and the resumed run ends bitwise where the straight one did."""
    run_dir = tmp_path / "run"
    _interrupt_on_call(monkeypatch, OnlineEngine, "train_batch", call=12 + 5)
    with pytest.raises(RunInterrupted, match="in epoch 2"):
        train(compose_config("dataset.epochs=4", *FAST, output_dir=run_dir), overrides=[])
    saved = _state(run_dir)
    assert saved["epoch"] == 1 and saved["tally"][0].batches == 5
    monkeypatch.undo()
    train(compose_config(f"resume={run_dir}", output_dir=tmp_path / "x"), overrides=[])
    _assert_same_training(run_dir, straight_run)


def test_resume_refuses_a_changed_recipe_and_a_finished_run(straight_run, tmp_path):
    cfg = compose_config(
        f"resume={straight_run}", "optimizer.binary.gamma=1e-6", output_dir=tmp_path
    )
    with pytest.raises(ValueError, match=r"changes \['optimizer.binary.gamma'\]"):
        train(cfg, overrides=[f"resume={straight_run}", "optimizer.binary.gamma=1e-6"])
    with pytest.raises(ValueError, match="already finished 4 epochs"):
        train(compose_config(f"resume={straight_run}", output_dir=tmp_path), overrides=[])


def test_best_and_last_checkpoints_and_their_1bit_exports(straight_run, tmp_path):
    records = [
        json.loads(line) for line in (straight_run / "metrics.jsonl").read_text().splitlines()
    ]
    best = max(records, key=lambda r: r["test/acc1"])  # the first epoch with the top accuracy
    best = next(r for r in records if r["test/acc1"] == best["test/acc1"])
    assert records[-1]["best/epoch"] == best["epoch"]
    assert _state(straight_run, "best.pt")["epoch"] == best["epoch"]
    status = RunStatus(straight_run).read()
    assert (status["status"], status["best_epoch"]) == ("completed", best["epoch"])
    assert status["best_test_acc1"] == best["test/acc1"]
    for name, expected in (("best", best), ("last", records[-1])):
        cfg = compose_config(
            f"checkpoint={straight_run / f'{name}_1bit.pt'}",
            output_dir=tmp_path / name,
            config_name="eval",
        )
        assert evaluate_checkpoint(cfg, overrides=[])["test/acc1"] == expected["test/acc1"]


def test_eval_builds_the_model_the_checkpoint_was_trained_with(tmp_path):
    """A latent-weight BPTT checkpoint at T=3, evaluated without repeating its options."""
    run_dir = tmp_path / "latent"
    final = train(
        compose_config(
            "engine=bptt",
            "optimizer=adam",
            "model.weights=latent",
            "engine.T=3",
            "dataset.epochs=1",
            output_dir=run_dir,
        ),
        overrides=[],
    )
    cfg = compose_config(
        f"checkpoint={run_dir / 'last.pt'}", output_dir=tmp_path / "eval", config_name="eval"
    )
    assert evaluate_checkpoint(cfg, overrides=[])["test/acc1"] == final["test/acc1"]
    wrong = ["model=vgg11", f"checkpoint={run_dir / 'last.pt'}"]
    with pytest.raises(ValueError, match=r"holds model vgg_tiny .* builds model vgg11") as err:
        evaluate_checkpoint(
            compose_config(*wrong, output_dir=tmp_path / "wrong", config_name="eval"),
            overrides=wrong,
        )
    assert len(str(err.value)) < 1200 and "\n" not in str(err.value)  # one line, not 100
    assert not (tmp_path / "wrong").exists()  # refused before any work


def test_bad_checkpoints_get_clear_errors(tmp_path, straight_run):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    truncated = tmp_path / "truncated.pt"
    data = (straight_run / "last.pt").read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    for path in (garbage, truncated):
        cfg = compose_config(f"checkpoint={path}", output_dir=tmp_path / "e", config_name="eval")
        with pytest.raises(ValueError, match="is not a readable checkpoint"):
            evaluate_checkpoint(cfg, overrides=[])
    with pytest.raises(FileNotFoundError, match="no last.pt"):
        find_resume_checkpoint(str(tmp_path))
    assert not (tmp_path / "e").exists()  # refused before any work: nothing left behind


def test_failed_runs_record_the_error_and_zero_epochs_is_refused(tmp_path, monkeypatch):
    cfg = compose_config(
        "dataset=cifar10",
        "model=vgg_tiny",
        f"dataset.root={tmp_path / 'nowhere'}",
        output_dir=tmp_path / "run",
    )
    with pytest.raises(FileNotFoundError, match="nowhere"):  # missing data: refused before the run
        train(cfg, overrides=[])
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="dataset.epochs must be >= 1"):
        train(compose_config("dataset.epochs=0", output_dir=tmp_path / "zero"), overrides=[])
    assert not (tmp_path / "zero").exists()

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug in the epoch loop")

    monkeypatch.setattr(bso_train, "fit", broken)  # a failure during the run is recorded
    with pytest.raises(ZeroDivisionError):
        train(compose_config(output_dir=tmp_path / "failing"), overrides=[])
    status = RunStatus(tmp_path / "failing").read()
    assert status["status"] == "failed" and "a bug in the epoch loop" in status["error"]


def test_run_directories_never_collide_and_latest_finds_the_newest_unfinished(tmp_path):
    assert run_dir_resolver("outputs", None) != run_dir_resolver("outputs", None)
    for name, status in (("a", "interrupted"), ("b", "completed")):
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "last.pt").write_bytes(b"")
        RunStatus(tmp_path / "runs" / name).write(status)
    assert find_resume_checkpoint("latest", tmp_path) == tmp_path / "runs" / "a" / "last.pt"
    assert run_dir_resolver(str(tmp_path), "latest") == str(tmp_path / "runs" / "a")


def test_epoch_sampler_order_is_a_function_of_the_epoch_and_shards_cover_the_data():
    a, b = EpochSampler(10, seed=1), EpochSampler(10, seed=1)
    a.set_epoch(3)
    b.set_epoch(3)
    assert list(a) == list(b) and sorted(a) == list(range(10))
    b.set_epoch(4)
    assert list(a) != list(b)
    b.set_epoch(3, skip=4)
    assert list(b) == list(a)[4:] and len(b) == 6
    shards = [EpochSampler(10, seed=1, rank=r, world_size=3) for r in range(3)]
    for s in shards:
        s.set_epoch(3)
    assert all(len(list(s)) == 4 for s in shards)
    assert set().union(*map(set, shards)) == set(range(10))


def test_sigterm_stops_cleanly_and_the_printed_command_resumes_exactly(tmp_path):
    """A real process: SIGTERM (Slurm preemption) -> checkpoint, status 'interrupted', exit 130 and
    one line naming the resume command; that command finishes with the uninterrupted run's weights."""
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    common = [
        sys.executable,
        "train.py",
        "logger=none",
        "device=cpu",
        "dataset.epochs=3",
        "engine.T=1",
        *FAST[1:],
    ]

    def run(*args, **kwargs):
        return subprocess.run(
            [*common, *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            **kwargs,
        )

    straight = tmp_path / "straight"
    assert run(f"hydra.run.dir={straight}").returncode == 0
    interrupted = tmp_path / "interrupted"
    proc = subprocess.Popen(
        [*common, f"hydra.run.dir={interrupted}"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "epoch   1/3" in line:
            proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 130, "".join(lines)
    out = "".join(lines)
    assert "Traceback" not in out
    resume_lines = [line for line in lines if "resume with: python train.py resume=" in line]
    assert len(resume_lines) == 1, out
    assert RunStatus(interrupted).read()["status"] == "interrupted"
    command = resume_lines[0].split("resume with: python train.py ")[1].split()
    resumed = run(*command)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert RunStatus(interrupted).read()["status"] == "completed"
    assert not (interrupted / ".hydra" / "overrides.yaml").read_text().count("resume")
    _assert_same_training(interrupted, straight)
