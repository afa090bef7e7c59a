"""The library API (docs/library.md): bso.convert, bso.make_lean, bso.CaseOptimizer, bso.online_step
on user-written spikingjelly / PyTorch models, and the errors for misuse."""

from __future__ import annotations

import copy
import tomllib
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from spikingjelly.activation_based import functional, layer, neuron, surrogate
from torch import nn
from torch.nn.grad import conv2d_weight

import bso
from bso.conversion import ConvertedConv2d, ConvertedLIFNode, ConvertedLinear
from conftest import ROOT

T = 3


def lif(**kw):
    return neuron.LIFNode(**{"tau": 2.0, "v_reset": None, "decay_input": False, **kw})


def sj_net() -> nn.Sequential:
    """conv(image) -> BN -> LIF -> conv -> BN -> LIF -> avgpool -> flatten -> linear."""
    return nn.Sequential(
        layer.Conv2d(1, 4, 3, padding=1, bias=False),
        layer.BatchNorm2d(4),
        lif(),
        layer.Conv2d(4, 6, 3, padding=1, bias=False),
        layer.BatchNorm2d(6),
        lif(),
        layer.AvgPool2d(2),
        layer.Flatten(),
        layer.Linear(6 * 16, 5),
    )


def batch(n=8):
    return torch.randn(n, 1, 8, 8), torch.randint(0, 5, (n,))


def router(model, gamma=0.0, T=T):
    return bso.CaseOptimizer(
        model,
        binary=partial(bso.TBSO, num_steps=T, gamma=gamma),  # a class: in-backward on a lean model
        full_precision=lambda p: torch.optim.SGD(p, lr=0.1),
    )


def test_public_api_and_version():
    assert set(bso.__all__) >= {
        "BSO",
        "TBSO",
        "CaseOptimizer",
        "convert",
        "make_lean",
        "online_step",
    }
    for name in set(bso.__all__) - {"__version__"}:  # classes and functions
        assert callable(getattr(bso, name)), name
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert bso.__version__ == version
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        bso.nope  # noqa: B018


def test_convert_replaces_layers_keeps_first_and_last_full_precision_and_the_neuron_dynamics():
    net = sj_net()
    net[2] = neuron.LIFNode(tau=3.0, v_threshold=0.5, surrogate_function=surrogate.ATan())
    model = bso.convert(net)
    assert isinstance(model[0], ConvertedConv2d) and model[0].weights == "full"
    assert isinstance(model[3], ConvertedConv2d) and model[3].weights == "binary"
    assert isinstance(model[8], ConvertedLinear) and model[8].weights == "full"
    assert torch.all(model[3].weight.abs() == 1)
    # about half of the release init's signs are +1
    assert 0.3 < (model[3].weight > 0).float().mean() < 0.7
    n = model[2]
    assert isinstance(n, ConvertedLIFNode)
    assert (n.tau, n.v_threshold, n.v_reset, n.decay_input) == (3.0, 0.5, 0.0, True)
    assert isinstance(n.surrogate_function, surrogate.ATan)
    assert n.detach_state and n.trace_rule == "ndot" and model[5].trace_rule == "ndot"
    assert [name for name, _ in bso.binary_parameters(model)] == ["3.weight"]


def test_converted_neuron_fires_exactly_as_the_spikingjelly_neuron():
    src = neuron.LIFNode(tau=2.0)  # spikingjelly's defaults: hard reset, decayed input
    holder = bso.convert(
        nn.Sequential(nn.Linear(4, 4), src, nn.Linear(4, 4)), full_precision=[], trace=None
    )
    converted = holder[1]
    reference = neuron.LIFNode(tau=2.0)
    xs = torch.randn(6, 3, 4) * 2
    for x in xs:
        assert torch.equal(converted(x), reference(x))
        assert torch.equal(converted.v, reference.v)


def test_init_sign_takes_the_sign_of_the_current_weights():
    net = sj_net()
    before = net[3].weight.detach().clone()
    model = bso.convert(net, init="sign")
    assert torch.equal(model[3].weight, torch.where(before >= 0, 1.0, -1.0))
    assert torch.equal(model[0].weight, net[0].weight)  # full precision: the weights as they were


