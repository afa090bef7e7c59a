"""Data-parallel training with 2 gloo processes on the CPU (bso.distributed).

Each worker trains vgg_tiny on its shard of the embedded digits for one epoch and saves what it
holds; the tests compare the ranks: the same +-1 weights (DDP averaged every backward's gradients
before the flip rule), the reduced metrics equal to what the ranks saw together, and the sharded
evaluation equal to evaluating the whole test set in one process. The lean mode (engine.lean=true,
flips inside backward on gradients it averages over the ranks itself) trains bit for bit what the
plain mode (engine.lean=false: DDP's all-reduce, then optimizer.step) trains on the same shards.
Then torchrun itself: one run directory, resume, and a mid-epoch interruption.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
from hydra.utils import instantiate

from bso import distributed
from bso.data import build_dataloaders, start_epoch
from bso.engine import evaluate
from bso.layers import named_binary_parameters
from bso.optim import build_optimizer
from conftest import ROOT, compose_config

WORLD = 2
# (overrides, name): T-BSO with per-step updates (an all-reduce in every one of the T backwards),
# BSO with accumulated updates (no_sync for all but the last step), latent-weight BPTT (one
# backward through T forwards)
RUNS = {
    "tbso_per_step": ["engine.T=2"],
    # PyTorch's init: with the release's N(0, 0.01) classifier BSO flips nothing in this short epoch
    "bso_accumulate": [
        "optimizer=bso",
        "engine.T=2",
        "engine.update=accumulate",
        "model.init=pytorch",
    ],
    "bptt_latent": [
        "engine=bptt",
        "engine.T=2",
        "optimizer=adam",
        "model.weights=latent",
    ],
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    state = distributed.setup("cpu")
    try:
        assert state.enabled and state.rank == rank and state.backend == "gloo"
        for name, overrides in RUNS.items():
            cfg = compose_config("dataset.epochs=1", *overrides)
            torch.manual_seed(cfg.seed)  # identical init on every rank (DDP also broadcasts it)
            model = instantiate(cfg.model)
            engine = instantiate(cfg.engine)
            engine.prepare(model)
            initial = {k: v.clone() for k, v in model.state_dict().items()}
            train_model = distributed.wrap_model(model, state)
            optimizer = build_optimizer(model, cfg.optimizer)
            torch.manual_seed(cfg.seed + rank)
            train_loader, test_loader = build_dataloaders(
                cfg.dataset, seed=cfg.seed, rank=rank, world_size=WORLD
            )
            start_epoch(train_loader, 1)
            tally = engine.train_epoch(train_model, optimizer, train_loader, state.device)
            train_m = {
                **tally.metrics(),
                "rank": {"samples": tally.samples, "correct": int(tally.correct)},
            }
            distributed.average_buffers(model)
            test_m = evaluate(model, test_loader, engine.T, state.device, engine.mse_weight)
            torch.save(
                {
                    "initial": initial,
                    "state": model.state_dict(),
                    "train": train_m,
                    "test": test_m,
                    "train_indices": list(train_loader.sampler),
                    "test_indices": list(test_loader.sampler),
                },
                os.path.join(out_dir, f"{name}_rank{rank}.pt"),
            )
    finally:
        distributed.cleanup(state)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return {
        name: [torch.load(out / f"{name}_rank{r}.pt", weights_only=False) for r in range(WORLD)]
        for name in RUNS
    }


@pytest.mark.integration
@pytest.mark.parametrize("name", list(RUNS))
def test_ranks_hold_identical_weights_after_training(two_ranks, name):
    r0, r1 = two_ranks[name]
    # T-BSO per step runs the lean mode (the default: flips inside backward on gradients it averages
    # over the ranks itself); the other two keep float weights and DDP's all-reduce
    # every tensor the same on both ranks: +-1 (or latent) weights, BN affine and running stats
    for key, value in r0["state"].items():
        assert torch.equal(value, r1["state"][key]), key
    # ... and training moved the weights (the ranks saw different samples, so equality is the
    # all-reduce's doing, not a model that stood still)
    cfg = compose_config(*RUNS[name])
    model = instantiate(cfg.model)
    moved = []
    for weight_name, _ in named_binary_parameters(model, ("binary", "latent")):
        final = r0["state"][weight_name]
        moved.append(not torch.equal(final, r0["initial"][weight_name]))
        if cfg.model.weights == "binary":
            assert set(final.unique().tolist()) == {-1.0, 1.0}
    assert any(moved)
    assert int(r0["train"]["flips"].sum()) > 0
    assert torch.equal(r0["train"]["flips"], r1["train"]["flips"])


@pytest.mark.integration
@pytest.mark.parametrize("name", list(RUNS))
def test_reduced_metrics_are_what_the_ranks_saw_together(two_ranks, name):
    r0, r1 = two_ranks[name]
    n_train = 1437  # the digits' training split (test_fraction 0.2 of 1,797)
    # training: the EpochSampler pads the shards to equal length (same number of batches per rank)
    assert len(r0["train_indices"]) == len(r1["train_indices"]) == (n_train + 1) // 2
    assert set(r0["train_indices"]) | set(r1["train_indices"]) == set(range(n_train))
    for key in ("samples", "correct"):
        assert (
            r0["train"][key]
            == r1["train"][key]
            == r0["train"]["rank"][key] + r1["train"]["rank"][key]
        )
    assert r0["train"]["samples"] == 2 * len(r0["train_indices"])
    assert r0["train"]["acc1"] == r0["train"]["correct"] / r0["train"]["samples"]
    assert r0["train"]["loss"] == r1["train"]["loss"]
    # evaluation: disjoint shards that cover the test set once; reduced = the whole set in one process
    assert sorted(r0["test_indices"] + r1["test_indices"]) == list(range(360))
    assert r0["test"] == r1["test"]
    cfg = compose_config(*RUNS[name])
    model = instantiate(cfg.model)
    engine = instantiate(cfg.engine)
    engine.prepare(model)
    model.load_state_dict(r0["state"])
    _, full_test = build_dataloaders(cfg.dataset, seed=cfg.seed)
    torch.set_num_threads(1)  # a small model; a second thread only contends on a busy machine
    single = evaluate(model, full_test, engine.T, torch.device("cpu"), engine.mse_weight)
    assert r0["test"]["acc1"] == single["acc1"]
    assert r0["test"]["loss"] == pytest.approx(single["loss"], rel=1e-6)


# --- lean mode under DDP: the fused update's own averaging flips what DDP's all-reduce flips -------

# (overrides) of per-step runs trained twice on the same 2 shards: engine.lean=true (packed weights
# flipped inside backward, which averages their gradients over the ranks itself) and
# engine.lean=false (float +-1 weights: DDP averages every gradient, then optimizer.step flips). BSO's
# flip test W * M > gamma is not scale-free, so a gradient summed over the ranks instead of averaged
# flips other weights; T-BSO's momentum M doubles with it.
LEAN_VS_PLAIN = {
    "tbso": ["engine.T=2"],
    "bso": ["optimizer=bso", "engine.T=2", "model.init=pytorch"],
}


def _lean_vs_plain_worker(rank: int, ports: list[int], out_dir: str) -> None:
    from pathlib import Path

    from bso.train import train

    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1"
    )
    torch.set_num_threads(1)
    runs = [(name, lean) for name in LEAN_VS_PLAIN for lean in ("true", "false")]
    for port, (name, lean) in zip(ports, runs, strict=True):
        os.environ["MASTER_PORT"] = str(port)
        overrides = [
            *LEAN_VS_PLAIN[name],
            f"engine.lean={lean}",
            "dataset.epochs=1",
            "metrics.snn=false",
        ]
        train(
            compose_config(*overrides, output_dir=Path(out_dir) / f"{name}_lean_{lean}"),
            overrides=overrides,
        )


@pytest.fixture(scope="module")
def lean_vs_plain(tmp_path_factory):
    out = tmp_path_factory.mktemp("lean_vs_plain")
    ports = [_free_port() for _ in range(2 * len(LEAN_VS_PLAIN))]
    mp.spawn(_lean_vs_plain_worker, args=(ports, str(out)), nprocs=WORLD, join=True)
    runs = {}
    for name in LEAN_VS_PLAIN:
        for lean in ("true", "false"):
            run = out / f"{name}_lean_{lean}"
            runs[name, lean == "true"] = {
                "checkpoint": torch.load(run / "last.pt", weights_only=False),
                "records": [
                    json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
                ],
            }
    return runs


def _assert_equal_nested(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_equal_nested(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_equal_nested(x, y, f"{where}/{i}")
    else:
        assert a == b, where


@pytest.mark.integration
@pytest.mark.parametrize("name", list(LEAN_VS_PLAIN))
def test_two_rank_lean_mode_flips_bitwise_what_plain_ddp_flips(lean_vs_plain, name):
    lean, plain = lean_vs_plain[name, True], lean_vs_plain[name, False]
    # the same flips in every layer, the same loss and accuracy (epoch 1, reduced over the ranks)
    (record_lean,), (record_plain,) = lean["records"], plain["records"]
    flip_keys = [k for k in record_plain if k.startswith("flip_rate/")]
    assert len(flip_keys) == 4 and record_plain["flip_rate/all"] > 0  # 3 binary convs + all
    for key in ("train/loss", "train/acc1", "test/loss", "test/acc1", *flip_keys):
        assert record_lean[key] == record_plain[key], key
    # the same +-1 weights, BatchNorm statistics and classifier, bit for bit ...
    model_lean, model_plain = lean["checkpoint"]["model"], plain["checkpoint"]["model"]
    _assert_equal_nested(model_lean, model_plain, "model")
    binary = lean["checkpoint"]["binary_weights"]
    assert len(binary) == 3
    for key in binary:
        assert set(model_lean[key].unique().tolist()) == {-1.0, 1.0}
    # ... and the same optimizer state: momentum M (and T-BSO's v_l[t]) of every binary weight
    _assert_equal_nested(
        lean["checkpoint"]["optimizer"], plain["checkpoint"]["optimizer"], "optimizer"
    )
    momenta = [s["momentum"] for s in lean["checkpoint"]["optimizer"]["binary"]["state"].values()]
    assert len(momenta) == 3 and all(m.abs().sum() > 0 for m in momenta)


def _torchrun(tmp_path, *overrides, rc=0) -> str:
    """`torchrun --nproc_per_node=WORLD train.py logger=none <overrides>` (gloo, one thread per
    process, temp files under tmp_path/tmp); asserts its exit status, returns its output."""
    tmp = tmp_path / "tmp"
    tmp.mkdir(exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp)}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={WORLD}", "train.py", "logger=none", *overrides]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == rc, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


@pytest.mark.integration
def test_torchrun_trains_the_digits_and_writes_one_run_directory(tmp_path):
    """`torchrun --nproc_per_node=2 train.py` (gloo): one run directory, written by rank 0; the
    other rank's Hydra directory (in the temp dir) is removed."""
    _torchrun(
        tmp_path,
        "dataset.epochs=1",
        "engine.T=2",
        "model.init=pytorch",  # learns within one epoch (the release's init needs two here)
        f"paths.log_dir={tmp_path / 'outputs'}",
    )
    runs = list((tmp_path / "outputs" / "runs").iterdir())
    assert len(runs) == 1, runs
    run = runs[0]
    for name in (
        "config.yaml",
        "run_info.json",
        "metrics.jsonl",
        "last.pt",
        "status.json",
        "train.log",
    ):
        assert (run / name).is_file(), name
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 1 and records[0]["epoch"] == 1  # one writer
    assert records[0]["test/acc1"] > 0.5  # learnt (chance: 0.1)
    assert not list(
        (tmp_path / "tmp").glob("bso-rank*")
    )  # rank 1's throwaway Hydra directory is gone
    log = (run / "train.log").read_text()
    assert log.count("epoch   1/1") == 1 and "2 processes" in log


