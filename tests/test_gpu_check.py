"""`make gpu-check` (scripts/bench/gpu_check.py) at its tiny sizes on the CPU: every item runs (so
the CUDA script cannot rot), a call stops when its budget is spent and keeps what it did, the next
call skips what is done; an item past its time is stopped and recorded as a timeout."""

from __future__ import annotations

import json
import time

import gpu_check  # scripts/bench is on the tests' path (pyproject: pythonpath)
import gpu_check_items
import pytest
import torch

CPU = torch.device("cpu")


def _records(out) -> list[dict]:
    return [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]


@pytest.mark.integration
def test_tiny_run_stops_at_its_budget_and_the_next_call_continues(tmp_path):
    out = tmp_path / "gc"
    argv = ["--allow-cpu", "--device", "cpu", "--out", str(out)]
    names = [i.name for i in gpu_check.plan(gpu_check.SIZES["tiny"], CPU)]

    # no budget: the first item runs (a call always makes progress), is written, and the call stops
    assert gpu_check.main([*argv, "--budget-s", "0"]) == 0
    (first,) = _records(out)
    assert first["item"] == names[0] == "train_tbso" and first["status"] == "ok"
    assert first["checks"]["resume_bitwise"] and first["checks"]["cut_after_one_batch"]
    assert first["result"]["differing_tensors"] == []
    env = first["env"]
    assert env["torch"] == torch.__version__ and env["device"] == "cpu"
    assert {"device_name", "driver", "cuda", "cudnn", "triton", "spikingjelly"} <= env.keys()
    assert "| a. train_tbso | ok |" in out.with_suffix(".md").read_text()

    # the next call skips it and runs the rest, in priority order, each once
    assert gpu_check.main(argv) == 0
    records = _records(out)
    assert [r["item"] for r in records] == names
    status = {r["item"]: r["status"] for r in records}
    assert status.pop("speed_compile") == "skipped"  # fast.compile is CUDA only
    assert set(status.values()) == {"ok"}, [r.get("error") for r in records]
    by = {r["item"]: r["result"] for r in records if r["status"] == "ok"}
    tbso = next(r for r in by["flips"]["rows"] if r["method"] == "tbso")
    assert sum(tbso["flips_per_batch"]) > 0 and tbso["same_momentum"]
    assert by["nccl"]["backend"] == "gloo" and by["nccl"]["same_flips_as_bare"]["lean"]
    assert by["ddp"]["ranks"] == 1 and by["ddp"]["train_loss"] > 0
    assert [(r["method"], r["mode"]) for r in by["speed"]["rows"]] == [
        ("tbso", "lean"),
        ("tbso", "plain"),
        ("bso", "lean"),
        ("bso", "plain"),
        ("bptt_latent", "plain"),
    ]
    # Figure 4's shape, even tiny: BPTT's saved activations grow with T, the online methods' do not
    act = {
        (p["method"], p["T"]): p["activation_peak_bytes"]
        for T in (1, 2)
        for p in by[f"fig4_T{T}"]["points"]
    }
    assert act[("bptt_latent", 2)] > act[("bptt_latent", 1)]
    assert act[("tbso", 2)] == act[("tbso", 1)] and act[("bso", 2)] == act[("bso", 1)]
    md = out.with_suffix(".md").read_text()
    assert "| tbso | lean | 2 | 4 | off |" in md and "| bptt_latent | 2 | 4 |" in md

    assert gpu_check.main(argv) == 0  # everything done: nothing runs again
    assert len(_records(out)) == len(names)


def _record(item: str, status: str, device: str = "GPU A", params: dict | None = None) -> dict:
    env = {"device_name": device, "device": "cuda:0"}
    return {"item": item, "params": params or {}, "status": status, "env": env}


