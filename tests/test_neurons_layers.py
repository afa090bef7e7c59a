"""LIF dynamics, presynaptic traces, traced synaptic layers and the online gradient."""

import pytest
import torch
from torch import nn

from bso.engine.common import instantaneous_loss
from bso.layers import SynapticConv2d, SynapticLinear, named_binary_parameters
from bso.models import SpikingVGG
from bso.neurons import LIFNode, configure_neurons, reset_neurons

LAMBDA = 0.5


def _sigmoid_surrogate_grad(x, alpha=4.0):
    s = torch.sigmoid(alpha * x)
    return alpha * s * (1 - s)


def test_lif_follows_the_paper_dynamics():
    neuron = LIFNode()
    inputs = [
        torch.tensor([0.6, 1.5, -0.3]),
        torch.tensor([0.6, 0.2, 2.0]),
        torch.tensor([0.5, 0.0, 0.0]),
    ]
    u_prev, s_prev = torch.zeros(3), torch.zeros(3)
    for x in inputs:
        u = LAMBDA * (u_prev - 1.0 * s_prev) + x  # u[t] = lambda (u[t-1] - V_th s[t-1]) + I[t]
        s = (u >= 1.0).float()
        assert torch.equal(neuron(x), s)
        assert torch.allclose(neuron.v, u - s)  # spikingjelly stores u[t] - V_th s[t]
        u_prev, s_prev = u, s
    reset_neurons(neuron)
    assert neuron.v == 0.0 and neuron.trace is None


@pytest.mark.parametrize("v_reset", [0.0, -0.25])
def test_lif_with_a_hard_reset_sets_the_potential_to_v_reset(v_reset):
    """v_reset = a number (model.neuron.v_reset): h[t] = v[t-1] - (v[t-1] - v_r) / tau + I[t],
    v[t] = v_r where s[t] = 1 (NIR's LIF); the default (None) subtracts V_th."""
    assert LIFNode().v_reset is None
    neuron = LIFNode(v_reset=v_reset, v_threshold=0.75)
    inputs = [torch.tensor([0.5, 1.5, -0.25]), torch.tensor([0.5, 0.25, 2.0])]
    v = torch.full((3,), v_reset)
    for x in inputs:
        h = v - (v - v_reset) * 0.5 + x
        s = (h >= 0.75).float()
        assert torch.equal(neuron(x), s)
        v = torch.where(s.bool(), torch.full_like(h, v_reset), h)
        assert torch.equal(neuron.v, v)
    assert neuron(torch.tensor([0.0, 0.0, 0.0])).sum() == 0  # after the resets: below threshold


@pytest.mark.parametrize("rule", ["ottt", "ndot", "ndot_paper"])
def test_presynaptic_trace_rules(rule):
    """a_hat[t] = mu[t] a_hat[t-1] + s[t], a_hat[1] = s[1], with mu[t] by rule (paper Eq. 9):
    ottt: lambda; ndot_paper: v[t] / v[t-1]; ndot (released code): p[t] / p[t-1] with
    p = v - V_th s (V_th s subtracted a second time); clamped to [-lambda, lambda], lambda where the
    ratio is not finite."""
    neuron = LIFNode()
    configure_neurons(neuron, detach_state=True, trace_rule=rule)
    g = torch.Generator().manual_seed(0)
    xs = [torch.rand(50, generator=g) * 2 - 0.3 for _ in range(5)]
    xs[1][:5] = 0.0  # some potentials that stay 0: the ratio's denominator is 0 next step
    trace, q_prev = None, None
    for x in xs:
        s = neuron(x)
        v = neuron.v  # post-reset potential u - V_th s
        q = {"ottt": v, "ndot_paper": v, "ndot": v - 1.0 * s}[rule]
        if trace is None:
            trace = s
        else:
            if rule == "ottt":
                mu = torch.full_like(v, LAMBDA)
            else:
                ratio = q / q_prev
                mu = torch.where(torch.isfinite(ratio), ratio, LAMBDA).clamp(-LAMBDA, LAMBDA)
            trace = mu * trace + s
        assert torch.allclose(neuron.trace, trace)
        assert not neuron.trace.requires_grad
        q_prev = q.detach()


