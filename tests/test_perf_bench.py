"""The performance tools (roofline, memopt comparison, bench-gpu's pieces) and the exactness of the
lean step's shortcuts, on tiny models (CPU)."""

from __future__ import annotations

import json

import pytest
import torch

from bso.lean.batchnorm_lif import batchnorm_train_forward
from bso.optim.binary import flip_where_above

pytestmark = pytest.mark.integration  # runs the benchmark scripts on tiny models

TINY = "8C3-AP2-16C3"  # the scripts/bench modules are importable in tests (pyproject: pythonpath)


def test_flip_where_above_is_the_release_test_bit_for_bit():
    gamma = 5e-7
    g32 = torch.tensor([gamma], dtype=torch.float32)
    near = [g32]
    for direction in (1.0, 0.0):  # the 30 floats on each side of gamma
        x = g32
        for _ in range(30):
            x = torch.nextafter(x, torch.tensor([direction]))
            near.append(x)
    special = torch.tensor([float("inf"), -float("inf"), float("nan"), 0.0, -0.0, 1e-45, -1e-45])
    value = torch.cat([*near, special, torch.randn(100_000) * 1e-6])
    assert torch.equal(flip_where_above(value, gamma), value - gamma > 0)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_batchnorm_train_forward_is_the_module_step(momentum):
    torch.manual_seed(0)
    z = torch.randn(4, 3, 5, 5)
    ref, ours = (torch.nn.BatchNorm2d(3, momentum=momentum) for _ in range(2))
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-0.5, 0.5)
    ours.load_state_dict(ref.state_dict())
    for _ in range(2):
        expected = ref(z)
        y, (mean, _, _, _) = batchnorm_train_forward(z, ours)
        assert torch.equal(y, expected)
        assert torch.allclose(mean, z.mean(dim=(0, 2, 3)))
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            assert torch.equal(getattr(ours, name), getattr(ref, name)), name


def test_roofline_records_the_iterations_convolutions(tmp_path):
    import roofline

    out = tmp_path / "roof"
    roofline.main(
        [
            "--modes",
            "lean",
            "plain",
            "--layers",
            TINY,
            "--batch",
            "2",
            "--T",
            "1",
            "--iters",
            "1",
            "--device",
            "cpu",
            "--out",
            str(out),
        ]
    )
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["meta"]["cpu"] and saved["meta"]["threads"] >= 1
    rows = {r["mode"]: r for r in saved["rows"]}
    assert set(rows) == {"lean", "plain"}
    for r in rows.values():
        assert {"model", "batch", "T", "mode", "iteration_ms", "conv_ms", "conv_share"} <= set(r)
        assert r["model"] == TINY and r["batch"] == 2 and r["T"] == 1
        assert r["conv_ms"] > 0 and r["conv_share"] == r["conv_ms"] / r["iteration_ms"]
        assert r["same_flips_as_other_modes"]
    # plain, one time step: 2 convs forward; backward: the first conv's weight (and bias)
    # gradient, the binary conv's input and weight gradients (two calls, as _TracedConv2d makes)
    assert rows["plain"]["conv_calls"] == {"forward": 2, "backward": 3}
    # lean: the first conv's output is recomputed in backward from the image
    assert rows["lean"]["conv_calls"] == {"forward": 3, "backward": 3}
    assert rows["plain"]["over_plain"] == 1.0
    assert "| lean |" in out.with_suffix(".md").read_text()


def test_conv_flops_count_forward_and_backward_gemms():
    import roofline
    from roofline import ConvRecorder, ConvReplay

    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    w = torch.randn(8, 4, 3, 3, requires_grad=True)
    with ConvRecorder() as rec:
        torch.nn.functional.conv2d(x, w, padding=1).sum().backward()
    replay = ConvReplay(rec.calls)
    macs = 2 * 8 * 6 * 6 * 4 * 3 * 3
    assert replay.counts == {"forward": 1, "backward": 1}
    assert replay.flops == 2 * macs * 3  # forward, input gradient, weight gradient
    replay()  # runs on tensors of the recorded layouts
    assert roofline.conv_flops(*rec.calls[0][:2]) == 2 * macs


def test_memopt_wrapping_keeps_flips_and_outputs():
    """spikingjelly's memopt as the comparison applies it (checkpoint per block, bit compression
    where the input is 0/1) computes what the unwrapped model computes, online and BPTT."""
    from memopt import MallocPeak, build

    torch.manual_seed(0)
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    cpu = torch.device("cpu")
    for method in ("tbso", "bptt"):
        plain = build(f"{method}_plain", 2, TINY, cpu)
        wrapped = build(
            f"{method}_memopt" if method == "bptt" else "tbso_plain_memopt", 2, TINY, cpu
        )
        assert type(wrapped[0].blocks[1]).__name__ == "CheckpointWrapper"
        for _ in range(2):
            a = plain[1].train_batch(plain[0], plain[2], x, y)
            with MallocPeak() as meter:
                b = wrapped[1].train_batch(wrapped[0], wrapped[2], x, y)
            assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])
        assert meter.peak_bytes > 0


def test_bench_gpu_flip_check_runs_on_the_cpu():
    import gpu

    check = gpu.flip_check("tbso", 2, 2, 2, TINY, torch.device("cpu"))
    assert set(check["same_flips_as_plain"]) == {"lean", "plain", "lean_fused", "plain_fused"}
    assert check["same_flips"] and check["same_final_weights"] and check["same_momentum"]
    assert check["batches"] == 2 and sum(check["flips_per_batch"]) > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal of a non-CUDA device")
def test_bench_gpu_refuses_a_cpu_device_without_allow_cpu(tmp_path):
    import gpu

    with pytest.raises(SystemExit) as exit_:
        gpu.main(["--device", "cpu", "--out", str(tmp_path / "g")])
    assert "needs a GPU" in str(exit_.value.code)
    assert not list(tmp_path.iterdir())
