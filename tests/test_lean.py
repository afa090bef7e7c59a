"""The lean mode (engine.lean, bso.lean): packed 1-bit weights, the flip rule inside backward, no
stored binary-weight gradients -- and exactly the flips of the plain mode. The lean mode is a layer
around the core: it replaces the model's modules by its own, and the core never imports it."""

from __future__ import annotations

import logging
import subprocess
import sys
from functools import partial

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from torch import nn

from bso.bits import pack_bits, pack_signs, unpack_bits
from bso.checkpoint import FORMAT, export_1bit, load_checkpoint
from bso.engine import BPTTEngine, OnlineEngine
from bso.layers import SynapticConv2d, binary_weight_values, named_binary_parameters
from bso.lean import LeanSpikingConvBlock, PackedWeights
from bso.lean.layers import PackedSynapticConv2d, PackedSynapticLinear
from bso.lean.optim import LeanBSO, LeanTBSO, in_backward_constructor
from bso.metrics.memory import persistent_state_bytes
from bso.models import SpikingResNet19, SpikingVGG, model_size
from bso.optim import BSO, TBSO, build_optimizer, build_router
from conftest import ROOT, compose_config


def _tiny(seed=0):
    torch.manual_seed(seed)
    return SpikingVGG("8C3-16C3-AP2-16C3", in_channels=1, num_classes=10)