def test_a_new_neuron_carries_the_graph_across_time_steps_until_configured():
    """A LIF neuron alone is BPTT's (the potential keeps its graph from step to step);
    configure_neurons(detach_state=True), the online engines', cuts it."""
    for detach in (None, True):
        neuron = LIFNode()
        if detach:
            configure_neurons(neuron, detach_state=True, trace_rule="ottt")
        x1 = torch.tensor([0.8], requires_grad=True)
        neuron(x1)
        s2 = neuron(torch.tensor([0.5]))  # u = 0.5 * 0.8 + 0.5 = 0.9: no spike, a surrogate slope
        assert s2.requires_grad != bool(detach)
        if not detach:
            assert torch.autograd.grad(s2.sum(), x1)[0].item() > 0


def test_ndot_trace_decays_by_lambda_where_the_previous_ratio_is_not_finite():
    """t=1: input 2 -> u = 2, spike, v = 1, p = v - s = 0 (every neuron). t=2, inputs 0, 1, 1.5:
    u = 0.5, 1.5, 2 -> p = 0.5, -0.5, 0: ratios +inf, -inf, nan -> mu = lambda = 0.5, so
    a_hat = 0.5 * 1 + s = 0.5, 1.5, 1.5."""
    neuron = LIFNode()
    configure_neurons(neuron, detach_state=True, trace_rule="ndot")
    neuron(torch.full((3,), 2.0))
    assert neuron.trace.tolist() == [1.0, 1.0, 1.0]
    assert neuron(torch.tensor([0.0, 1.0, 1.5])).tolist() == [0.0, 1.0, 1.0]
    assert neuron.trace.tolist() == [0.5, 1.5, 1.5]


def test_release_and_paper_ndot_traces_differ():
    """The released code's NDOT trace is not the paper's formula (they agree only at t = 1)."""
    traces = {}
    for rule in ("ndot", "ndot_paper"):
        neuron = LIFNode()
        configure_neurons(neuron, detach_state=True, trace_rule=rule)
        g = torch.Generator().manual_seed(1)
        traces[rule] = []
        for _ in range(4):
            neuron(torch.rand(200, generator=g) * 2)
            traces[rule].append(neuron.trace.clone())
    assert torch.equal(traces["ndot"][0], traces["ndot_paper"][0])
    assert not torch.allclose(traces["ndot"][3], traces["ndot_paper"][3])


def test_traced_layers_use_trace_for_weight_grad_and_spikes_for_values():
    g = torch.Generator().manual_seed(0)
    spikes = (torch.rand(2, 3, 5, 5, generator=g) > 0.5).float().requires_grad_()
    trace = torch.rand(2, 3, 5, 5, generator=g)
    conv = SynapticConv2d(3, 4, 3, padding=1, bias=False, weights="binary")
    out = conv(spikes, trace)
    assert torch.equal(out, conv(spikes))  # forward value from the spikes, exactly
    grad_out = torch.randn(out.shape, generator=g)
    out.backward(grad_out)
    ref = SynapticConv2d(3, 4, 3, padding=1, bias=False, weights="full")
    ref.weight.data.copy_(conv.weight)
    trace_in = trace.clone().requires_grad_()
    ref(trace_in).backward(grad_out)
    assert torch.allclose(conv.weight.grad, ref.weight.grad, atol=1e-5)  # dW from the trace
    assert torch.allclose(spikes.grad, trace_in.grad, atol=1e-5)  # dx = W^T delta either way

    lin = SynapticLinear(6, 3, weights="full")
    s = (torch.rand(4, 6, generator=g) > 0.5).float()
    a = torch.rand(4, 6, generator=g)
    out = lin(s, a)
    assert torch.allclose(out, lin(s))
    delta = torch.randn(4, 3, generator=g)
    out.backward(delta)
    assert torch.allclose(lin.weight.grad, delta.t() @ a, atol=1e-6)
    assert torch.allclose(lin.bias.grad, delta.sum(0), atol=1e-6)