def test_single_process_refuses_distributed_only_options():
    state = distributed.setup("cpu")
    assert not state.enabled and state.is_main
    model = torch.nn.Sequential(torch.nn.BatchNorm2d(2))
    assert distributed.wrap_model(model, state) is model
    with pytest.raises(ValueError, match="sync_batchnorm=true.*one process"):
        distributed.wrap_model(model, state, sync_batchnorm=True)
    with pytest.raises(ValueError, match="backend=gloo.*one process"):
        distributed.setup("cpu", backend="gloo")
    with pytest.raises(ValueError, match="unknown distributed.backend"):
        distributed.setup("cpu", backend="mpi")


def test_partial_torchrun_environment_is_an_error(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with pytest.raises(RuntimeError, match="LOCAL_RANK"):
        distributed.setup("cpu")


def test_rank_dir_resolver_keeps_rank0_and_redirects_other_ranks(monkeypatch, tmp_path):
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    assert distributed.run_dir_for_rank("outputs/runs/x") == "outputs/runs/x"
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("RANK", "0")
    assert distributed.run_dir_for_rank("outputs/runs/x") == "outputs/runs/x"
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    redirected = distributed.run_dir_for_rank("outputs/runs/x")
    assert redirected.startswith(str(tmp_path)) and "rank1" in redirected


LAUNCH_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")


def test_multi_task_slurm_job_exports_torchrun_variables(monkeypatch):
    """hydra/launcher=slurm with gpus_per_node=2: each Slurm task becomes a DDP rank."""
    for key in LAUNCH_ENV:
        monkeypatch.delenv(key, raising=False)
    assert not distributed.export_slurm_env()  # not a submitit job
    slurm = dict(
        SUBMITIT_EXECUTOR="slurm",
        SLURM_JOB_ID="4242",
        SLURM_NTASKS="2",
        SLURM_JOB_NUM_NODES="1",
        SLURM_NODEID="0",
        SLURM_PROCID="1",
        SLURM_LOCALID="1",
        SLURM_JOB_NODELIST="gpu[07-08]",
    )
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    # monkeypatch restores these after the test (export writes them into os.environ)
    for key in LAUNCH_ENV:
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    assert distributed.export_slurm_env()
    assert distributed.torchrun_env() == {"rank": 1, "local_rank": 1, "world_size": 2}
    assert os.environ["MASTER_ADDR"] == "gpu07"
    port = os.environ["MASTER_PORT"]
    assert not distributed.export_slurm_env()  # torchrun's variables, once set, win
    # the other task of the job (rank 0) meets rank 1 at the same address and port
    for key in LAUNCH_ENV:
        monkeypatch.delenv(key)
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_LOCALID", "0")
    assert distributed.export_slurm_env()
    assert distributed.torchrun_env() == {"rank": 0, "local_rank": 0, "world_size": 2}
    assert (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]) == ("gpu07", port)


