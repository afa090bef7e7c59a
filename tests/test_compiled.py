"""backend=fused (bso.compiled): the compiled online LIF step, trace and surrogate backward give the
release backend's eager values bit for bit; what cannot be fused is refused in one line. (The golden
tests in test_release_parity.py replay the released code's runs under the fused backend too.)"""

from __future__ import annotations

import sys

import pytest
import torch
from hydra.utils import instantiate

from bso import backend
from bso.compiled import FusedAvgPool2d
from bso.lean.batchnorm_lif import lif_input_gradient
from bso.neurons import LIFNode
from conftest import compose_config


def _states(shape, generator):
    """Potentials around the threshold (spikes and non-spikes), p[t-1] with zeros (the NDOT ratio's
    non-finite branch) and negative values (its clamp)."""
    v = torch.randn(shape, generator=generator) * 0.8
    p = torch.randn(shape, generator=generator)
    p.view(-1)[::5] = 0.0
    trace = torch.rand(shape, generator=generator)
    return v, trace, p


def _run(neuron, steps):
    """Outputs, states and input gradients of a few time steps of ``neuron``."""
    neuron.reset()
    record = []
    for x, grad in steps:
        x = x.clone().requires_grad_()
        spike = neuron(x)
        spike.backward(grad)
        record.append((spike.detach(), neuron.v.detach(), neuron.trace, x.grad))
    return record


@pytest.mark.parametrize("rule", ["ndot", "ndot_paper", "ottt"])
def test_fused_step_equals_the_eager_step_bit_for_bit(rule):
    g = torch.Generator().manual_seed(0)
    shape = (3, 5, 7, 9)  # no power of two: the compiled loops' vector tails run too
    steps = [
        (torch.randn(shape, generator=g) * 1.5, torch.randn(shape, generator=g)) for _ in range(4)
    ]
    runs = []
    for name in ("release", "fused"):
        neuron = LIFNode(tau=2.0 if rule == "ndot" else 3.0, backend=name)
        neuron.detach_state, neuron.trace_rule = True, rule
        runs.append(_run(neuron, steps))
    eager, fused = runs
    spikes = 0
    for t, (a, b) in enumerate(zip(eager, fused, strict=True)):
        for name, x, y in zip(("spike", "v", "trace", "grad"), a, b, strict=True):
            assert torch.equal(x, y), (t, name)
        spikes += int(a[0].sum())
    assert 0 < spikes < 4 * eager[0][0].numel()  # both branches of the threshold were taken


def test_fused_lean_backward_equals_the_eager_one():
    g = torch.Generator().manual_seed(1)
    v, _, _ = _states((4, 6, 5, 5), g)
    spike = (torch.rand(v.shape, generator=g) < 0.3).float()
    grad = torch.randn(v.shape, generator=g)
    grads = []
    for name in ("release", "fused"):
        neuron = LIFNode(backend=name)
        neuron.detach_state, neuron.trace_rule = True, "ndot"
        grads.append(lif_input_gradient(neuron, grad, v, spike))
    assert torch.equal(grads[0], grads[1])


def test_ndot_trace_fused_from_hand_built_states():
    """The released NDOT rule on hand-built values: mu = clamp(p[t] / p[t-1], -lambda, lambda), lambda
    where p[t-1] = 0; checks the fused step's numbers, not only its agreement with eager."""
    neuron = LIFNode(backend="fused")  # tau 2: lambda 0.5, V_th 1
    neuron.detach_state, neuron.trace_rule = True, "ndot"
    neuron.reset()
    x0 = torch.tensor([1.5, 0.2, 0.4, 0.9])
    neuron(x0.clone().requires_grad_())  # s = [1, 0, 0, 0], v = [0.5, 0.2, 0.4, 0.9]
    torch.testing.assert_close(neuron.trace, torch.tensor([1.0, 0.0, 0.0, 0.0]))
    # p[0] = v - s = [-0.5, 0.2, 0.4, 0.9]
    neuron.trace_potential = torch.tensor([-0.5, 0.2, 0.0, 0.9])  # a zero denominator
    x1 = torch.tensor([1.0, 0.1, 0.0, 0.6])
    spike = neuron(x1.clone().requires_grad_())
    # h = v/2 + x = [1.25, 0.2, 0.2, 1.05]: s = [1, 0, 0, 1], v = [0.25, 0.2, 0.2, 0.05]
    assert spike.tolist() == [1.0, 0.0, 0.0, 1.0]
    # p = v - s = [-0.75, 0.2, 0.2, -0.95]; mu = [0.5 (1.5 clamped), 0.5 (1.0 clamped), 0.5 (0
    # denominator), -0.5 (-1.06 clamped)]; trace = mu * [1, 0, 0, 0] + s
    assert neuron.trace.tolist() == [1.5, 0.0, 0.0, 1.0]