def _batch(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


# ------------------------------------------------- the flip rule: fused on bits == step on floats


@pytest.mark.parametrize(
    "make",
    [
        partial(BSO, gamma=0.02, beta=0.9, reset_momentum=True),
        partial(BSO, gamma=0.02, beta=0.9, reset_momentum=False),
        partial(TBSO, num_steps=3, gamma=0.05, beta1=0.9, beta2=0.99, threshold="code"),
        partial(TBSO, num_steps=3, gamma=0.05, beta1=0.9, beta2=0.99, threshold="paper"),
    ],
    ids=["bso-reset", "bso", "tbso-code", "tbso-paper"],
)
def test_in_backward_update_on_packed_bits_flips_exactly_as_step(make):
    g = torch.Generator().manual_seed(0)
    w0 = torch.where(torch.randn(5, 3, 3, 3, generator=g) >= 0, 1.0, -1.0)
    float_w = nn.Parameter(w0.clone())
    layer = SynapticConv2d(3, 5, 3, bias=False)
    layer.weight.data.copy_(w0)
    layer = PackedWeights.from_module(layer)
    plain, lean = make([float_w]), in_backward_constructor(make)([layer.weight])
    layer.bind_binary_optimizer(lean)
    total = 0
    for k in range(40):
        t = k % 3
        grad = torch.randn(w0.shape, generator=g) * 0.1
        float_w.grad = grad.clone()
        expected = plain.step(t)
        lean.begin_time_step(t)
        lean.update_in_backward(layer.weight, layer.sign_values(), grad.clone())
        assert lean.step(t).tolist() == expected.tolist(), k  # counts the fused flips
        assert torch.equal(layer.sign_values(), float_w.detach()), k
        total += int(expected.sum())
    assert total > 0
    assert torch.equal(lean.state[layer.weight]["momentum"], plain.state[float_w]["momentum"])
    if "v" in plain.state[float_w]:
        assert torch.equal(lean.state[layer.weight]["v"], plain.state[float_w]["v"])


def test_pack_bits_round_trips_exactly():
    w = torch.where(torch.randn(13, 7) >= 0, 1.0, -1.0)  # 91 weights: a padded last byte
    layer = SynapticConv2d(7, 13, 1, bias=False)
    layer.weight.data.copy_(w.view(13, 7, 1, 1))
    old = layer
    layer = PackedWeights.from_module(old)  # a new module: the old one keeps no class of its own
    assert layer is not old and type(old) is SynapticConv2d
    assert type(layer) is PackedSynapticConv2d and isinstance(layer, SynapticConv2d)
    assert list(old.parameters()) == []
    with pytest.raises(RuntimeError, match="replaced by a PackedSynapticConv2d"):
        old(torch.zeros(1, 7, 2, 2))
    assert layer.weight.dtype == torch.uint8 and layer.weight.numel() == 12
    assert not layer.weight.requires_grad
    assert torch.equal(layer.sign_values(), w.view(13, 7, 1, 1))
    assert torch.equal(pack_bits(w > 0), layer.weight.detach())
    assert "storage=bits" in repr(layer)


def test_one_bit_order_numpys_for_weights_spikes_and_exports():
    """bso.bits packs as np.packbits does (most significant bit first, zero padded), for any size,
    layout and offset, and unpacks back exactly."""
    g = torch.Generator().manual_seed(0)
    for n in (1, 7, 8, 9, 91, 1000):
        mask = torch.rand(n, generator=g) > 0.5
        assert pack_bits(mask).tolist() == np.packbits(mask.numpy()).tolist()
        assert torch.equal(unpack_bits(pack_bits(mask), (n,)), mask.float())
    grid = torch.rand(5, 13, generator=g) > 0.5
    for view in (grid.t(), grid[:, 3:], grid[1:]):  # not contiguous, offset storage
        assert pack_bits(view).tolist() == np.packbits(view.numpy()).tolist()
    w = torch.tensor([1.0, -1, -1, 1, 1, 1, -1, -1, 1, -1])
    assert pack_signs(w).tolist() == [0b10011100, 0b10000000]
    assert pack_signs(torch.tensor([0.0, -0.5])).tolist() == [0b10000000]  # sign(0) = +1


def test_a_1bit_export_written_by_numpy_loads(tmp_path):
    """A bso-1bit-v1 file with the signs packed by numpy (the format's bit order, independent of
    bso.bits) loads into a plain and a lean model with every weight where it was."""
    model = _tiny()
    state = model.state_dict()
    names = {name for name, _ in named_binary_parameters(model)}
    blob = {
        "format": FORMAT,
        "binary": {
            k: {
                "bits": torch.from_numpy(np.packbits(state[k].numpy() > 0)),
                "shape": [*state[k].shape],
            }
            for k in names
        },
        "tensors": {k: v for k, v in state.items() if k not in names},
    }
    torch.save(blob, tmp_path / "old_1bit.pt")
    for lean in (False, True):
        loaded = _tiny(seed=5)
        OnlineEngine(T=2, lean=lean).prepare(loaded)
        load_checkpoint(loaded, tmp_path / "old_1bit.pt")
        for key, value in loaded.state_dict().items():
            assert torch.equal(value, state[key]), (lean, key)


# ------------------------------------------------- training: lean == plain, on the digits


def _digits_epoch(lean: bool, recompute_binary_convs: bool = False):
    """One epoch of T-BSO on the digits (vgg_tiny's blocks at a quarter of its width, to keep the
    test short; T=2); every step's flips per layer."""
    cfg = compose_config(
        "engine.T=2",
        "model.layers=8C3-16C3-AP2-32C3-32C3-AP2",
        f"engine.lean={str(lean).lower()}",
        f"engine.recompute_binary_convs={str(recompute_binary_convs).lower()}",
    )
    torch.manual_seed(cfg.seed)
    model = instantiate(cfg.model)
    engine = instantiate(cfg.engine)
    engine.prepare(model)
    assert engine.lean_on is lean
    router = build_optimizer(model, cfg.optimizer)
    from bso.data import build_dataloaders

    loader, _ = build_dataloaders(cfg.dataset, seed=cfg.seed)
    real_step, flips, grads = router.step, [], []

    def recording_step(t=None):
        counts = real_step(t)
        flips.append(counts.tolist())
        grads.append([w.grad is not None for w in router.binary.binary_weights()])
        return counts

    router.step = recording_step
    engine.train_epoch(model, router, loader, torch.device("cpu"))
    return model, router, flips, grads


@pytest.mark.integration
@pytest.mark.parametrize("recompute_binary_convs", [False, True], ids=["lean", "recompute"])
def test_lean_and_plain_train_the_digits_identically_for_an_epoch(recompute_binary_convs):
    plain_model, plain_router, plain_flips, plain_grads = _digits_epoch(lean=False)
    lean_model, lean_router, lean_flips, lean_grads = _digits_epoch(True, recompute_binary_convs)
    assert [b.recompute_conv for b in lean_model.blocks] == [True, *[recompute_binary_convs] * 3]
    assert sum(map(sum, plain_flips)) > 0
    assert lean_flips == plain_flips  # every step, every layer
    assert all(all(g) for g in plain_grads)  # plain: a gradient per binary weight at each step
    assert not any(any(g) for g in lean_grads)  # lean: never a binary-weight .grad
    plain_state, lean_state = plain_model.state_dict(), lean_model.state_dict()
    assert plain_state.keys() == lean_state.keys()
    for key, value in plain_state.items():  # +-1 weights, FP weights, BN statistics: identical
        assert torch.equal(value, lean_state[key]), key
    for p, q in zip(
        plain_router.binary.binary_weights(), lean_router.binary.binary_weights(), strict=True
    ):
        for name in ("momentum", "v"):
            assert torch.equal(
                plain_router.binary.state[p][name], lean_router.binary.state[q][name]
            )


# ------------------------------------------------- memory: 1 bit + momentum per weight


@pytest.mark.integration
def test_lean_persistent_bytes_per_binary_weight_and_no_gradients():
    """VGG-11 (9.2M binary weights), T-BSO at T=6: packed weight + float32 momentum + T scalars."""
    torch.manual_seed(0)
    model = SpikingVGG(in_channels=3, num_classes=10)
    engine = OnlineEngine(T=6, lean=True)
    engine.prepare(model)
    router = build_router(model, partial(TBSO, num_steps=6), partial(torch.optim.SGD, lr=0.1))
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([3, 5])  # 8x8: three 2x2 pools still fit
    engine.train_batch(model, router, x, y)
    assert all(w.grad is None for w in router.binary.binary_weights())
    mem = persistent_state_bytes(model, router)
    assert mem["binary_weight_count"] == 9_216_000
    per = mem["per_binary_weight"]
    assert per["weights"] == 0.125 and per["gradients"] == 0
    assert sum(per.values()) <= 4.2
    assert mem["transient_gradients"] == 512 * 512 * 9 * 4  # one layer's gradient, inside backward
    assert model_size(model).size_mb == pytest.approx(1.20, abs=0.005)  # the paper's column


def test_lean_fuses_batchnorm_lif_and_saves_less_for_backward():
    """Same flips and BatchNorm statistics in the three modes; the activation peak drops: the lean
    default saves BatchNorm input + spike bits instead of BatchNorm input + LIF charge + the float
    spikes an average pool keeps, and recomputes the first conv's output from the image;
    recompute_binary_convs saves every binary conv's input spikes instead of its output."""
    from bso.metrics.memory import SavedTensorMeter

    x, y = _batch(16)
    runs = {}
    for mode in ("plain", "lean", "recompute"):
        model = _tiny()
        lean = mode != "plain"
        engine = OnlineEngine(T=2, lean=lean, recompute_binary_convs=mode == "recompute")
        engine.prepare(model)
        assert [isinstance(b, LeanSpikingConvBlock) for b in model.blocks] == [lean] * 3
        recompute = [getattr(b, "recompute_conv", False) for b in model.blocks]
        assert recompute == [lean, *[mode == "recompute"] * 2]
        router = build_router(model, partial(TBSO, num_steps=2), partial(torch.optim.SGD, lr=0.1))
        with SavedTensorMeter() as meter:
            flips = engine.train_batch(model, router, x, y)[2]
        runs[mode] = (flips.tolist(), meter.peak_bytes, model.state_dict())
    assert sum(runs["plain"][0]) > 0
    for mode in ("lean", "recompute"):
        assert runs[mode][0] == runs["plain"][0]
        for key, value in runs["plain"][2].items():
            assert torch.equal(value, runs[mode][2][key]), (mode, key)
    # this tiny net: 0.39x and 0.29x of the plain peak (VGG-11: make bench-lean)
    assert runs["lean"][1] < 0.45 * runs["plain"][1]
    assert runs["recompute"][1] < 0.8 * runs["lean"][1]


def test_recompute_after_a_max_pool_and_an_average_pool_trains_like_plain():
    """A block's input after a max pool is 0/1 (saved as bits), after AP2 multiples of 1/4 (bytes):
    two batches, same flips and state as the plain mode."""
    x, y = _batch(8)
    runs = {}
    for mode in ("plain", "recompute"):
        torch.manual_seed(0)
        model = SpikingVGG("8C3-MP2-16C3-AP2-16C3", in_channels=1, num_classes=10)
        assert [b.input_levels for b in model.blocks] == [None, 1, 4]
        engine = OnlineEngine(T=2, lean=mode != "plain", recompute_binary_convs=mode != "plain")
        engine.prepare(model)
        router = build_router(model, partial(TBSO, num_steps=2), partial(torch.optim.SGD, lr=0.1))
        flips = [engine.train_batch(model, router, x, y)[2].tolist() for _ in range(2)]
        runs[mode] = (flips, model.state_dict())
    assert runs["recompute"][0] == runs["plain"][0] and sum(map(sum, runs["plain"][0])) > 0
    for key, value in runs["plain"][1].items():
        assert torch.equal(value, runs["recompute"][1][key]), key


@pytest.mark.parametrize("pool", ["none", "avg", "max"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("missing", [None, "spikingjelly._ops", "torch.ops.aten._batch_norm"])
@pytest.mark.parametrize("backend", ["release", "fast"])
def test_batchnorm_lif_pool_step_is_the_plain_graph_bit_for_bit_and_saves_bits(
    backend, pool, layout, missing, monkeypatch, caplog
):
    """The fused BatchNorm + LIF (+ average pool) step against the plain modules, at a second time
    step (a nonzero v[t-1]): same spikes, trace and running statistics, the same gradients for the
    BatchNorm input and affine parameters, bit for bit -- and, saved for backward, exactly the
    BatchNorm input, its two parameters and one bit per spike (a max pool keeps its own indices).
    The public paths taken where a private API is ``missing`` (bso.compat) give the same values:
    the LIF step re-run (the path every device but the CPU takes) and BatchNorm re-run in backward."""
    from bso import compat
    from bso.lean.batchnorm_lif import batchnorm_lif_step
    from bso.metrics.memory import SavedTensorMeter
    from bso.neurons import LIFNode, configure_neurons, reset_neurons

    found = compat.private
    monkeypatch.setattr(compat, "_WARNED", set())
    if missing:  # as with a torch / spikingjelly that lacks it
        monkeypatch.setattr(
            compat, "private", lambda p: None if p.startswith(missing) else found(p)
        )

    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    g = torch.Generator().manual_seed(0)
    zs = [torch.randn(6, 8, 6, 6, generator=g).mul_(2).to(memory_format=fmt) for _ in range(2)]
    grad_out = torch.randn(6, 8, 3, 3, generator=g) if pool != "none" else torch.randn(6, 8, 6, 6)
    results = {}
    for fused in (False, True):
        torch.manual_seed(1)
        bn, neuron = nn.BatchNorm2d(8), LIFNode(backend=backend)
        nn.init.uniform_(bn.weight, 0.5, 1.5), nn.init.uniform_(bn.bias, -0.2, 0.2)
        block = nn.Sequential(bn, neuron)
        configure_neurons(block, detach_state=True, trace_rule="ndot")
        reset_neurons(block)
        layer = {"none": nn.Identity(), "avg": nn.AvgPool2d(2), "max": nn.MaxPool2d(2)}[pool]
        with torch.no_grad():
            neuron(bn(zs[0]))  # t = 0: v[0] and the trace
        z = zs[1].clone().requires_grad_()
        with SavedTensorMeter() as meter:
            out = batchnorm_lif_step(z, bn, neuron, layer) if fused else layer(neuron(bn(z)))
            saved = meter.current_bytes
            grads = torch.autograd.grad(out, (z, bn.weight, bn.bias), grad_out.to(out.dtype))
        results[fused] = (out, neuron.trace, bn.running_mean, bn.running_var, *grads, saved)
    plain, fused = results[False], results[True]
    for a, b in zip(plain[:-1], fused[:-1], strict=True):
        assert torch.equal(a, b)
    assert fused[4].is_contiguous(memory_format=fmt)  # the input gradient keeps the layout
    spikes = zs[1].numel()
    expected = spikes * 4 + 2 * 8 * 4 + spikes // 8  # BatchNorm input, its weight and bias, bits
    if pool == "max":  # what the max pool saves of its own (input and indices)
        with SavedTensorMeter() as meter:
            pooled = nn.MaxPool2d(2)(torch.ones_like(zs[1], requires_grad=True))
            expected += meter.current_bytes
        del pooled
    assert fused[-1] == expected
    # the plain graph keeps the LIF's charge too (and the spikes before an average pool)
    assert plain[-1] >= expected + spikes * 4 - spikes // 8 + (spikes * 4 if pool == "avg" else 0)
    warnings = [r.getMessage() for r in caplog.records if r.name == "bso.compat"]
    if missing == "spikingjelly._ops" and backend == "release":  # its step runs no private op
        assert warnings == []
    elif missing:  # one line, once, naming what is missing
        assert len(warnings) == 1 and warnings[0].startswith(f"bso: {missing}")
    else:
        assert warnings == []


# ------------------------------------------------- checkpoints, the 1-bit export, resume


def test_lean_state_dict_checkpoint_and_1bit_export_round_trip(tmp_path):
    lean = _tiny()
    engine = OnlineEngine(T=2, lean=True)
    engine.prepare(lean)
    router = build_router(lean, partial(BSO, gamma=1e-9), partial(torch.optim.SGD, lr=0.1))
    engine.train_batch(lean, router, *_batch())
    state = lean.state_dict()
    for name, _ in named_binary_parameters(lean):  # written as float +-1, as the plain mode does
        assert state[name].dtype == torch.float32 and set(state[name].unique().tolist()) == {-1, 1}
    plain = _tiny(seed=1)  # a plain model loads the lean state, and back
    plain.load_state_dict(state)
    again = _tiny(seed=2)
    OnlineEngine(T=2, lean=True).prepare(again)
    again.load_state_dict(plain.state_dict())
    for (_, a), (_, b) in zip(binary_weight_values(lean), binary_weight_values(again), strict=True):
        assert torch.equal(a, b)
    export_1bit(lean, tmp_path / "m.pt")
    loaded = _tiny(seed=3)
    OnlineEngine(T=2, lean=True).prepare(loaded)
    load_checkpoint(loaded, tmp_path / "m.pt")
    for key, value in state.items():
        assert torch.equal(loaded.state_dict()[key], value), key
    # optimizer state (resume): momentum keyed by the packed weight, float32, full shape
    resumed = build_router(again, partial(BSO, gamma=1e-9), partial(torch.optim.SGD, lr=0.1))
    resumed.load_state_dict(router.state_dict())
    for p, q in zip(router.binary.binary_weights(), resumed.binary.binary_weights(), strict=True):
        assert torch.equal(router.binary.state[p]["momentum"], resumed.binary.state[q]["momentum"])


# ------------------------------------------------- config: applies, refuses or says why not


def test_lean_refuses_what_it_cannot_do_and_auto_says_why(caplog):
    with pytest.raises(ValueError, match="engine.update=accumulate"):
        OnlineEngine(T=2, update="accumulate", lean=True).prepare(_tiny())
    with pytest.raises(ValueError, match="no stored"):
        torch.manual_seed(0)
        OnlineEngine(T=2, lean=True).prepare(SpikingVGG("8C3-16C3", 1, 10, weights="full"))
    with pytest.raises(ValueError, match="engine.lean"):
        OnlineEngine(T=2, lean="yes")
    block = _tiny().blocks[1]  # a model that is itself a block: no parent to put its lean one in
    with pytest.raises(ValueError, match=r"itself a SpikingConvBlock.*nn.Sequential\(model\)"):
        OnlineEngine(T=2, lean=True).prepare(block)
    assert type(block.conv) is SynapticConv2d and block.conv.weight.dtype == torch.float32
    # recompute_binary_convs is a lean-mode option: refused where the lean mode is off
    for lean, update in ((False, "per_step"), ("auto", "accumulate")):
        with pytest.raises(ValueError, match="recompute_binary_convs=true .* off here"):
            OnlineEngine(T=2, lean=lean, update=update, recompute_binary_convs=True).prepare(
                _tiny()
            )
    with pytest.raises(ValueError, match="no binary conv block whose input is known"):
        torch.manual_seed(0)
        resnet = SpikingResNet19(in_channels=1, num_classes=10, widths=(8, 8, 8))
        OnlineEngine(T=2, lean=True, recompute_binary_convs=True).prepare(resnet)
    with caplog.at_level(logging.INFO, logger="bso.lean"):
        engine = OnlineEngine(T=2, update="accumulate", lean="auto")
        engine.prepare(_tiny())
    assert not engine.lean_on and "plain mode" in caplog.text
    # a packed model cannot be trained by BPTT, nor flipped without a bound optimizer
    packed = _tiny()
    OnlineEngine(T=2, lean=True).prepare(packed)
    BPTTEngine(T=2).prepare(packed)
    with pytest.raises(RuntimeError, match="engine.lean"):
        packed(_batch()[0])
    OnlineEngine(T=2, lean=True).prepare(packed)
    with pytest.raises(RuntimeError, match="no binary optimizer"):
        packed(_batch()[0]).sum().backward()


def test_lean_is_the_default_for_bso_and_tbso_per_step():
    for optimizer in ("bso", "tbso"):
        cfg = compose_config(f"optimizer={optimizer}")
        assert cfg.engine.lean == "auto"
        model, engine = instantiate(cfg.model), instantiate(cfg.engine)
        engine.prepare(model)
        assert engine.lean_on


# ------------------------------------------------- torch.distributed: the fused update averages


def test_in_backward_update_averages_the_gradient_over_ranks(monkeypatch):
    """Two ranks that computed the same gradient (all_reduce doubles it, world size 2): the lean
    mode's in-backward update divides the sum by the world size, so it flips exactly what the plain
    mode flips from the gradient itself. BSO's fixed threshold: a sum left undivided flips more."""
    import torch.distributed as dist

    reduced = []

    def all_reduce(tensor, *args, **kwargs):  # the other rank's gradient is this rank's
        reduced.append(tensor.shape)
        tensor.mul_(2)

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    monkeypatch.setattr(dist, "get_world_size", lambda *args: 2)
    runs = {}
    for lean in (False, True):
        model = _tiny()
        engine = OnlineEngine(T=2, lean=lean)
        engine.prepare(model)
        router = build_router(model, partial(BSO, gamma=2e-5, beta=0.5), None)
        runs[lean] = (engine.train_batch(model, router, *_batch())[2], model.state_dict())
    assert len(reduced) == 2 * 2  # two packed layers, two time steps
    assert runs[True][0].tolist() == runs[False][0].tolist()  # an undivided sum flips more
    assert int(runs[True][0].sum()) > 0
    for key, value in runs[False][1].items():
        assert torch.equal(value, runs[True][1][key]), key


# ------------------------------------------------- a layer around the core


def test_lean_mode_replaces_modules_and_builds_the_in_backward_optimizer():
    """prepare() puts new modules of the lean classes where the plain ones were (every name of them,
    an alias too), holding the same parameters and hooks; the old ones are gone from the model and
    refuse to run. The router builds the in-backward class of the binary optimizer asked for."""
    from bso.models.parts import SpikingConvBlock

    torch.manual_seed(0)
    model = SpikingVGG("8C3-16C3", in_channels=1, num_classes=10)
    old_blocks, old_conv = list(model.blocks), model.blocks[1].conv
    model.alias = old_conv  # a second name of the same layer
    params = dict(model.named_parameters())
    calls = []
    handle = old_conv.register_forward_hook(lambda m, args, out: calls.append(type(m)))
    OnlineEngine(T=2, lean=True).prepare(model)
    assert [type(b) for b in model.blocks] == [LeanSpikingConvBlock] * 2
    assert (
        type(model.blocks[1].conv) is PackedSynapticConv2d and model.alias is model.blocks[1].conv
    )
    assert not isinstance(model.blocks[0].conv, PackedWeights)  # the full-precision first conv
    modules = list(model.modules())
    assert not any(type(m) is SpikingConvBlock for m in modules)
    assert all(isinstance(m, PackedWeights) for m in modules if getattr(m, "is_binary", False))
    assert not any(m is old for m in modules for old in [*old_blocks, old_conv])
    for name in ("blocks.0.conv.weight", "blocks.0.bn.weight", "blocks.1.bn.bias"):
        assert dict(model.named_parameters())[name] is params[name]  # taken over, not copied
    with pytest.raises(RuntimeError, match="replaced by a LeanSpikingConvBlock"):
        old_blocks[0](_batch()[0])
    with torch.no_grad():
        model(_batch()[0])
    assert calls == [PackedSynapticConv2d]  # the hook moved with the layer; its handle still works
    handle.remove()
    with torch.no_grad():
        model(_batch()[0])
    assert calls == [PackedSynapticConv2d]

    class MyBSO(BSO):
        pass

    for make, lean_class in (
        (partial(BSO), LeanBSO),
        (partial(TBSO, num_steps=2), LeanTBSO),
        (BSO, LeanBSO),  # the class itself
    ):
        router = build_router(model, make, None)
        assert type(router.binary) is lean_class  # bound: it flips the packed layers in backward
        assert model.blocks[1].conv.bound_optimizer() is router.binary
    router = build_router(model, partial(MyBSO, gamma=1e-3), None)
    assert type(router.binary).__name__ == "LeanMyBSO" and isinstance(router.binary, MyBSO)
    assert router.binary.param_groups[0]["gamma"] == 1e-3
    with pytest.raises(TypeError, match=r"blocks.1.conv holds packed .* not BSO: give"):
        build_router(model, lambda p: BSO(p), None)


def test_a_binary_linear_layer_packs_and_flips_like_the_plain_one():
    from bso.layers import SynapticLinear

    torch.manual_seed(0)
    plain = SynapticLinear(6, 4, weights="binary", bias=True)
    lean = PackedWeights.from_module(SynapticLinear(6, 4, weights="binary", bias=True))
    lean.load_state_dict(plain.state_dict())
    assert type(lean) is PackedSynapticLinear
    make = partial(BSO, gamma=1e-3, beta=0.5)
    opts = {m: build_router(torch.nn.Sequential(m), make, None) for m in (plain, lean)}
    g = torch.Generator().manual_seed(1)
    total = 0
    for _ in range(3):
        # spikes from the layers below (they need the input gradient), and their trace
        spikes = (torch.rand(5, 6, generator=g) > 0.5).float()
        trace = torch.rand(5, 6, generator=g)
        grad = torch.randn(5, 4, generator=g)
        flips, outs, input_grads = [], [], []
        for m, router in opts.items():
            router.zero_grad()
            router.begin_time_step(None)
            x = spikes.clone().requires_grad_()
            out = m(x, trace)
            out.backward(grad)  # lean: the flip happens here
            flips.append(router.step())
            outs.append(out.detach())
            input_grads.append(x.grad)
        assert torch.equal(outs[0], outs[1]) and torch.equal(input_grads[0], input_grads[1])
        assert torch.equal(flips[0], flips[1])
        assert torch.equal(plain.weight, lean.sign_values())
        total += int(flips[0].sum())
    assert total > 0
    assert lean.weight.grad is None and plain.weight.grad is not None


def test_the_core_does_not_import_the_lean_mode():
    """Importing the core (layers, neurons, models, optimizers, checkpoints, conversion, export) loads
    nothing of bso.lean; only the online engine's prepare() switches it on."""
    core = (
        "bso.bits, bso.layers, bso.neurons, bso.models, bso.optim, bso.checkpoint, bso.conversion, "
        "bso.distributed, bso.metrics.memory, bso.export"
    )
    code = f"import sys, {core}; print(sorted(m for m in sys.modules if m.startswith('bso.lean')))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"
