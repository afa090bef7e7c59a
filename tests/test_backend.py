"""bso.backend: one choice (release | fast | fused) decides, per module kind, which implementation
runs; it is checked once, and what cannot run is refused in one line."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from bso import backend, compiled
from bso.lean import batchnorm_lif as lean
from bso.neurons import LIFNode
from bso.optim import BSO, TBSO
from bso.optim.binary import FastOrder, ReleaseOrder
from bso.train import build_model
from bso.validate import ConfigError, validate
from conftest import compose_config


def online(neuron: LIFNode) -> LIFNode:
    neuron.detach_state, neuron.trace_rule = True, "ndot"
    return neuron


def test_each_backend_picks_its_neuron_step_and_lean_gradient():
    steps = {name: backend.neuron_step(online(LIFNode(backend=name))) for name in backend.BACKENDS}
    assert steps == {
        "release": LIFNode.release_online_step,
        "fast": LIFNode.spikingjelly_online_step,
        "fused": compiled.fused_step,
    }
    gradients = {
        name: backend.lean_input_gradient(online(LIFNode(backend=name)))
        for name in backend.BACKENDS
    }
    assert gradients == {
        "release": lean.release_input_gradient,
        "fast": lean.spikingjelly_input_gradient,
        "fused": compiled.lif_input_gradient_from_state,
    }


def test_fused_runs_the_release_step_where_its_loops_do_not_apply():
    fused = LIFNode(backend="fused")  # not configured: a BPTT neuron, no trace
    assert backend.neuron_step(fused) is LIFNode.release_online_step
    online(fused)
    with torch.no_grad():  # evaluation: no trace, no graph
        assert backend.neuron_step(fused) is LIFNode.release_online_step
    assert backend.neuron_step(fused) is compiled.fused_step
    hard_reset = online(LIFNode(backend="fused", v_reset=0.0))  # not the release's neuron
    assert backend.neuron_step(hard_reset) is LIFNode.spikingjelly_online_step
    assert (
        backend.why_not_fused(hard_reset)
        == "it has a hard reset or a decayed input (not the paper's LIF)"
    )


def test_the_optimizer_runs_the_release_order_under_release_and_fused():
    assert backend.optimizer_arithmetic("release") is ReleaseOrder
    assert backend.optimizer_arithmetic("fused") is ReleaseOrder
    assert backend.optimizer_arithmetic("fast") is FastOrder
    w = torch.nn.Parameter(torch.ones(3))
    assert TBSO([w], 2, backend="fused").param_groups[0]["backend"] == "fused"
    # M = (1 - b) M + b G vs beta M + (1 - beta) G: 0.1 * 0.3 rounds differently in float32
    grad = torch.tensor([0.3, -0.7, 1e-3])
    momenta = {}
    for name in backend.BACKENDS:
        opt = BSO([torch.nn.Parameter(torch.ones(3))], gamma=10.0, beta=0.9, backend=name)
        for p in opt.binary_weights():
            p.grad = grad.clone()
        opt.step()
        momenta[name] = opt.state[opt.binary_weights()[0]]["momentum"]
    b = 1 - 0.9
    assert torch.equal(momenta["release"], torch.zeros(3).mul_(1 - b).add_(b * grad))
    assert torch.equal(momenta["fused"], momenta["release"])
    assert torch.equal(momenta["fast"], torch.zeros(3).mul_(0.9).add_(grad, alpha=1 - 0.9))


def test_unknown_backends_are_refused_in_one_line():
    for build in (
        lambda: backend.check("fastest"),
        lambda: LIFNode(backend="fastest"),
        lambda: BSO([torch.nn.Parameter(torch.ones(2))], backend="fastest"),
    ):
        with pytest.raises(ValueError, match=r"unknown backend 'fastest'; choose one of") as err:
            build()
        assert "\n" not in str(err.value)


def test_the_fused_backend_replaces_the_pools_by_new_modules(monkeypatch):
    cfg = compose_config()
    model = instantiate(cfg.model)
    instantiate(cfg.engine).prepare(model)
    before = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.AvgPool2d)}
    args = {n: (m.kernel_size, m.stride, m.padding) for n, m in before.items()}
    seen = []
    for m in before.values():  # a hook on a pool (bso.convert's trace links) goes with it
        m.register_forward_hook(lambda module, inputs, out: seen.append(type(module)))
    assert before and backend.apply(model, "fused", torch.device("cuda")) is model
    # the pools' own forward, not compiled here (tests/test_compiled.py checks the compiled one)
    monkeypatch.setattr(compiled.FusedAvgPool2d, "forward", torch.nn.AvgPool2d.forward)
    after = dict(model.named_modules())
    for name, old in before.items():
        new = after[name]
        assert type(new) is compiled.FusedAvgPool2d and type(old) is torch.nn.AvgPool2d
        assert (new.kernel_size, new.stride, new.padding) == args[name]
        assert backend.pool_input_gradient(new) is compiled.average_pool_input_gradient
        with pytest.raises(
            RuntimeError, match=r"replaced by a FusedAvgPool2d in its model \(backend=fused\)"
        ):
            old(torch.zeros(1, 1, 2, 2))
        new(torch.zeros(1, 1, 2, 2))
    assert seen == [compiled.FusedAvgPool2d] * len(before)
    assert backend.pool_input_gradient(old) is torch.ops.aten.avg_pool2d_backward


def test_train_refuses_fused_with_bptt_and_an_unknown_backend_before_any_work():
    overrides = ["backend=fused", "engine=bptt", "optimizer=adam", "model.weights=latent"]
    cfg = compose_config(*overrides)
    with pytest.raises(
        ValueError, match=r"^backend=fused .* not an online neuron .*backend=release"
    ):
        build_model(cfg, torch.device("cpu"))
    cfg = compose_config("backend=fastest")
    with pytest.raises(
        ConfigError, match=r"^backend=fastest: must be one of release \| fast \| fused"
    ):
        validate(cfg, ["backend=fastest"])


@pytest.mark.parametrize(
    "override,message",
    [
        ("fast.fuse_elementwise=true", "no config file defines fast.fuse_elementwise"),
        ("optimizer.binary.float_order=fast", "bso.optim.TBSO takes no argument float_order"),
        ("model.neuron.float_order=release", "no config file defines model.neuron.float_order"),
    ],
)
def test_the_former_switches_are_unknown_keys(override, message):
    from hydra.errors import ConfigCompositionException

    key = override.split("=")[0]
    with pytest.raises(ConfigCompositionException, match=f"Could not override '{key}'"):
        compose_config(override)
    cfg = compose_config()
    with pytest.raises(ConfigError, match=f"^\\+{override}: {message}"):
        validate(cfg, [f"+{override}"])


def test_the_optimizer_takes_the_runs_backend_only():
    from bso.optim import build_optimizer

    cfg = compose_config("backend=fast")
    model = instantiate(cfg.model)
    router = build_optimizer(model, cfg.optimizer, cfg.backend)
    assert router.binary.param_groups[0]["backend"] == "fast"
    cfg = compose_config("+optimizer.binary.backend=fast")
    with pytest.raises(ValueError, match="^optimizer.binary.backend: .* top-level key backend="):
        build_optimizer(model, cfg.optimizer, cfg.backend)
