"""BPTT engine, latent weights (sign + STE), plain optimizers and their compatibility checks."""

import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from bso.engine import BPTTEngine, OnlineEngine
from bso.layers import SynapticConv2d, SynapticLinear
from bso.neurons import reset_neurons
from bso.optim import PlainOptimizer, build_optimizer
from conftest import compose_config
from test_neurons_layers import TwoLayer


class _Recorder:
    """Stands in for an optimizer: records the gradients the engine produces, never updates."""

    binary_names: list = []
    binary = None  # no binary optimizer to check against the model

    def __init__(self, model):
        self.model, self.grads = model, []

    def zero_grad(self):
        self.model.zero_grad(set_to_none=True)

    def begin_time_step(self, t):
        pass

    def step(self, t=None):
        self.grads.append({n: p.grad.clone() for n, p in self.model.named_parameters()})
        return torch.zeros(0, dtype=torch.long)


class _FlipCounter(_Recorder):
    """A recorder that reports 1 and 2 flips of two binary weights at every step."""

    binary_names = ["a", "b"]

    def step(self, t=None):
        super().step(t)
        return torch.tensor([1, 2])


def _engine_grads(engine, model, x, y):
    engine.prepare(model)
    rec = _Recorder(model)
    engine.train_batch(model, rec, x, y)
    return {n: sum(g[n] for g in rec.grads) for n in rec.grads[0]}  # summed over steps


def _net_and_batch(seed=3):
    torch.manual_seed(seed)
    net = TwoLayer()
    with torch.no_grad():
        net.fc1.weight.mul_(4.0)
    return net, torch.randn(6, 4), torch.randint(0, 3, (6,))


def test_bptt_and_online_gradients_agree_at_T1_and_differ_later():
    net, x, y = _net_and_batch()
    g_bptt = _engine_grads(BPTTEngine(T=1), net, x, y)
    g_online = _engine_grads(OnlineEngine(T=1, update="accumulate"), net, x, y)
    for n in g_bptt:
        assert torch.allclose(g_bptt[n], g_online[n], atol=1e-6), n
    g_bptt = _engine_grads(BPTTEngine(T=4), net, x, y)
    g_online = _engine_grads(OnlineEngine(T=4, update="accumulate"), net, x, y)
    assert not torch.allclose(g_bptt["fc1.weight"], g_online["fc1.weight"], atol=1e-4)