def test_weight_gradient_comes_from_the_presynaptic_trace_through_pool_and_flatten():
    model = bso.convert(sj_net(), full_precision=["0"])  # the linear is binary too
    grads = {}

    def keep_grad(key):
        def hook(module, args, out):
            out.register_hook(lambda g: grads.update({key: g}))

        return hook

    model[3].register_forward_hook(keep_grad("conv"))
    model[8].register_forward_hook(keep_grad("fc"))
    x, _ = batch()
    model.train()
    functional.reset_net(model)
    for _t in range(3):
        model.zero_grad()
        model(x).sum().backward()
        trace1, trace2 = model[2].trace, model[5].trace  # a_hat[t] of the two neurons
        expect_fc = grads["fc"].t() @ F.avg_pool2d(trace2, 2).flatten(1)
        assert torch.allclose(model[8].weight.grad, expect_fc, atol=1e-6)
        expect_conv = conv2d_weight(trace1, model[3].weight.shape, grads["conv"], 1, 1)
        assert torch.allclose(model[3].weight.grad, expect_conv, atol=1e-5)
    # by now the traces are not spikes (0/1), so a gradient from the spikes would fail the checks
    assert not torch.all((trace1 == 0) | (trace1 == 1))
    assert not torch.all((trace2 == 0) | (trace2 == 1))


def test_a_view_of_the_spikes_is_recognised_and_an_unknown_op_is_an_error_naming_the_layer():
    class Net(nn.Module):
        def __init__(self, op):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.lif = lif()
            self.fc = nn.Linear(4 * 64, 10)
            self.head = nn.Linear(10, 5)
            self.op = op

        def forward(self, x):
            return self.head(self.fc(self.op(self.lif(self.conv(x)))))

    x, y = batch()
    grads = []
    for op in (lambda s: s.view(s.shape[0], -1), lambda s: s.flatten(1)):
        torch.manual_seed(3)
        model = bso.convert(Net(op))
        opt = router(model)
        for t in range(2):  # t=1: the trace is no longer the spikes
            bso.online_step(model, opt, x, y, t=t, T=T)
        grads.append(model.fc.weight.grad)
    # the view is followed as flatten is: the same trace, the same weight gradient
    assert torch.equal(grads[0], grads[1]) and grads[0].abs().sum() > 0

    model = bso.convert(Net(lambda s: (2 * s).flatten(1)))
    with pytest.raises(
        RuntimeError, match=r"fc \(ConvertedLinear\) runs after the spiking neuron lif"
    ):
        bso.online_step(model, router(model), x, y, t=0, T=T)
    net = Net(lambda s: s)
    net.op = nn.Sequential(nn.Dropout(0.5), nn.Flatten())  # a dropout mask the trace cannot follow
    model = bso.convert(net)
    with pytest.raises(RuntimeError, match=r"fc \(ConvertedLinear\) runs after"):
        bso.online_step(model, router(model), x, y, t=0, T=T)
    # a value (a layer's output, not spikes) through a flatten after a neuron fired: no trace needed
    seq = bso.convert(
        nn.Sequential(
            nn.Conv2d(1, 2, 3, padding=1),
            lif(),
            nn.Conv2d(2, 2, 3, padding=1),
            nn.Flatten(),
            nn.Linear(128, 5),
        ),
        full_precision=["0"],
    )
    seen = {}

    def keep(module, args, out):
        seen["input"] = args[0].detach()
        out.register_hook(lambda g: seen.update(delta=g))

    seq[4].register_forward_hook(keep)
    bso.online_step(seq, router(seq), x, y, t=0, T=T)
    # the linear's gradient is delta^T @ its input (the conv's values, as autograd has it)
    torch.testing.assert_close(
        seq[4].weight.grad, seen["delta"].t() @ seen["input"], rtol=1e-5, atol=1e-7
    )
    assert seq[2].weight.grad.abs().sum() > 0  # the binary conv after the neuron: from its trace
    # evaluation needs no trace
    with torch.no_grad():
        assert model(x).shape == (8, 5)