def test_what_counts_as_done():
    """The latest record of an item decides; a timeout is run again, and so is what --redo names."""
    records = [
        _record("a", "failed"),
        _record("a", "ok"),  # redone and passed
        _record("b", "ok"),
        _record("b", "error"),  # the latest: an error
        _record("c", "timeout"),
        _record("d", "skipped"),
        _record("a", "ok", device="GPU B"),
        _record("a", "ok", params={"batch": 4}),
    ]
    done = gpu_check.done_items(records, [])
    assert {k[0] for k in done} == {"a", "b", "d"} and len(done) == 5
    assert done[("b", "{}", "GPU A")] == "error"
    assert ("b", "{}", "GPU A") not in gpu_check.done_items(records, ["failed"])
    assert ("a", "{}", "GPU A") in gpu_check.done_items(records, ["failed"])
    assert not any(k[0] == "a" for k in gpu_check.done_items(records, ["a"]))
    assert gpu_check.done_items(records, ["all"]) == {}


@pytest.mark.integration
def test_an_item_past_its_time_is_stopped_and_recorded_as_a_timeout(monkeypatch, tmp_path):
    """...and what it wrote is removed with it: the killed process cannot clean up itself."""
    import multiprocessing
    import tempfile

    def sleep(params, device, work):
        (work / "partial.bin").write_bytes(b"0")
        time.sleep(60)

    monkeypatch.setitem(gpu_check_items.KINDS, "sleep", sleep)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    item = gpu_check.Item("nap", "d", "sleep", {}, "sleeps")
    start = time.perf_counter()
    record = gpu_check.run_item(
        item, CPU, 1.0, {"device_name": "cpu"}, multiprocessing.get_context("fork")
    )
    assert record["status"] == "timeout" and "next call runs it again" in record["error"]
    assert time.perf_counter() - start < 30
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_without_cuda_it_refuses_and_writes_nothing(tmp_path):
    with pytest.raises(SystemExit) as exit_:
        gpu_check.main(["--out", str(tmp_path / "gc")])
    assert str(exit_.value.code).startswith(
        "error: gpu-check measures CUDA training and needs a GPU"
    )
    assert not list(tmp_path.iterdir())


def test_unknown_item_names_are_refused(tmp_path):
    argv = ["--allow-cpu", "--device", "cpu", "--out", str(tmp_path / "gc")]
    with pytest.raises(SystemExit, match="unknown item.*'flip'.*train_tbso flips"):
        gpu_check.main([*argv, "--only", "flip"])
    with pytest.raises(SystemExit, match="unknown item.*--redo"):
        gpu_check.main([*argv, "--redo", "speeed"])
    assert not list(tmp_path.iterdir())


def test_the_plan_lists_anywhere_most_important_first(capsys):
    """--list needs no GPU: the full-size items, correctness first, Figure 4 one item per T."""
    assert gpu_check.main(["--list"]) == 0
    names = [line.split(":")[0] for line in capsys.readouterr().out.splitlines() if line[1] == "."]
    assert names[:6] == [
        "a. train_tbso",
        "a. train_bso",
        "a. flips",
        "a. ddp",
        "a. nccl",
        "b. speed",
    ]
    assert [n for n in names if "fig4" in n] == [f"c. fig4_T{T}" for T in (1, 2, 4, 8, 16, 35)]
    assert names.index("c. roofline_b128_T6") < names.index("d. loader")


def test_nondeterministic_operations_are_named_from_torchs_warnings():
    lines = [
        "/x/engine.py:12: UserWarning: index_add_cuda_ does not have a deterministic implementation,"
        " but you set 'torch.use_deterministic_algorithms(True, warn_only=True)'.",
        "scatter_add_cuda_kernel does not have a deterministic implementation, but you set ...",
        "index_add_cuda_ does not have a deterministic implementation, but you set ...",
        "epoch   1/1 | train loss 2.19",
    ]
    assert gpu_check_items.nondeterministic_ops(lines) == [
        "index_add_cuda_",
        "scatter_add_cuda_kernel",
    ]