class _Heaviside(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return (x >= 0).float()

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(4.0 * x)
        return grad * 4.0 * s * (1 - s)


def test_bptt_batches_start_at_rest_and_an_epoch_tallies_them():
    """Each batch starts from reset neurons (the same batch twice: the same logits, loss and
    gradients); train_batch returns the logits summed over T; train_epoch counts samples, batches,
    correct predictions and the loss weighted by batch size."""
    net, x, y = _net_and_batch()
    engine = BPTTEngine(T=3)
    engine.prepare(net)
    rec = _Recorder(net)
    first, second = (engine.train_batch(net, rec, x, y) for _ in range(2))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert all(torch.equal(rec.grads[0][n], rec.grads[1][n]) for n in rec.grads[0])
    with torch.no_grad():
        reset_neurons(net)
        outputs = [net(x) for _ in range(3)]
    assert torch.allclose(first[0], sum(outputs))
    counting = _FlipCounter(net)
    loader = [(x[:4], y[:4]), (x[4:], y[4:])]
    tally = engine.train_epoch(net, counting, loader, torch.device("cpu"))
    assert (tally.samples, tally.batches, tally.interrupted) == (6, 2, False)
    assert tally.flips.tolist() == [2, 4]  # 1 and 2 flips per batch
    losses = [engine.train_batch(net, rec, x[i:j], y[i:j]) for i, j in ((0, 4), (4, 6))]
    assert float(tally.loss_sum) == pytest.approx(4 * losses[0][1].item() + 2 * losses[1][1].item())
    correct = sum(
        int((out.argmax(-1) == y[i:j]).sum())
        for (out, _, _), (i, j) in zip(losses, ((0, 4), (4, 6)), strict=True)
    )
    assert int(tally.correct) == correct
    assert 0 < tally.seconds < 60  # the epoch's own time, not a clock reading
    tally.seconds = 2.0
    metrics = tally.metrics()
    assert metrics["samples_per_s"] == 3.0  # 6 samples in 2 s
    assert (metrics["samples"], metrics["correct"]) == (6, correct)
    assert metrics["loss"] == pytest.approx(float(tally.loss_sum) / 6)
    assert metrics["acc1"] == correct / 6
    empty = engine.train_epoch(net, rec, [], torch.device("cpu"))
    assert (empty.samples, int(empty.correct), empty.activation_peak_bytes) == (0, 0, 0)


def test_an_epoch_whose_loss_turns_nan_stops_as_diverged_at_that_batch():
    """train_epoch hands every batch's loss to the finite check: NaN readout weights from the second
    batch on make the loss NaN there, and the epoch stops with RunDiverged naming epoch and batch."""
    from bso.divergence import FiniteCheck, RunDiverged

    net, x, y = _net_and_batch()
    engine = BPTTEngine(T=2)
    engine.prepare(net)

    def loader():
        yield x[:4], y[:4]
        with torch.no_grad():
            net.fc2.weight.fill_(float("nan"))
        yield x[4:], y[4:]
        yield x[:4], y[:4]

    check = FiniteCheck(epoch=3, device=torch.device("cpu"))
    with pytest.raises(RunDiverged, match="epoch 3, batch 2"):
        engine.train_epoch(net, _Recorder(net), loader(), torch.device("cpu"), finite_check=check)


def test_bptt_gradient_equals_autograd_through_the_unrolled_network():
    net, x, y = _net_and_batch()
    T = 4
    g_engine = _engine_grads(BPTTEngine(T=T, mse_weight=0.05), net, x, y)
    # reference: the LIF recurrence written out by hand, one graph through all steps
    params = {n: p.detach().clone().requires_grad_() for n, p in net.named_parameters()}
    v, loss = torch.zeros(6, 6), 0.0
    for _ in range(T):
        u = 0.5 * v + x @ params["fc1.weight"].t() + params["fc1.bias"]
        s = _Heaviside.apply(u - 1.0)
        v = u - s  # soft reset, kept in the graph
        out = s @ params["fc2.weight"].t()
        ce = torch.nn.functional.cross_entropy(out, y)
        mse = torch.nn.functional.mse_loss(out, torch.nn.functional.one_hot(y, 3).float())
        loss = loss + (0.95 * ce + 0.05 * mse) / T
    loss.backward()
    for n, p in params.items():
        assert torch.allclose(g_engine[n], p.grad, atol=1e-5), n


def test_straight_through_estimator():
    latent = SynapticConv2d(2, 3, 3, padding=1, bias=False, weights="latent")
    with torch.no_grad():
        latent.weight.copy_(torch.randn(latent.weight.shape) * 1.5)  # some |w| > 1
    binary = SynapticConv2d(2, 3, 3, padding=1, bias=False, weights="binary")
    with torch.no_grad():
        binary.weight.copy_(torch.where(latent.weight >= 0, 1.0, -1.0))
    x = torch.randn(4, 2, 6, 6)
    grad_out = torch.randn(4, 3, 6, 6)
    out_latent = latent(x)
    assert torch.equal(out_latent, binary(x))  # forward uses sign(w)
    out_latent.backward(grad_out)
    binary(x).backward(grad_out)
    outside = latent.weight.detach().abs() > 1
    assert outside.any() and (~outside).any()
    assert torch.all(latent.weight.grad[outside] == 0)
    assert torch.allclose(latent.weight.grad[~outside], binary.weight.grad[~outside])


def test_latent_flip_counting_and_clipping():
    layer = SynapticLinear(3, 2, weights="latent", bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.05, -0.05, -1.5], [2.0, -0.01, 0.3]]))
    opt = PlainOptimizer(torch.optim.SGD(layer.parameters(), lr=1.0), [("w", layer.weight)], True)
    layer.weight.grad = torch.tensor([[0.1, 0.0, 0.0], [0.0, -0.02, 0.0]])
    flips = opt.step()
    assert flips.tolist() == [2]  # 0.05 -> -0.05 and -0.01 -> 0.01 changed sign
    # 2.0 clipped to 1, -1.5 to -1; the rest as SGD left them
    expected = torch.tensor([[0.05 - 0.1, -0.05, -1.0], [1.0, -0.01 + 0.02, 0.3]])
    torch.testing.assert_close(layer.weight.detach(), expected)


def test_a_full_precision_model_has_no_flips_to_count():
    """step returns one count per latent weight: none for a model without any."""
    layer = SynapticLinear(2, 1, weights="full", bias=False)
    opt = PlainOptimizer(torch.optim.SGD(layer.parameters(), lr=1.0), [])
    layer.weight.grad = torch.ones_like(layer.weight)
    assert opt.step().shape == (0,)


def test_latent_flip_counting_takes_the_sign_of_zero_as_plus_one():
    """sign(0) = +1, as in the forward pass: 0 -> -0.125 flips, 0.125 -> 0 does not."""
    layer = SynapticLinear(2, 1, weights="latent", bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.0, 0.125]]))
    sgd = torch.optim.SGD([{"params": layer.parameters()}, {"params": [], "lr": 2.0}], lr=1.0)
    opt = PlainOptimizer(sgd, [("w", layer.weight)])
    assert opt.lr == 1.0  # the learning rate logged: the first group's
    layer.weight.grad = torch.tensor([[0.125, 0.125]])
    assert opt.step().tolist() == [1]
    assert layer.weight.tolist() == [[-0.125, 0.0]]


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["optimizer=bso", "model.weights=latent"], "model.weights=binary"),
        (["optimizer=tbso", "model.weights=full"], "model.weights=binary"),
        (["optimizer=sgd", "model.weights=binary"], "break them"),
        (["optimizer=adam"], "break them"),
    ],
)
def test_incompatible_optimizer_and_weights_fail_early(overrides, message):
    cfg = compose_config(*overrides)
    model = instantiate(cfg.model)
    with pytest.raises(ValueError, match=message):
        build_optimizer(model, cfg.optimizer)


def test_bptt_refuses_per_step_updates():
    cfg = compose_config("engine=bptt", "engine.update=per_step")
    with pytest.raises(InstantiationException, match="engine=online"):
        instantiate(cfg.engine)


def test_model_size_counts_latent_weights_as_one_bit():
    from bso.models import VGG11, SpikingVGG, model_size

    size = model_size(SpikingVGG(VGG11, num_classes=10, weights="latent"))
    assert round(size.size_mb, 2) == 1.20
