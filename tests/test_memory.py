"""Saved-tensor accounting and the online engine's flat activation memory."""

import pytest
import torch

from bso.engine import OnlineEngine, instantaneous_loss
from bso.metrics.memory import SavedTensorMeter
from bso.models import SpikingVGG
from bso.neurons import configure_neurons, reset_neurons


def test_saved_tensor_meter_counts_hand_built_graph():
    a = torch.randn(10, requires_grad=True)  # 40 bytes
    with SavedTensorMeter() as meter:
        b = a.sin()  # saves a (40 B)
        c = b.exp()  # saves its result c (40 B)
        d = a.cos() * 2  # cos saves a again: same storage, not counted twice
    assert meter.peak_bytes == 80
    assert meter.current_bytes == 80
    (c.sum() + d.sum()).backward()
    del b, c, d
    assert meter.current_bytes == 0
    assert meter.peak_bytes == 80


class _StepCounter:
    """A router stand-in that records when the engine steps and with which t; never updates."""

    binary_names = ["w"]
    binary = None  # no binary optimizer to check against the model

    def __init__(self, model):
        self.model, self.calls, self.grads = model, [], []

    def zero_grad(self):
        self.model.zero_grad(set_to_none=True)

    def begin_time_step(self, t):
        pass

    def step(self, t=None):
        self.calls.append(t)
        w = self.model.blocks[1].conv.weight
        self.grads.append(w.grad.clone())
        return torch.zeros(1, dtype=torch.long)


def _loader(n=8):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=n)


def _tiny_model():
    torch.manual_seed(0)
    return SpikingVGG("8C3-16C3-AP2-16C3", in_channels=1, num_classes=10)


def test_online_engine_step_schedule_and_accumulated_gradient():
    T = 3
    grads = {}
    for update in ("per_step", "accumulate"):
        model = _tiny_model()
        engine = OnlineEngine(T=T, update=update)
        engine.prepare(model)
        router = _StepCounter(model)
        engine.train_epoch(model, router, _loader(), torch.device("cpu"))
        grads[update] = router.grads
        assert router.calls == ([0, 1, 2] if update == "per_step" else [None])
    # one step with the T gradients summed == the sum of the T per-step gradients
    assert torch.allclose(grads["accumulate"][0], sum(grads["per_step"]), atol=1e-5)


def test_online_activation_memory_does_not_grow_with_T_but_bptt_does():
    x, y = next(iter(_loader()))
    peaks = {}
    for T in (1, 8):
        model = _tiny_model()
        engine = OnlineEngine(T=T)
        engine.prepare(model)
        router = _StepCounter(model)
        tally = engine.train_epoch(model, router, _loader(), torch.device("cpu"))
        peaks[("online", T)] = tally.activation_peak_bytes
        # BPTT for contrast: one graph through all T steps
        configure_neurons(model, detach_state=False, trace_rule=None)
        reset_neurons(model)
        with SavedTensorMeter() as meter:
            loss = sum(instantaneous_loss(model(x), y, 0.05, T) for _ in range(T))
        loss.backward()
        peaks[("bptt", T)] = meter.peak_bytes
    assert peaks[("online", 1)] > 0
    assert peaks[("online", 8)] == peaks[("online", 1)]
    assert peaks[("bptt", 8)] > 6 * peaks[("bptt", 1)]


def test_persistent_state_by_role_for_bso_and_latent_adam():
    from functools import partial

    from bso.layers import named_binary_parameters
    from bso.metrics.memory import persistent_state_bytes
    from bso.optim import BSO, TBSO, PlainOptimizer, build_router

    model = _tiny_model()  # binary convs: 16*8*9 + 16*16*9 = 3,456 weights
    router = build_router(model, partial(TBSO, num_steps=4), partial(torch.optim.SGD, lr=0.1))
    x, y = next(iter(_loader()))
    engine = OnlineEngine(T=4)
    engine.prepare(model)
    engine.train_batch(model, router, x, y)
    state = persistent_state_bytes(model, router)
    assert state["binary_weight_count"] == 3456
    assert state["binary_weights"] == 3456 * 4 and state["binary_weights_1bit"] == 3456 / 8
    per = state["per_binary_weight"]
    # stored weight + one momentum, plus T=4 scalars of v per layer (2 layers)
    assert per["weights"] == 4.0
    assert per["optimizer_state"] == (3456 * 4 + 2 * 4 * 4) / 3456
    assert state["latent_weights"] == 0

    bso_model = _tiny_model()
    bso = build_router(bso_model, BSO, partial(torch.optim.SGD, lr=0.1))
    engine = OnlineEngine(T=2)
    engine.prepare(bso_model)
    engine.train_batch(bso_model, bso, x, y)
    assert persistent_state_bytes(bso_model, bso)["per_binary_weight"]["optimizer_state"] == 4.0

    torch.manual_seed(0)
    latent = SpikingVGG("8C3-16C3-AP2-16C3", in_channels=1, num_classes=10, weights="latent")
    adam = PlainOptimizer(
        torch.optim.Adam(latent.parameters()), named_binary_parameters(latent, "latent")
    )
    from bso.engine import BPTTEngine

    engine = BPTTEngine(T=2)
    engine.prepare(latent)
    engine.train_batch(latent, adam, x, y)
    state = persistent_state_bytes(latent, adam)
    assert state["latent_weights"] == 3456 * 4 and state["binary_weights"] == 0
    # Adam: exp_avg + exp_avg_sq per latent weight (+ a step counter per tensor)
    assert 8.0 <= state["per_binary_weight"]["optimizer_state"] < 8.01


