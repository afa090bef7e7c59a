"""The GPU fast path (bso.fastpath): defaults change nothing on CPU; bf16 autocast keeps the flip
rule in float32; impossible requests are refused."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from bso import fastpath
from bso.data import build_dataloaders
from bso.layers import binary_weight_values, named_binary_parameters
from bso.optim import build_optimizer
from conftest import compose_config

CPU = torch.device("cpu")


def _setup(*overrides):
    cfg = compose_config("engine.T=3", *overrides)
    torch.set_num_threads(1)  # a tiny model: a second thread only contends on a busy machine
    torch.manual_seed(0)
    model = instantiate(cfg.model)
    engine = instantiate(cfg.engine)
    engine.prepare(model)
    return cfg, model, engine


def _batches(cfg, n=2):
    loader, _ = build_dataloaders(cfg.dataset, seed=cfg.seed)
    return [batch for _, batch in zip(range(n), loader, strict=False)]


def test_defaults_on_cpu_train_bit_identically_to_no_fast_path():
    cfg, plain, engine = _setup()
    _, fast, _ = _setup()
    assert cfg.fast.channels_last and cfg.fast.cudnn_benchmark  # on by default (CUDA-only)
    assert not cfg.fast.autocast and not cfg.fast.compile
    trained = fastpath.apply(fast, cfg.fast, CPU)
    assert trained is fast  # nothing wraps the model on CPU with the defaults
    runs, batches = [], _batches(cfg)
    for model in (plain, trained):
        router = build_optimizer(model, cfg.optimizer)
        model.train()
        runs.append([engine.train_batch(model, router, x, y) for x, y in batches])
    for (s0, l0, f0), (s1, l1, f1) in zip(*runs, strict=True):
        assert torch.equal(s0, s1) and torch.equal(l0, l1) and torch.equal(f0, f1)
    for (name, w0), (_, w1) in zip(
        plain.state_dict().items(), fast.state_dict().items(), strict=True
    ):
        assert torch.equal(w0, w1), name


@pytest.mark.parametrize("lean", [False, True])
def test_bf16_autocast_keeps_gradients_and_flip_rule_in_float32(lean, monkeypatch):
    cfg, model, engine = _setup("fast.autocast=true", f"engine.lean={str(lean).lower()}")
    trained = fastpath.apply(model, cfg.fast, CPU)
    assert isinstance(trained, fastpath.AutocastForward)
    router = build_optimizer(model, cfg.optimizer)
    conv_dtypes, grad_dtypes = [], []
    binary = [w for _, w in named_binary_parameters(model)]
    model.blocks[1].conv.register_forward_hook(lambda m, i, o: conv_dtypes.append(o.dtype))
    step = router.step

    def checking_step(t=None):
        if not lean:
            grad_dtypes.extend(w.grad.dtype for w in binary)
        return step(t)

    if lean:  # the binary update runs inside backward: check the gradient it is handed
        import bso.lean.layers

        fused = bso.lean.layers.update_in_backward

        def checking_fused(layer, weight, grad):
            grad_dtypes.append(grad.dtype)
            return fused(layer, weight, grad)

        monkeypatch.setattr(bso.lean.layers, "update_in_backward", checking_fused)

    router.step = checking_step
    trained.train()
    ((x, y),) = _batches(cfg, 1)
    summed, loss, flips = engine.train_batch(trained, router, x, y)
    assert set(conv_dtypes) == {torch.bfloat16}  # the forward did run in bf16 ...
    assert summed.dtype == loss.dtype == torch.float32  # ... and handed float32 on
    assert grad_dtypes and set(grad_dtypes) == {torch.float32}
    for w in binary:
        if not lean:
            assert set(w.unique().tolist()) <= {-1.0, 1.0}
        state = router.binary.state[w]
        assert state["momentum"].dtype == state["v"].dtype == torch.float32
    for _, values in binary_weight_values(model):  # packed or not: exactly +-1
        assert set(values.unique().tolist()) <= {-1.0, 1.0}
    assert int(flips.sum()) > 0


def test_impossible_or_unknown_switches_are_refused():
    fast = OmegaConf.create(
        {"channels_last": True, "cudnn_benchmark": True, "autocast": False, "compile": True}
    )
    with pytest.raises(ValueError, match="fast.compile=true.*CUDA"):
        fastpath.check(fast, CPU)
    with pytest.raises(ValueError, match="must be true or false"):
        fastpath.check(OmegaConf.create({"autocast": "bf16"}), CPU)
    with pytest.raises(ValueError, match="unknown fast"):
        fastpath.check(OmegaConf.create({"channels_first": True}), CPU)
    from hydra.errors import ConfigCompositionException

    with pytest.raises(
        ConfigCompositionException, match="Could not override 'fast.channels_first'"
    ):
        compose_config("fast.channels_first=true")  # and Hydra refuses it on the command line


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA"
)
def test_bench_gpu_refuses_without_cuda_and_writes_nothing(tmp_path, monkeypatch):
    import runpy

    from conftest import ROOT

    out = tmp_path / "gpu"
    monkeypatch.syspath_prepend(str(ROOT / "scripts" / "bench"))
    monkeypatch.setattr("sys.argv", ["gpu.py", "--out", str(out)])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(ROOT / "scripts" / "bench" / "gpu.py"), run_name="__main__")
    assert "needs a GPU" in str(exit_.value.code)  # a message, so the exit status is 1
    assert not list(tmp_path.iterdir())


def test_channels_last_layout_trains_like_contiguous():
    """fast.channels_last acts on CUDA only, but the layout itself can be checked on the CPU: the
    same first step and weight gradient G[0], and the flip rule keeps NHWC weights +-1."""
    from bso.engine import input_at, instantaneous_loss
    from bso.neurons import reset_neurons

    # float weights (engine.lean=false): packed weights are 1-D bits, unpacked in the default layout
    cfg, plain, engine = _setup("engine.lean=false")
    _, nhwc, _ = _setup("engine.lean=false")
    nhwc.to(memory_format=torch.channels_last)
    binary = [w for _, w in named_binary_parameters(nhwc)]
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in binary if w.dim() == 4)
    ((x, y),) = _batches(cfg, 1)
    grads, outputs = [], []
    for model in (plain, nhwc):
        model.train()
        reset_neurons(model)
        out = model(input_at(x, 0))
        instantaneous_loss(out, y, engine.mse_weight, engine.T).backward()
        outputs.append(out.detach())
        grads.append([w.grad for _, w in named_binary_parameters(model)])
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-6)
    for g0, g1 in zip(*grads, strict=True):
        torch.testing.assert_close(g1, g0, rtol=1e-4, atol=1e-7)
    router = build_optimizer(nhwc, cfg.optimizer)
    _, _, flips = engine.train_batch(nhwc, router, x, y)
    assert int(flips.sum()) > 0
    for w in binary:
        assert set(w.unique().tolist()) == {-1.0, 1.0}
        assert w.dim() != 4 or w.is_contiguous(memory_format=torch.channels_last)


def test_reuse_host_memory_sets_glibc_malloc_options_or_refuses(monkeypatch):
    calls = []

    def fake_mallopt(param, value):
        calls.append((param, value))
        return 1

    monkeypatch.setattr(fastpath, "glibc_mallopt", lambda: fake_mallopt)
    fastpath.apply(nn_model(), OmegaConf.create({"reuse_host_memory": False}), CPU)
    assert calls == []  # off by default
    fastpath.apply(nn_model(), OmegaConf.create({"reuse_host_memory": True}), CPU)
    # no mmap for large blocks, no trimming of the heap's free top
    assert calls == [(fastpath.M_MMAP_MAX, 0), (fastpath.M_TRIM_THRESHOLD, 2**31 - 1)]
    with pytest.raises(ValueError, match="must be true or false"):
        fastpath.check(OmegaConf.create({"reuse_host_memory": "auto"}), CPU)
    monkeypatch.setattr(fastpath, "glibc_mallopt", lambda: None)  # macOS, musl
    with pytest.raises(ValueError, match="not glibc.*false"):
        fastpath.check(OmegaConf.create({"reuse_host_memory": True}), CPU)


def nn_model():
    return torch.nn.Linear(2, 2)