@pytest.mark.parametrize(
    ("module", "match"),
    [
        (neuron.IFNode(), r"cannot convert 1 \(IFNode\).*LIFNode only"),
        (nn.Conv1d(2, 2, 3), r"cannot convert 1 \(Conv1d\)"),
        (
            nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"),
            r"cannot convert 1 \(Conv2d\).*zero",
        ),
    ],
)
def test_unsupported_layers_and_neurons_are_named(module, match):
    with pytest.raises(TypeError, match=match):
        bso.convert(nn.Sequential(nn.Linear(2, 2), module, nn.Linear(2, 2), nn.Linear(2, 2)))


def test_convert_argument_errors():
    with pytest.raises(ValueError, match="full_precision names 'fc'"):
        bso.convert(sj_net(), full_precision=["fc"])
    with pytest.raises(ValueError, match="no binary weights would remain"):
        bso.convert(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="multi-step mode"):
        net = sj_net()
        functional.set_step_mode(net, "m")
        bso.convert(net)
    with pytest.raises(ValueError, match="already converted"):
        bso.convert(bso.convert(sj_net()))


def test_online_step_trains_and_keeps_weights_binary():
    model = bso.convert(sj_net())
    opt = router(model, gamma=0.0)
    x, y = batch()
    flips = 0
    for t in range(T):
        out = bso.online_step(model, opt, x, y, t=t, T=T)
        assert out.output.shape == (8, 5) and not out.output.requires_grad
        flips += int(out.flips.sum())
    assert flips > 0 and torch.all(model[3].weight.abs() == 1)
    assert opt.binary_names == ["3.weight"]
    # t == 0 resets the neurons: the same batch twice gives the same first output
    first = bso.online_step(model, router(model), x, y, t=0, T=T).output
    model.eval()
    with torch.no_grad():
        bso.reset(model)
        assert model(x).shape == first.shape


@pytest.mark.parametrize("lean", [False, True], ids=["plain", "lean"])
def test_online_step_is_the_engines_time_step(lean):
    """bso.online_step and OnlineEngine.train_batch run the same time step: over two batches the
    same outputs, losses, flips and model state, plain and lean; mse_weight= sets l of the paper's
    loss, loss_fn= replaces it (not both)."""
    from bso.engine import OnlineEngine, instantaneous_loss

    torch.manual_seed(4)
    library = bso.convert(sj_net())
    engine_model = copy.deepcopy(library)
    if lean:
        bso.make_lean(library)
    engine = OnlineEngine(T=T, lean=lean)
    engine.prepare(engine_model)
    assert engine.lean_on is lean
    opts = router(library, gamma=1e-7), router(engine_model, gamma=1e-7)
    total = 0
    for seed in range(2):
        torch.manual_seed(10 + seed)
        x, y = batch()
        steps = [bso.online_step(library, opts[0], x, y, t=t, T=T) for t in range(T)]
        summed, loss, flips = engine.train_batch(engine_model, opts[1], x, y)
        assert torch.equal(sum(s.output for s in steps), summed)
        assert torch.equal(sum(s.loss for s in steps), loss)
        assert torch.equal(sum(s.flips for s in steps), flips)
        total += int(flips.sum())
    assert total > 0
    for key, value in engine_model.state_dict().items():
        assert torch.equal(value, library.state_dict()[key]), key
    x, y = batch()
    out = bso.online_step(library, opts[0], x, y, t=0, T=T, mse_weight=0.0)
    assert torch.equal(out.loss, instantaneous_loss(out.output, y, 0.0, T))
    with pytest.raises(ValueError, match="loss_fn= or mse_weight="):
        bso.online_step(library, opts[0], x, y, t=1, T=T, loss_fn=F.cross_entropy, mse_weight=0)