def test_binary_layers_are_initialised_to_exactly_pm1():
    model = SpikingVGG("16C3-32C3-AP2-32C3", in_channels=1, num_classes=10)
    named = named_binary_parameters(model)
    assert [n for n, _ in named] == ["blocks.1.conv.weight", "blocks.2.conv.weight"]
    for _, w in named:
        assert set(w.unique().tolist()) == {-1.0, 1.0}
    assert model.blocks[0].conv.weights == "full" and model.blocks[0].conv.bias is not None
    assert model.classifier.weights == "full"
    linear = SynapticLinear(16, 8, weights="binary", bias=False)
    assert set(linear.weight.unique().tolist()) == {-1.0, 1.0}
    with pytest.raises(ValueError, match="no bias"):
        SynapticConv2d(3, 4, 3, bias=True, weights="binary")
    with pytest.raises(ValueError, match="weight mode"):
        SynapticConv2d(3, 4, 3, weights="ternary")


class TwoLayer(nn.Module):
    """input -> full-precision linear -> LIF -> binary linear (no bias) -> output."""

    def __init__(self):
        super().__init__()
        self.fc1 = SynapticLinear(4, 6, weights="full")
        self.neuron = LIFNode()
        self.fc2 = SynapticLinear(6, 3, weights="binary", bias=False)

    def forward(self, x):
        s = self.neuron(self.fc1(x))
        return self.fc2(s, self.neuron.trace)


def test_online_gradient_equals_ottt_formula_by_hand():
    """G[t] = delta[t] a_hat[t]^T for the binary layer; the first layer's gradient flows only
    through step t's surrogate (the membrane potential from t-1 is detached)."""
    torch.manual_seed(3)
    net = TwoLayer()
    with torch.no_grad():
        net.fc1.weight.mul_(4.0)  # enough drive for spikes
    configure_neurons(net, detach_state=True, trace_rule="ottt")
    T = 4
    xs = [torch.randn(5, 4) for _ in range(T)]
    cs = [torch.randn(5, 3) for _ in range(T)]  # L[t] = sum(c_t * o[t])  =>  delta[t] = c_t
    W1, b1, W2 = net.fc1.weight.detach(), net.fc1.bias.detach(), net.fc2.weight.detach()
    a_hat, v_post = torch.zeros(5, 6), torch.zeros(5, 6)
    spiked = 0
    for t in range(T):
        net.zero_grad()
        (net(xs[t]) * cs[t]).sum().backward()
        u = LAMBDA * v_post + xs[t] @ W1.t() + b1
        s = (u >= 1.0).float()
        spiked += int(s.sum())
        a_hat = LAMBDA * a_hat + s
        assert torch.allclose(net.fc2.weight.grad, cs[t].t() @ a_hat, atol=1e-5)
        delta_u = (cs[t] @ W2) * _sigmoid_surrogate_grad(u - 1.0)
        assert torch.allclose(net.fc1.weight.grad, delta_u.t() @ xs[t], atol=1e-5)
        v_post = u - s
    assert spiked > 0


@pytest.mark.parametrize("trace", ["ottt", "ndot"])
def test_online_gradient_at_T1_equals_plain_backprop(trace):
    torch.manual_seed(0)
    model = SpikingVGG("8C3-16C3-AP2-16C3", in_channels=1, num_classes=10)
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))
    grads = {}
    for mode in ("online", "plain"):
        configure_neurons(
            model, detach_state=mode == "online", trace_rule=trace if mode == "online" else None
        )
        reset_neurons(model)
        model.zero_grad()
        instantaneous_loss(model(x), y, 0.05, T=1).backward()
        grads[mode] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for name, g in grads["plain"].items():
        assert torch.allclose(grads["online"][name], g, atol=1e-6), name
    assert any(g.abs().sum() > 0 for n, g in grads["plain"].items() if "blocks.1" in n)