@pytest.mark.integration
def test_resume_under_torchrun_continues_exactly(tmp_path):
    """2 processes: 1 epoch, then `resume=<run> dataset.epochs=2` under torchrun, ends with the
    weights of a straight 2-epoch torchrun run (per-rank RNG states are gathered into last.pt)."""

    def torchrun(*args, rc=0):
        return _torchrun(tmp_path, "engine.T=2", *args, rc=rc)

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    torchrun("dataset.epochs=2", f"hydra.run.dir={straight}")
    torchrun("dataset.epochs=1", f"hydra.run.dir={resumed}")
    assert len(torch.load(resumed / "last.pt", weights_only=False)["rng"]) == WORLD
    # a refused command: its message once (rank 0), the run as it was, no temp directory left
    out = torchrun(f"resume={resumed}", "dataset.epochs=2", "seed=abc", rc=1)
    assert out.count("error: seed='abc': expected an integer") == 1, out
    torchrun(f"resume={resumed}", "dataset.epochs=2")
    assert not list(
        (tmp_path / "tmp").glob("bso-rank*")
    )  # rank 1's Hydra directory of the resume is gone
    a, b = (torch.load(d / "last.pt", weights_only=False) for d in (straight, resumed))
    assert a["epoch"] == b["epoch"] == 2
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    records = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]


