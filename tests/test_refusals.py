"""The promise "a user's mistake is one ``error:`` line and exit status 1", checked case by case.

Each row of REFUSALS is a command a user may type (train.py / eval.py overrides on the digits,
``logger=none``), the exit status it must end with, the one line it must print on stderr (a regex),
and nothing may be left under the log directory. The commands run in this process through the
console scripts' entry points (:func:`bso.cli.train`, :func:`bso.cli.evaluate`: Hydra, the
command-line check, the run), two of them also as real ``python train.py`` processes. Damaged
files (checkpoints, data, status, metrics) are named, and never change a finished run's status.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import bso.checkpoint as bso_checkpoint
import bso.cli as cli
import bso.rundir
from bso.data.synthetic import write_cifar
from bso.rundir import RunStatus
from bso.train import train
from conftest import ROOT, compose_config

pytestmark = pytest.mark.integration  # each row runs a whole command (Hydra, checks, a run)

TINY = ("engine.T=1", "dataset.batch_size=128")


@pytest.fixture
def command(capsys, tmp_path, monkeypatch):
    """``command(entry, *overrides) -> (exit status, stdout, stderr, what is under the log dir)``."""
    from hydra.core.global_hydra import GlobalHydra

    root = logging.getLogger()
    handlers, level, raise_exceptions = list(root.handlers), root.level, logging.raiseExceptions
    log_dir = tmp_path / "logs"
    monkeypatch.setenv("WANDB_MODE", "disabled")

    def run(entry: str, *overrides: str, argv0: str | None = None):
        base = ["logger=none", "device=cpu"] if entry == "train" else ["device=cpu"]
        argv = [argv0 or f"{entry}.py", *base, f"paths.log_dir={log_dir}", *overrides]
        monkeypatch.setattr(sys, "argv", argv)
        capsys.readouterr()
        code = 0
        try:
            {"train": cli.train, "eval": cli.evaluate}[entry]()
        except SystemExit as exit_:
            if isinstance(exit_.code, str):  # SystemExit("error: ...") prints to stderr
                print(exit_.code, file=sys.stderr)
            code = 1 if isinstance(exit_.code, str) else int(exit_.code or 0)
        finally:
            GlobalHydra.instance().clear()
            for handler in list(root.handlers):  # Hydra's handlers: back to pytest's
                if handler not in handlers:
                    root.removeHandler(handler)
                    handler.close()
            for handler in handlers:
                if handler not in root.handlers:
                    root.addHandler(handler)
            root.setLevel(level)
            logging.raiseExceptions = raise_exceptions
        out, err = capsys.readouterr()
        left = (
            sorted(str(p.relative_to(log_dir)) for p in log_dir.rglob("*"))
            if log_dir.exists()
            else []
        )
        return code, out, err, left

    run.log_dir = log_dir
    return run


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0][len("error: ") :]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A completed 1-epoch run (read-only: copy it to change it)."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    overrides = [*TINY, "dataset.epochs=1"]
    train(compose_config(*overrides, output_dir=run_dir), overrides=overrides)
    return run_dir


@pytest.fixture
def cifar(tmp_path):
    """A tiny CIFAR-10 in the real on-disk layout, its first batch cut in half."""
    root = write_cifar(tmp_path / "cifar", "cifar10", per_file=2)
    batch = root / "cifar-10-batches-py" / "data_batch_1"
    batch.write_bytes(batch.read_bytes()[: batch.stat().st_size // 2])
    return root


def _damage(path: Path, at: float = 0.5, size: int = 64) -> None:
    with path.open("r+b") as f:
        f.seek(int(path.stat().st_size * at))
        f.write(os.urandom(size))


# (id, entry, overrides, how the error line starts: a regex); exit status 1, nothing left behind
REFUSALS = [
    (
        "bptt-per-step",
        "train",
        ["engine=bptt", "engine.update=per_step"],
        r"engine \(bso\.engine\.BPTTEngine\): engine=bptt computes one gradient per batch .*"
        r"use engine=online for per-step updates, or engine\.update=accumulate",
    ),
    (
        "added-unknown-argument",
        "train",
        ["+engine.Tt=4"],
        r"\+engine\.Tt=4: bso\.engine\.OnlineEngine takes no argument Tt \(did you mean T\?\); "
        r"its arguments: T, trace, update, mse_weight, lean, recompute_binary_convs \(set one "
        r"without '\+'\)",
    ),
    (
        "unknown-trace",
        "train",
        ["engine.trace=foo"],
        r"engine \(bso\.engine\.OnlineEngine\): unknown engine\.trace='foo'; choose one of "
        r"\('ndot', 'ndot_paper', 'ottt'\)",
    ),
    (
        "bso-on-latent-weights",
        "train",
        ["optimizer=bso", "model.weights=latent"],
        r"optimizer=bso flips stored \+-1 weights, but SpikingVGG has none",
    ),
    (
        "sgd-on-binary-weights",
        "train",
        ["optimizer=sgd"],
        r"optimizer=sgd would take gradient steps on stored \+-1 weights",
    ),
    ("zero-epochs", "train", ["dataset.epochs=0"], r"dataset\.epochs must be >= 1 to train, got 0"),
    (
        "missing-dataset",
        "train",
        ["dataset=cifar10", "dataset.root=nowhere"],
        r"cifar10 not found under .*nowhere \(missing: cifar-10-batches-py/data_batch_1, .*"
        r"Get it with `python train.py dataset=cifar10 dataset\.download=true`",
    ),
    (
        "unknown-option",
        "train",
        ["dataset=cifar11"],
        r"dataset=cifar11: configs/dataset/ has no option cifar11; choose one of: cifar10, "
        r"cifar100, digits, dvs128_gesture, dvs_cifar10, gsc, imagenet, nmnist, shd "
        r"\(did you mean dataset=cifar10\?\)",
    ),
    (
        "unknown-key",
        "train",
        ["engine.Tt=4"],
        r"engine\.Tt=4: engine has no key Tt \(did you mean engine\.T or engine\.trace\?\); "
        r"its keys: T, lean, mse_weight, recompute_binary_convs, trace, update",
    ),
    (
        "internal-option-hidden",
        "train",
        ["model=nope"],
        r"model=nope: configs/model/ has no option nope; choose one of: mlp_shd, resnet18, "
        r"resnet19, vgg11, vgg11_ws, vgg_gesture, vgg_nmnist, vgg_tiny$",
    ),
    (
        "input-too-small-for-the-model",
        "train",
        ["model=resnet18"],
        r"model=resnet18 does not take dataset=digits's input \(1 x 8 x 8 per time step\): .*"
        r"Output size is too small\. Pick a model made for this input",
    ),
    (
        "sweep-without-multirun",
        "train",
        ["engine.T=2,4"],
        r"engine\.T=2,4 sweeps over several values: add -m \(--multirun\)",
    ),
    ("bad-type", "train", ["engine.T=2.5"], r"engine\.T=2\.5: expected an integer"),
    (
        "eval-without-checkpoint",
        "eval",
        [],
        r"python eval\.py needs checkpoint=<a run directory, its best\.pt or last\.pt",
    ),
    (
        "eval-missing-checkpoint",
        "eval",
        ["checkpoint=no/such/best.pt"],
        r"checkpoint no/such/best\.pt not found; give a run's last\.pt / best\.pt",
    ),
]
if torch.cuda.is_available():  # the reproduction needs a machine without CUDA
    REFUSALS = [r for r in REFUSALS if r[0] != "cuda-unavailable"]
else:
    REFUSALS.append(
        (
            "cuda-unavailable",
            "train",
            ["device=cuda"],
            r"device='cuda' but CUDA is not available here; use device=cpu or auto",
        )
    )


@pytest.mark.parametrize(
    "entry,overrides,line", [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS]
)
def test_a_refused_command_is_one_line_exit_1_and_leaves_nothing(command, entry, overrides, line):
    code, out, err, left = command(entry, *overrides)
    assert code == 1, err
    assert re.match(line, _one_error_line(err)), err  # the line starts so
    assert "Traceback" not in out + err and "error" not in out
    assert left == [], left
    assert "_spiking" not in err


def test_help_hides_the_internal_configs(command):
    code, out, _, _ = command("train", "--help")
    assert code == 0
    models = "mlp_shd, resnet18, resnet19, vgg11, vgg11_ws, vgg_gesture, vgg_nmnist, vgg_tiny"
    assert f"model: {models}\n" in out and "_spiking" not in out


def test_a_truncated_dataset_file_is_named_in_one_line(command, cifar):
    code, _, err, left = command(
        "train", "dataset=cifar10", "model=vgg_tiny", f"dataset.root={cifar}"
    )
    assert code == 1 and left == []
    line = _one_error_line(err)
    assert re.fullmatch(
        r"cifar10 files under .*cifar-10-batches-py are corrupt or not CIFAR pickles \(.*\); "
        r"delete them and download again",
        line,
    ), line


def test_an_unwritable_log_dir_is_refused_before_hydra_writes(command, monkeypatch, tmp_path):
    real = os.access
    monkeypatch.setattr(
        cli.os, "access", lambda p, mode: False if Path(p) == tmp_path else real(p, mode)
    )
    code, _, err, left = command("train")
    assert code == 1 and left == []
    assert re.fullmatch(
        rf"paths\.log_dir=.*: {re.escape(str(tmp_path))} cannot be written \(a read-only disk or no "
        r"permission\); set paths\.log_dir=<a writable directory>",
        _one_error_line(err),
    )


# --- damaged checkpoints ------------------------------------------------------------------------


def test_a_damaged_last_pt_is_named_and_the_finished_run_stays_completed(
    command, finished, tmp_path
):
    run_dir = shutil.copytree(finished, tmp_path / "run")
    _damage(run_dir / "last.pt", size=4096)
    before = {str(p): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    code, _, err, _ = command("train", f"resume={run_dir}", "dataset.epochs=2")
    assert code == 1
    assert re.fullmatch(
        rf"{re.escape(str(run_dir / 'last.pt'))} is damaged: its bytes no longer match the checksum "
        r"written with it .* Use the run's other checkpoint .*",
        _one_error_line(err),
    )
    assert {str(p): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
    assert not (run_dir / ".hydra").exists()  # the refused command's .hydra/resume_* is gone
    assert RunStatus(run_dir).read()["status"] == "completed"


def test_64_changed_bytes_in_a_1bit_export_are_refused_not_evaluated(command, finished, tmp_path):
    path = tmp_path / "best_1bit.pt"
    shutil.copyfile(finished / "best_1bit.pt", path)
    assert bso_checkpoint.verify(path)  # written with its checksum; torch.load reads it as is
    assert torch.load(path, weights_only=False)["format"] == bso_checkpoint.FORMAT
    _damage(path, at=0.3)
    code, _, err, left = command("eval", f"checkpoint={path}")
    assert code == 1 and left == []
    assert _one_error_line(err).startswith(f"{path} is damaged: its bytes no longer match")


def test_eval_takes_a_run_directory(command, finished):
    code, out, err, left = command("eval", f"checkpoint={finished}")
    assert code == 0, err
    assert f"evaluating {finished / 'best.pt'}" in out and "test loss" in out
    (evaluation,) = [p for p in left if p.endswith("status.json")]
    status = json.loads((command.log_dir / evaluation).read_text())
    assert status["status"] == "completed" and status["evaluated"] == str(finished / "best.pt")


def test_bso_eval_without_a_checkpoint_names_its_own_command(command):
    code, _, err, _ = command("eval", argv0="/usr/bin/bso-eval")
    assert code == 1
    assert _one_error_line(err).startswith("bso-eval needs checkpoint=<a run directory")


# --- resume suggestions ---------------------------------------------------------------------------


def test_a_run_killed_before_its_first_checkpoint_is_never_told_to_resume(
    command, finished, tmp_path
):
    run_dir = shutil.copytree(finished, tmp_path / "killed")
    for path in run_dir.glob("*.pt"):
        path.unlink()
    RunStatus(run_dir).write("running", epoch=0)
    code, _, err, _ = command("train", f"hydra.run.dir={run_dir}")
    line = _one_error_line(err)
    assert code == 1 and "resume=" + str(run_dir) not in line
    assert "no last.pt to continue from" in line and "overwrite=true (or resume=auto)" in line
    assert RunStatus(run_dir).read()["status"] == "running"
    code, _, err, _ = command(
        "train", f"hydra.run.dir={run_dir}", "resume=auto", *TINY, "dataset.epochs=1"
    )
    assert code == 0, err
    assert RunStatus(run_dir).read()["status"] == "completed"
    log = (run_dir / "train.log").read_text()
    assert "resume=auto and no checkpoint to continue from: deleting" in log
    assert "overwrite=true" not in log and log.count("final test accuracy") == 1  # old lines gone


# --- status writes and full disks -----------------------------------------------------------------


def test_a_full_disk_fails_the_run_in_one_line_and_status_json_says_failed(
    command, monkeypatch, tmp_path
):
    """torch's writer reports a full disk as a RuntimeError; the status write cannot make a new
    file either (os.replace fails), so status.json is rewritten in place."""
    real_save = torch.save

    def full(obj, path, *args, **kwargs):
        if str(path).endswith(".last.pt.tmp"):
            Path(path).write_bytes(b"partial")
            raise RuntimeError(
                "[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing "
                "file data/3: file write failed"
            )
        return real_save(obj, path, *args, **kwargs)

    status_writes = []

    def no_new_files(src, dst):
        if str(dst).endswith("status.json"):
            status_writes.append(dst)
            if len(status_writes) > 1:  # the first status.json was written, then the disk filled
                raise OSError(errno.ENOSPC, "No space left on device")
        return os.rename(src, dst)

    monkeypatch.setattr(bso_checkpoint.torch, "save", full)
    monkeypatch.setattr(bso_checkpoint.shutil, "disk_usage", lambda p: SimpleNamespace(free=512))
    run_dir = tmp_path / "run"
    monkeypatch.setattr(bso.rundir.os, "replace", no_new_files)
    code, out, err, _ = command("train", *TINY, "dataset.epochs=1", f"hydra.run.dir={run_dir}")
    assert code == 1
    assert re.fullmatch(
        rf"could not write {re.escape(str(run_dir / 'last.pt'))}: \[enforce fail .*file write failed "
        r"\(the disk is full: 512 bytes free; free space and resume the run\)",
        _one_error_line(err),
    ), err
    status = RunStatus(run_dir).read()
    assert status["status"] == "failed" and "the disk is full" in status["error"]
    assert not list(run_dir.glob(".*.tmp")) and "Logging error" not in out + err
    assert len(status_writes) > 2  # every status write after the first went in place


def test_status_json_that_cannot_be_written_at_all_is_said_once(monkeypatch, tmp_path, capsys):
    from bso.train import _record_status

    status = RunStatus(tmp_path)
    monkeypatch.setattr(
        bso.rundir.os,
        "replace",
        lambda *a: (_ for _ in ()).throw(OSError(errno.EROFS, "Read-only file system")),
    )
    record = _record_status(status, "failed", error="OSError: boom")
    assert record["status"] == "failed"
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == (
        f"warning: could not write {tmp_path / 'status.json'}: Read-only file system; the run "
        "ended failed but its status.json could not say so"
    )


# --- reports ----------------------------------------------------------------------------------------


def test_reports_skip_an_unreadable_line_or_file_with_one_warning_each(finished, tmp_path, capsys):
    from bso.report import cli as report_cli

    runs = tmp_path / "runs"
    for name in ("cut", "garbage_status", "bad_config"):
        shutil.copytree(finished, runs / name)
    with (runs / "cut" / "metrics.jsonl").open("a") as f:
        f.write('{"epoch": 2, "test/ac')
    (runs / "garbage_status" / "status.json").write_text("\x00garbage")
    (runs / "bad_config" / "config.yaml").write_text(": : [")
    for artefact in ("runs", "table2"):
        capsys.readouterr()
        report_cli.main([artefact, str(runs), *(["--digits"] if artefact == "table2" else [])])
        out, err = capsys.readouterr()
        warnings = err.strip().splitlines()
        assert len(warnings) == 3 and all(w.startswith("warning: ") for w in warnings), err
        assert f"{runs / 'cut' / 'metrics.jsonl'}: skipped 1 unreadable line(s) (line 2)" in err
        assert f"{runs / 'garbage_status' / 'status.json'}: unreadable" in err
        assert f"{runs / 'bad_config'}: skipped, it cannot be read" in err
        assert "Traceback" not in out
    assert out  # table2 still printed


# --- real processes ---------------------------------------------------------------------------------


def test_hydra_full_error_keeps_the_exception(command, monkeypatch):
    from bso.validate import ConfigError

    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(ConfigError, match="engine=bptt computes one gradient per batch"):
        command("train", "engine=bptt", "engine.update=per_step")


def test_python_train_py_prints_the_one_line_on_stderr(tmp_path):
    args = ["engine=bptt", "engine.update=per_step"]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    cmd = [sys.executable, "train.py", "logger=none", f"paths.log_dir={tmp_path / 'logs'}", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and proc.stdout == "", proc.stdout + proc.stderr
    (printed,) = proc.stderr.strip().splitlines()
    assert printed.startswith("error: engine (bso.engine.BPTTEngine): engine=bptt computes")
    assert not (tmp_path / "logs").exists()


# --- the library ------------------------------------------------------------------------------------


def test_convert_refuses_a_recurrent_layer_by_name():
    import bso

    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LSTM(4, 4))
    with pytest.raises(TypeError, match=r"cannot convert 1 \(LSTM\): its weights would stay full"):
        bso.convert(net)


def test_wandb_online_without_network_is_one_line(monkeypatch, tmp_path):
    import wandb

    from bso.loggers import WandbLogger

    def offline(**kwargs):
        raise wandb.errors.CommError("failed to reach api.wandb.ai\nretrying ...")

    monkeypatch.setattr(wandb, "init", offline)
    with pytest.raises(ValueError) as err:
        WandbLogger(tmp_path, mode="online")
    assert str(err.value) == (
        "logger.mode=online: wandb could not start (CommError: failed to reach api.wandb.ai); log in "
        "(wandb login) and check the network, or use logger.mode=offline (wandb sync uploads it "
        "later) or logger=none"
    )


def test_convert_for_online_training_refuses_a_seq_to_ann_container():
    from spikingjelly.activation_based import functional, layer, neuron

    import bso

    net = torch.nn.Sequential(
        layer.SeqToANNContainer(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4)),
        neuron.LIFNode(),
    )
    functional.set_step_mode(net, "s")  # what the multi-step refusal suggests: not enough here
    with pytest.raises(ValueError, match=r"0 is a spikingjelly SeqToANNContainer, which takes"):
        bso.convert(net, full_precision=())
    bso.convert(net, trace=None, full_precision=())  # BPTT takes [T, B, ...]: converted


def test_a_checkpoint_whose_weights_do_not_fit_its_own_config_is_called_damaged(
    command, finished, tmp_path
):
    blob = torch.load(finished / "best.pt", weights_only=False)
    key = next(k for k, v in blob["model"].items() if v.dim() == 4)
    blob["model"][key] = torch.zeros(1)  # no checksum (torch.save): read, then it does not fit
    torch.save(blob, tmp_path / "edited.pt")
    code, _, err, left = command("eval", f"checkpoint={tmp_path / 'edited.pt'}")
    assert code == 1 and left == []
    assert re.match(
        rf"{re.escape(str(tmp_path / 'edited.pt'))} says it holds model vgg_tiny \(.*\), but its "
        r"weights do not fit that model: the file is damaged or was changed",
        _one_error_line(err),
    )