def test_fusing_a_bptt_model_or_without_a_compiler_is_refused(monkeypatch):
    cfg = compose_config("engine=bptt", "optimizer=adam", "model.weights=latent")
    model = instantiate(cfg.model)
    instantiate(cfg.engine).prepare(model)
    with pytest.raises(ValueError, match="backend=fused.*not an online neuron.*backend=release"):
        backend.apply(model, "fused")

    cfg = compose_config("backend=fused")
    model = instantiate(cfg.model)
    instantiate(cfg.engine).prepare(model)
    monkeypatch.setenv("CXX", "no-such-compiler++")  # the compiler named by the environment
    with pytest.raises(RuntimeError, match="C\\+\\+ compiler.*no-such-compiler.*CXX"):
        backend.apply(model, cfg.backend)
    assert backend.apply(model, cfg.backend, torch.device("cuda")) is model  # no C++ needed
    assert all(n.backend == "fused" for n in model.modules() if isinstance(n, LIFNode))
    monkeypatch.undo()
    assert backend.apply(model, cfg.backend) is model
    neurons = [m for m in model.modules() if isinstance(m, LIFNode)]
    assert neurons and all(n.backend == "fused" for n in neurons)


def test_the_compiler_check_reads_its_argument_then_cxx(monkeypatch):
    from bso.compiled import check_compiler, cpp_compiler

    monkeypatch.delenv("CXX", raising=False)
    assert cpp_compiler() == "g++" and cpp_compiler("clang++") == "clang++"
    monkeypatch.setenv("CXX", "gcc-from-env")
    assert cpp_compiler() == "gcc-from-env" and cpp_compiler("named++") == "named++"
    with pytest.raises(RuntimeError, match="C\\+\\+ compiler \\(gcc-from-env\\)"):
        check_compiler()
    with pytest.raises(RuntimeError, match="C\\+\\+ compiler \\(no-such-c\\+\\+\\)"):
        check_compiler("no-such-c++")
    check_compiler(sys.executable)  # an executable on PATH passes the check


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(kernel_size=2),
        dict(kernel_size=3, stride=2, padding=1),
        dict(kernel_size=3, stride=1, padding=1, count_include_pad=False),
    ],
    ids=["2x2", "3x3-stride2-pad1", "3x3-overlap-nopad-count"],
)
def test_fused_average_pool_equals_torchs_bit_for_bit(kwargs):
    g = torch.Generator().manual_seed(3)
    x = torch.rand((2, 3, 9, 7), generator=g) * 3  # a trace-like float input, odd sizes
    grad = torch.randn((2, 3, 9, 7), generator=g)
    eager = torch.nn.AvgPool2d(**kwargs)
    fused = FusedAvgPool2d(**kwargs)
    outs = []
    for pool in (eager, fused):
        xi = x.clone().requires_grad_()
        y = pool(xi)
        y.backward(grad[..., : y.shape[-2], : y.shape[-1]])
        outs.append((y.detach(), xi.grad))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_lean_pool_backward_fused_equals_torchs():
    """The lean mode's pool backward (from the spikes' shape alone), compiled for a fused pool."""
    from bso.lean.batchnorm_lif import _avg_pool2d_backward

    grad = torch.randn((4, 8, 5, 5), generator=torch.Generator().manual_seed(4))
    pool = torch.nn.AvgPool2d(2)
    eager = _avg_pool2d_backward(grad, pool, (4, 8, 10, 11))
    assert torch.equal(_avg_pool2d_backward(grad, FusedAvgPool2d(2), (4, 8, 10, 11)), eager)