def _interrupted_worker(rank: int, ports: list[int], out_dir: str) -> None:
    """Rank ``rank`` of 3 two-process runs of one epoch: straight; SIGINT on rank 0 during its 3rd
    batch (a mid-epoch checkpoint); resumed from it."""
    import signal
    from pathlib import Path

    from bso.engine import OnlineEngine
    from bso.train import RunInterrupted, train

    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1"
    )
    torch.set_num_threads(1)
    out = Path(out_dir)
    tiny = ("dataset.epochs=1", "engine.T=1", "dataset.batch_size=128")

    def run(port, run_dir, *overrides):
        os.environ["MASTER_PORT"] = str(port)
        return train(
            compose_config(*tiny, *overrides, output_dir=run_dir), overrides=list(overrides)
        )

    run(ports[0], out / "straight")
    original, calls = OnlineEngine.train_batch, []

    def train_batch(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        calls.append(1)
        if rank == 0 and len(calls) == 3:
            signal.raise_signal(signal.SIGINT)
        return result

    OnlineEngine.train_batch = train_batch
    try:
        run(ports[1], out / "resumed")
        raise AssertionError("not interrupted")
    except RunInterrupted:
        if rank == 0:
            shutil.copyfile(out / "resumed" / "last.pt", out / "cut.pt")
    finally:
        OnlineEngine.train_batch = original
    run(ports[2], out / f"hydra_of_rank{rank}", f"resume={out / 'resumed'}")


@pytest.mark.integration
def test_torchrun_mid_epoch_resume_is_bitwise_batchnorm_statistics_included(tmp_path):
    """Each rank's BatchNorm running statistics (averaged over the ranks only at the epoch's end) go
    into the mid-epoch last.pt; the resumed run ends bitwise where the straight one did."""
    mp.spawn(
        _interrupted_worker,
        args=([_free_port() for _ in range(3)], str(tmp_path)),
        nprocs=WORLD,
        join=True,
    )
    cut = torch.load(tmp_path / "cut.pt", weights_only=False)
    assert cut["epoch"] == 0 and [t.batches for t in cut["tally"]] == [3, 3]
    bn = [k for k in cut["model"] if "running_mean" in k]
    r0, r1 = cut["rank_buffers"]
    assert bn and all(not torch.equal(r0[k], r1[k]) for k in bn)  # each rank's own statistics
    a, b = (
        torch.load(tmp_path / d / "last.pt", weights_only=False) for d in ("straight", "resumed")
    )
    assert b["epoch"] == 1 and "rank_buffers" not in b  # an epoch-end checkpoint: one average
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    records = [
        [json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
        for d in ("straight", "resumed")
    ]
    assert [r["epoch"] for r in records[1]] == [1]
    for key in ("train/loss", "train/acc1", "test/loss", "test/acc1"):
        assert records[0][0][key] == records[1][0][key], key
    assert json.loads((tmp_path / "resumed" / "status.json").read_text())["status"] == "completed"