def test_case_optimizer_routes_and_names_its_parts():
    """The +-1 weights go to the binary optimizer, the rest to full_precision= (required only when
    there is a rest); its repr names both."""
    model = bso.convert(sj_net())
    opt = router(model)
    assert repr(opt) == "CaseOptimizer(binary=TBSO over 1 +-1 weights, full_precision=SGD)"
    assert [p for g in opt.full_precision.param_groups for p in g["params"]] == [
        p for n, p in model.named_parameters() if n != "3.weight"
    ]
    assert set(opt.state_dict()) == {"binary", "full_precision"}
    with pytest.raises(ValueError, match=r"has 7 full-precision parameters \('0.weight', \.\.\.\)"):
        bso.CaseOptimizer(model, binary=lambda p: bso.BSO(p))
    only_binary = nn.Sequential(bso.layers.SynapticLinear(4, 3, weights="binary", bias=False))
    opt = bso.CaseOptimizer(only_binary, binary=bso.BSO)
    assert repr(opt) == "CaseOptimizer(binary=BSO over 1 +-1 weights, full_precision=None)"


def test_misuse_errors():
    x, y = batch()
    with pytest.raises(ValueError, match="exactly -1 or \\+1"):
        bso.BSO(sj_net().parameters())
    with pytest.raises(ValueError, match="has no stored \\+-1 weights.*bso.convert"):
        router(sj_net())
    model = bso.convert(sj_net())
    with pytest.raises(ValueError, match="full-precision parameters .* give full_precision="):
        bso.CaseOptimizer(model, binary=lambda p: bso.BSO(p))
    with pytest.raises(TypeError, match="binary= must build bso.BSO or bso.TBSO"):
        bso.CaseOptimizer(
            model, binary=lambda p: torch.optim.SGD(p, lr=1), full_precision=torch.optim.SGD
        )
    opt = router(model)
    for t in (-1, T):
        with pytest.raises(IndexError, match=rf"t={t} is outside \[0, T\)"):
            bso.online_step(model, opt, x, y, t=t, T=T)
    with pytest.raises(ValueError, match="num_steps=3 .* T=4"):
        bso.online_step(model, opt, x, y, t=0, T=4)
    with pytest.raises(TypeError, match="needs a bso.CaseOptimizer"):
        bso.online_step(model, opt.binary, x, y, t=0, T=T)
    with pytest.raises(ValueError, match="not this model's"):
        bso.online_step(bso.convert(sj_net()), opt, x, y, t=0, T=T)
    bptt = bso.convert(sj_net(), trace=None)
    for steps in (T, 4):  # a T-BSO of another num_steps too: the BPTT conversion is the problem
        with pytest.raises(ValueError, match="set up for BPTT"):
            bso.online_step(bptt, router(bptt), x, y, t=0, T=steps)
    plain = bso.convert(
        nn.Sequential(nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 5))
    )
    with pytest.raises(ValueError, match="no spiking neurons"):
        bso.online_step(plain, router(plain), x.flatten(1), y, t=0, T=T)


def test_lean_model_needs_the_optimizer_bound_to_it():
    x, y = batch()
    model = bso.convert(sj_net())
    before = router(model)
    bso.make_lean(model)
    with pytest.raises(ValueError, match="before the lean mode replaced them"):
        bso.online_step(model, before, x, y, t=0, T=T)
    # a function that builds a plain T-BSO: refused, saying what to give instead
    with pytest.raises(TypeError, match=r"3 holds packed .* functools.partial\(bso.TBSO"):
        bso.CaseOptimizer(
            model,
            binary=lambda p: bso.TBSO(p, num_steps=T),
            full_precision=lambda p: torch.optim.SGD(p, lr=0.1),
        )
    first = router(model)
    router(model)  # the packed layers are now bound to this second optimizer
    with pytest.raises(ValueError, match=r"3 holds packed \+-1 weights .* not bound"):
        bso.online_step(model, first, x, y, t=0, T=T)
    with pytest.raises(ValueError, match="no converted layers"):
        bso.make_lean(sj_net())
    with pytest.raises(ValueError, match="convert the model with a trace"):
        bso.make_lean(bso.convert(sj_net(), trace=None))