def _run_script(*args):
    import subprocess
    import sys

    from conftest import ROOT

    proc = subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.integration
def test_memory_benchmark_script_tiny(tmp_path):
    import json

    out = tmp_path / "fig4"
    _run_script(
        "scripts/bench/memory_vs_T.py",
        "--T",
        "1",
        "3",
        "--batch",
        "2",
        "--layers",
        "4C3-AP2-8C3",
        "--device",
        "cpu",
        "--out",
        str(out),
    )
    for suffix in (".json", ".csv", ".png"):
        assert out.with_suffix(suffix).is_file(), suffix
    points = json.loads(out.with_suffix(".json").read_text())["points"]
    act = {(p["method"], p["T"]): p["activation_peak_bytes"] for p in points}
    assert act[("bso", 3)] == act[("bso", 1)] and act[("tbso", 3)] == act[("tbso", 1)]
    assert act[("bptt_latent", 3)] > 2 * act[("bptt_latent", 1)]
    for p in points:  # BSO/T-BSO as trained by default: lean, with its roles in the file
        online = p["method"] != "bptt_latent"
        assert p["lean"] is online
        per = p["persistent"]["per_binary_weight"]
        assert per["weights"] == (0.125 if online else 4.0)  # packed bits / float32 latent
        assert per["gradients"] == (0.0 if online else 4.0)
        assert (p["persistent"]["transient_gradients"] > 0) is online


@pytest.mark.integration
def test_lean_benchmark_script_tiny(tmp_path):
    """make bench-lean, small: the three modes, same flips, the lean modes' three quantities beside the
    plain mode's with their ratios."""
    import json

    out = tmp_path / "lean"
    _run_script(
        "scripts/bench/lean.py",
        *("--batch", "4", "--T", "2", "--layers", "8C3-16C3-AP2-16C3", "--iters", "1"),
        *("--device", "cpu", "--out", str(out)),
    )
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["tbso", "bso"]
    for r in rows:
        assert r["same_flips"]
        b, a = r["bytes_per_binary_weight"], r["activation_peak_bytes"]
        v_t = 2 * 2 * 4 / (16 * 8 * 9 + 16 * 16 * 9) if r["method"] == "tbso" else 0  # T-BSO's v
        assert b["plain"] == pytest.approx(12.0 + v_t)
        assert b["lean"] == b["recompute"] == pytest.approx(4.125 + v_t)
        assert a["recompute"] < a["lean"] < a["plain"] and a["ratio"] == a["lean"] / a["plain"]
        assert a["recompute_ratio"] == a["recompute"] / a["plain"]
        assert set(r["ms_per_time_step"]) == {
            "plain",
            "lean",
            "recompute",
            "ratio",
            "recompute_ratio",
        }
    assert "| tbso | activation peak (MB) |" in out.with_suffix(".md").read_text()


@pytest.mark.integration
def test_throughput_script_tiny(tmp_path):
    import json

    out = tmp_path / "tp"
    _run_script(
        "scripts/bench/throughput.py",
        "--T",
        "2",
        "--batch",
        "2",
        "--iters",
        "1",
        "--layers",
        "4C3-AP2-8C3",
        "--device",
        "cpu",
        "--out",
        str(out),
    )
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert {(r["method"], r["mode"]) for r in rows} == {
        ("bptt_latent", "plain"),
        *((m, mode) for m in ("bso", "tbso") for mode in ("lean", "lean_fused")),
    }
    assert all(r["samples_per_s"] > 0 for r in rows)
    assert all(r["binary_step_ms"] > 0 for r in rows if r["method"] != "bptt_latent")
    assert out.with_suffix(".md").is_file()