def test_lean_mode_flips_exactly_as_the_plain_mode():
    torch.manual_seed(1)
    plain = bso.convert(sj_net())
    lean = bso.make_lean(copy.deepcopy(plain))
    assert lean[3].is_packed and lean[3].weight.dtype == torch.uint8
    opt_plain, opt_lean = router(plain, gamma=1e-7), router(lean, gamma=1e-7)
    total = 0
    for _ in range(2):
        x, y = batch()
        for t in range(T):
            a = bso.online_step(plain, opt_plain, x, y, t=t, T=T)
            b = bso.online_step(lean, opt_lean, x, y, t=t, T=T)
            assert torch.equal(a.output, b.output) and torch.equal(a.flips, b.flips)
            total += int(a.flips.sum())
    assert total > 0
    assert torch.equal(lean[3].sign_values(), plain[3].weight)
    assert lean[3].weight.grad is None  # no stored binary-weight gradient


@pytest.mark.parametrize("lean", [False, True])
def test_the_fused_backend_flips_exactly_as_the_release_one(lean):
    """bso.convert(..., backend="fused"): the same outputs and flips as the release backend's eager
    neurons, plain or lean."""
    models = []
    for backend in ("release", "fused"):
        torch.manual_seed(2)
        model = bso.convert(sj_net(), backend=backend)
        models.append(bso.make_lean(model) if lean else model)
    eager, fused = models
    assert [m.backend for m in fused.modules() if isinstance(m, ConvertedLIFNode)] == [
        "fused",
        "fused",
    ]
    opts = router(eager, gamma=1e-7), router(fused, gamma=1e-7)
    total = 0
    for _ in range(2):
        x, y = batch()
        for t in range(T):
            a = bso.online_step(eager, opts[0], x, y, t=t, T=T)
            b = bso.online_step(fused, opts[1], x, y, t=t, T=T)
            assert torch.equal(a.output, b.output) and torch.equal(a.flips, b.flips)
            total += int(a.flips.sum())
    assert total > 0


def test_bptt_over_a_multistep_network_trains_binary_weights():
    net = sj_net()
    functional.set_step_mode(net, "m")
    model = bso.convert(net, trace=None)
    opt = router(model, T=1)
    x, y = batch()
    functional.reset_net(model)
    out = model(x.unsqueeze(0).repeat(T, 1, 1, 1, 1))
    assert out.shape == (T, 8, 5)
    F.cross_entropy(out.mean(0), y).backward()
    assert model[3].weight.grad is not None and int(opt.step().sum()) > 0
    assert torch.all(model[3].weight.abs() == 1)


def test_a_converted_model_pickles_and_its_copy_still_finds_the_traces(tmp_path):
    model = bso.convert(sj_net())
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert loaded[3].trace_links is loaded[2].trace_links is not model[3].trace_links
    x, y = batch()
    opt = router(loaded)
    for t in range(T):
        bso.online_step(loaded, opt, x, y, t=t, T=T)
    assert torch.all(loaded[3].weight.abs() == 1)


def _python_block(path, after: str) -> str:
    """The first ```python block after the line ``after`` in ``path``."""
    text = (ROOT / path).read_text()
    start = text.index("```python\n", text.index(after)) + len("```python\n")
    return text[start : text.index("```", start)]


@pytest.mark.parametrize(
    "path,after", [("README.md", "## Use BSO / T-BSO"), ("docs/library.md", "# ")]
)
def test_the_documented_example_runs_and_flips_weights(path, after):
    net = sj_net()
    x, y = batch()
    names = {"net": net, "my_spikingjelly_net": net, "T": T, "x": x, "y": y, "loader": [(x, y)]}
    exec(compile(_python_block(path, after), path, "exec"), names)
    model, optimizer = names["model"], names["optimizer"]
    assert model is net and isinstance(model[3], ConvertedConv2d)
    # T-BSO stepped at each of the T time steps: every slot of the layer's second moment is written
    assert isinstance(optimizer.binary, bso.TBSO)
    assert torch.all(optimizer.binary.second_moment(model[3].weight) > 0)
