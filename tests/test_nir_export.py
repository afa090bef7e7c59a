"""NIR export (bso.export): write, read back with the `nir` package, run as NIR's equations define it
and in spikingjelly's, snnTorch's and Norse's importers; the same spikes, logits or predictions as
bso, with either reset; VGG and residual networks; what cannot be exported."""

from __future__ import annotations

import nir
import numpy as np
import pytest
import torch
from check_nir import random_statistics  # scripts/
from hydra.utils import instantiate
from omegaconf import OmegaConf

from bso.checkpoint import export_1bit
from bso.export import NIRExportError, load_trained, to_nir
from bso.export.nir_compare import compare, run_bso, simulate
from bso.lean import PackedWeights
from bso.models import BiRealResNet18, SpikingResNet19, SpikingVGG
from bso.neurons import LIFNode
from conftest import compose_config


def digits_model(dtype=torch.float64, packed: bool = False, v_reset: float | None = None):
    """The digits model (vgg_tiny) with random BatchNorm statistics and affine parameters, so that
    folding them matters; ``v_reset`` as model.neuron.v_reset (None: the soft reset)."""
    reset = "null" if v_reset is None else v_reset
    cfg = compose_config(f"model.neuron.v_reset={reset}", output_dir="/tmp/unused")
    model = random_statistics(instantiate(cfg.model))
    with torch.no_grad():
        model.classifier.weight.normal_(0, 0.3)
    model = model.to(dtype).eval()
    if packed:
        for block in list(model.blocks)[1:]:
            block.conv = PackedWeights.from_module(block.conv)
    return model, cfg


@pytest.mark.integration
@pytest.mark.parametrize(
    "packed, v_reset",
    [(False, None), (True, None), (False, -0.5)],
    ids=["float", "packed", "hard_reset"],
)
def test_round_trip_gives_bsos_spikes_and_logits(tmp_path, packed, v_reset):
    """Every spike of every layer equal and the logits equal up to rounding, with bso's soft reset
    (the graph's metadata) and with NIR's hard reset applied on both sides; a model trained with a
    hard reset as it is. float64, except the lean mode's packed +-1 weights, which unpack to
    float32 (the lean mode trains in float32)."""
    dtype = torch.float32 if packed else torch.float64
    model, _ = digits_model(dtype, packed=packed, v_reset=v_reset)
    path = tmp_path / "model.nir"
    to_nir(model, (1, 8, 8), path, T=4)
    x = torch.randn(24, 1, 8, 8, dtype=dtype) * 2
    result = compare(model, path, x, T=4)
    assert set(result) == (
        {"hard"} if v_reset is not None else {"soft", "hard", "bso_vs_hard_reset_agreement"}
    )
    if v_reset is not None:
        assert (
            result["hard"]["spike_mismatch"] == 0.0 and result["hard"]["max_abs_logit_diff"] < 1e-9
        )
        return
    for reset in ("soft", "hard"):
        assert result[reset]["spiking_layers"] == 4
        assert result[reset]["max_abs_logit_diff"] < (1e-4 if packed else 1e-9), result
        assert result[reset]["spike_mismatch"] == 0.0, result
        assert result[reset]["prediction_agreement"] == 1.0, result
    # the two resets are different networks: bso's outputs differ from NIR's hard reset
    soft_bso, _ = run_bso(model, x, 4)
    hard_nir, _ = simulate(path, x, 4, soft_reset=False, dtype=dtype)
    assert not torch.allclose(soft_bso, hard_nir)
    agree = (soft_bso.argmax(-1) == hard_nir.argmax(-1)).double().mean().item()
    assert result["bso_vs_hard_reset_agreement"] == agree


def test_graph_read_back_holds_the_folded_weights_and_lif_parameters(tmp_path):
    """Conv2d and LIF nodes only, in the spec's shapes: the pools folded into the next conv, the
    global pool and the linear layer one conv; LIF with r = 1 and the state scaled by 1/tau."""
    model, _ = digits_model()
    path = tmp_path / "model.nir"
    to_nir(model, (1, 8, 8), path, T=4, dt=1e-3)
    graph = nir.read(str(path))
    kinds = [type(node).__name__ for node in graph.nodes.values()]
    assert sorted(kinds) == sorted(["Input", "Output"] + ["Conv2d"] * 5 + ["LIF"] * 4)
    assert graph.edges[0] == ("input", "blocks_0_conv") and len(graph.edges) == 10
    assert graph.metadata["T"] == 4 and graph.metadata["dt"] == 1e-3
    lif = graph.nodes["blocks_1_neuron"]
    assert lif.metadata["reset"] == "subtract" and lif.metadata["bso_layer"] == "blocks.1.neuron"
    assert lif.tau.shape == (64, 8, 8) and lif.v_threshold.shape == (64, 8, 8)  # (C, H, W)
    np.testing.assert_allclose(lif.tau, 2 * 1e-3)  # tau_NIR = tau x dt
    np.testing.assert_array_equal(lif.r, 1.0)
    np.testing.assert_array_equal(lif.v_threshold, 0.5)  # V_th / tau: the state is u / tau
    np.testing.assert_array_equal(lif.v_leak, 0.0)
    np.testing.assert_array_equal(lif.v_reset, 0.0)  # left out of the file; read as NIR's 0
    # BatchNorm folded: W' = a W with a = gamma / sqrt(var + eps), W = +-1
    block = model.blocks[1]
    a = (block.bn.weight / torch.sqrt(block.bn.running_var + block.bn.eps)).detach()
    conv = graph.nodes["blocks_1_conv"]
    assert tuple(conv.stride) == (1, 1) and tuple(conv.padding) == (1, 1)
    np.testing.assert_allclose(
        conv.weight, (block.conv.weight.detach() * a.view(-1, 1, 1, 1)).numpy()
    )
    np.testing.assert_allclose(
        conv.bias, (block.bn.bias - a * block.bn.running_mean).detach().numpy()
    )
    # blocks.1's 2x2 average pool inside blocks.2's conv: kernel 6x6, each weight over a 2x2
    # block, / 4; stride 2, padding 2
    block = model.blocks[2]
    a = (block.bn.weight / torch.sqrt(block.bn.running_var + block.bn.eps)).detach()
    conv = graph.nodes["blocks_2_conv"]
    assert conv.weight.shape == (128, 64, 6, 6)
    assert tuple(conv.stride) == (2, 2) and tuple(conv.padding) == (2, 2)
    folded = (block.conv.weight.detach() * a.view(-1, 1, 1, 1) / 4).numpy()
    np.testing.assert_allclose(conv.weight[:, :, ::2, ::2], folded)
    np.testing.assert_allclose(conv.weight[:, :, 1::2, 1::2], folded)
    # the classifier: the last pool, the global pool and the linear layer: W / 16 over 4 x 4
    classifier = graph.nodes["classifier"]
    assert classifier.weight.shape == (10, 128, 4, 4)
    np.testing.assert_allclose(
        classifier.weight[:, :, 3, 1], model.classifier.weight.detach().numpy() / 16
    )
    assert tuple(graph.nodes["output"].output_type["output"]) == (10, 1, 1)


def test_compare_reports_how_far_two_different_networks_are(tmp_path):
    """The graph of one classifier against bso with another: the same spikes, other logits; the
    report's numbers are the ones computed from both networks' outputs."""
    model, _ = digits_model()
    path = tmp_path / "model.nir"
    to_nir(model, (1, 8, 8), path, T=2)
    with torch.no_grad():
        noise = torch.randn(
            model.classifier.weight.shape, generator=torch.Generator().manual_seed(1)
        )
        model.classifier.weight.add_(0.1 * noise.to(torch.float64))
    x = torch.randn(32, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    soft = compare(model, path, x, T=2)["soft"]
    ours, _ = run_bso(model, x, 2)
    theirs, _ = simulate(path, x, 2, soft_reset=True, dtype=torch.float64)
    assert soft["spike_mismatch"] == 0.0
    assert soft["max_abs_logit_diff"] == (ours - theirs).abs().max().item() > 0
    agree = (ours.argmax(-1) == theirs.argmax(-1)).double().mean().item()
    assert soft["prediction_agreement"] == agree and 0 < agree < 1


def test_running_bso_leaves_the_model_at_rest_and_in_its_mode():
    """After run_bso the neurons are reset (the next call starts from rest, as on a fresh model)
    and the model is back in training mode if it was."""
    from bso.neurons import reset_neurons

    model, _ = digits_model()
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reset_neurons(model)
        fresh = model(x)
        reset_neurons(model)
        model.train()
        run_bso(model, x, 3)
        assert model.training
        model.eval()
        assert torch.equal(model(x), fresh)


def test_reading_a_missing_nir_file_names_it(tmp_path):
    model, _ = digits_model()
    with pytest.raises(FileNotFoundError, match="NIR file .*missing.nir not found"):
        compare(model, tmp_path / "missing.nir", torch.zeros(1, 1, 8, 8), T=1)


def test_batchnorm_fold_keeps_the_convs_own_bias(tmp_path):
    """The first conv has a bias: b' = a (b - mean) + beta, and the folded conv computes
    bn(conv(x)) (float64)."""
    model, _ = digits_model()
    block = model.blocks[0]
    with torch.no_grad():
        block.conv.bias.copy_(torch.linspace(-2, 2, block.conv.bias.numel()))
    path = tmp_path / "model.nir"
    to_nir(model, (1, 8, 8), path, T=4)
    conv = nir.read(str(path)).nodes["blocks_0_conv"]
    a = (block.bn.weight / torch.sqrt(block.bn.running_var + block.bn.eps)).detach()
    bias = a * (block.conv.bias - block.bn.running_mean) + block.bn.bias
    np.testing.assert_allclose(conv.bias, bias.detach().numpy(), rtol=1e-12)
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    folded = torch.nn.functional.conv2d(
        x,
        torch.from_numpy(conv.weight),
        torch.from_numpy(conv.bias),
        block.conv.stride,
        block.conv.padding,
    )
    np.testing.assert_allclose(folded.numpy(), block.bn(block.conv(x)).detach().numpy(), atol=1e-12)


@pytest.mark.integration
def test_command_line_exports_a_1bit_checkpoint(tmp_path):
    """scripts/export_nir.py from a 1-bit checkpoint with its config (as a run writes it): the graph
    equals to_nir's on the loaded model; --check runs the round trip on digits test samples."""
    import export_nir  # scripts/

    model, cfg = digits_model(dtype=torch.float32)
    config = OmegaConf.to_container(cfg, resolve=True)
    export_1bit(model, tmp_path / "best_1bit.pt", config=config, model_config=config["model"])
    report = export_nir.main([str(tmp_path), str(tmp_path / "out.nir"), "--check", "32"])
    for reset in ("soft", "hard"):
        assert report["check"][reset]["prediction_agreement"] == 1.0
        assert report["check"][reset]["spike_mismatch"] < 1e-3  # float32 folding: ties only
    loaded, _, _ = load_trained(tmp_path)
    again = to_nir(loaded, (1, 8, 8), T=4)
    read = nir.read(str(tmp_path / "out.nir"))
    for name, node in again.nodes.items():
        for key in ("weight", "bias", "tau", "v_threshold", "v_reset"):
            if hasattr(node, key):
                np.testing.assert_array_equal(getattr(node, key), getattr(read.nodes[name], key))


@pytest.mark.parametrize(
    "build, layer, reason",
    [
        (lambda: SpikingVGG("4C3-MP2-8C3", in_channels=1), "blocks.0.pool", "no max pooling"),
        (
            lambda: SpikingVGG("4C3-8C3", in_channels=1, agmm=True, weights="latent"),
            "blocks.1.gate",
            "AGMM's gate",
        ),
        (
            lambda: BiRealResNet18(in_channels=1, widths=(4, 8, 8, 8), blocks_per_stage=1),
            "stem.2",
            "no max pooling",
        ),
        (lambda: SpikingVGG("4C3-AP3-8C3", in_channels=1), "blocks.1.conv", "not a multiple"),
    ],
    ids=["max_pool", "agmm", "resnet18_stem_pool", "pool_size"],
)
def test_what_nir_cannot_express_fails_naming_the_layer(build, layer, reason):
    with pytest.raises(NIRExportError, match=rf"cannot export layer '{layer}'.*{reason}"):
        to_nir(build().eval(), (1, 8, 8))


@pytest.mark.parametrize(
    "build",
    [
        lambda: SpikingResNet19(in_channels=1, widths=(4, 8, 8), blocks=(1, 1, 1)),
        lambda: BiRealResNet18(
            in_channels=1, widths=(4, 8, 8, 8), blocks_per_stage=2, stem_stride=1, stem_pool=False
        ),
    ],
    ids=["resnet19", "resnet18"],
)
def test_residual_networks_export_as_edges_into_one_node(build, tmp_path):
    """A residual addition is two edges into one node (NIR sums a node's inputs); the shortcut's
    average pool is folded into its 1x1 conv. snnTorch runs the file as bso runs the network
    (hard reset: logits equal up to float32 rounding, every prediction equal)."""
    import nir_consumer  # scripts/

    torch.manual_seed(0)
    model = random_statistics(build())
    for m in model.modules():
        if isinstance(m, LIFNode):
            m.v_reset = 0.0
    graph = to_nir(model, (1, 8, 8), tmp_path / "model.nir", T=4)
    into = {}
    for source, target in graph.edges:
        into.setdefault(target, []).append(source)
    if isinstance(model, SpikingResNet19):
        assert sorted(into["blocks_0_neuron2"]) == ["blocks_0_conv2", "stem_neuron"]  # identity
        assert sorted(into["blocks_1_neuron2"]) == ["blocks_1_conv2", "blocks_1_down_conv"]
    else:  # real-valued blocks: x_n = conv_n + x_(n-1), down to the last downsample shortcut
        assert sorted(into["blocks_1_neuron"]) == ["blocks_0_conv", "stem_0"]
        assert sorted(into["blocks_2_shortcut_1"]) == ["blocks_0_conv", "blocks_1_conv", "stem_0"]
        assert graph.nodes["blocks_2_shortcut_1"].weight.shape == (8, 4, 2, 2)
    x = torch.randn(32, 1, 8, 8) * 2
    np.save(tmp_path / "x.npy", x.numpy())
    args = [str(tmp_path / "model.nir"), str(tmp_path / "x.npy"), "4", str(tmp_path / "o.json")]
    result = nir_consumer.main(["snntorch", *args])
    ours, _ = run_bso(model, x, 4)
    assert result["predictions"] == ours.argmax(-1).tolist(), result.get("traceback")


def test_binary_weights_refuses_residual_networks():
    model = SpikingResNet19(in_channels=1, widths=(4, 8, 8), blocks=(1, 1, 1)).eval()
    with pytest.raises(NIRExportError, match="residual addition"):
        to_nir(model, (1, 8, 8), binary_weights=True)


def run_graph(graph: nir.NIRGraph, x: torch.Tensor, T: int) -> tuple[torch.Tensor, list]:
    """A direct reading of the chain graph as NIR defines it, forward Euler with the graph's dt:
    v <- v + dt/tau ((v_leak - v) + r I) from v = v_leak (the resting potential; NIR leaves the
    start to the simulator), a spike where v >= v_th, then v <- v_reset, or, where the node's
    metadata says so, v <- v - v_th (bso's soft reset)."""
    import torch.nn.functional as F

    order, node = [], "input"
    successors = dict(graph.edges)
    while node in successors:
        node = successors[node]
        order.append(node)
    v = {}
    summed, spikes = 0.0, []
    dt = graph.metadata["dt"]
    t = lambda a: torch.as_tensor(np.asarray(a), dtype=x.dtype)  # noqa: E731
    for _ in range(T):
        h, step_spikes = x, []
        for name in order:
            n = graph.nodes[name]
            if isinstance(n, nir.Conv2d):
                pair = lambda a: tuple(int(k) for k in np.broadcast_to(a, (2,)))  # noqa: E731
                h = F.conv2d(h, t(n.weight), t(n.bias), pair(n.stride), pair(n.padding))
            elif isinstance(n, nir.LIF):
                u = v.get(name, t(n.v_leak).expand_as(h))
                u = u + dt / t(n.tau) * ((t(n.v_leak) - u) + t(n.r) * h)
                s = (u >= t(n.v_threshold)).to(x.dtype)
                if n.metadata["reset"] == "subtract":
                    v[name] = u - s * t(n.v_threshold)
                else:
                    v[name] = torch.where(s.bool(), t(n.v_reset).expand_as(u), u)
                h = s
                step_spikes.append(s)
            elif not isinstance(n, nir.Output):
                raise AssertionError(f"unexpected node {type(n).__name__}")
        summed = summed + h.flatten(1)
        spikes.append(step_spikes)
    return summed, spikes


def assert_graph_runs_as_bso(graph: nir.NIRGraph, model: torch.nn.Module) -> None:
    """run_graph gives bso's spikes of every layer and step, and its logits (float64)."""
    x = torch.randn(16, 1, 8, 8, dtype=torch.float64) * 2
    ours, our_spikes = run_bso(model, x, 4)
    theirs, their_spikes = run_graph(graph, x, 4)
    torch.testing.assert_close(theirs, ours, rtol=1e-9, atol=1e-9)
    for t in range(4):
        for layer, name in enumerate(our_spikes):
            assert torch.equal(their_spikes[t][layer], our_spikes[name][t]), (t, name)


@pytest.mark.parametrize("v_reset", [None, -0.5], ids=["soft", "hard"])
def test_the_graph_read_as_nir_defines_it_runs_bsos_network(v_reset):
    """run_graph, NIR's equations as written (and the soft reset where the metadata says so),
    gives bso's spikes and logits in float64, with either reset; a hard reset's v_reset leaks as
    v_leak and is written into the file scaled with the state."""
    model, _ = digits_model(v_reset=v_reset)
    graph = to_nir(model, (1, 8, 8), T=4)
    if v_reset is not None:
        np.testing.assert_array_equal(graph.nodes["blocks_0_neuron"].v_reset, -0.25)
        np.testing.assert_array_equal(graph.nodes["blocks_0_neuron"].v_leak, -0.25)
    assert_graph_runs_as_bso(graph, model)


def test_binary_weights_export_keeps_pm1_weights_with_per_channel_thresholds(tmp_path, capsys):
    """binary_weights=True: the binary convs' NIR weights are exactly +-1 (blocks.2's too, with the
    pool before it folded in), BatchNorm's scale and the pool's 1/4 are in the LIF thresholds;
    running the graph as NIR defines it (soft reset from the metadata) gives bso's spikes and
    logits (float64)."""
    model, _ = digits_model()
    path = tmp_path / "binary.nir"
    to_nir(model, (1, 8, 8), path, T=4, binary_weights=True)
    graph = nir.read(str(path))
    for i in (1, 2, 3):
        assert set(np.unique(graph.nodes[f"blocks_{i}_conv"].weight)) == {-1.0, 1.0}
        thresholds = graph.nodes[f"blocks_{i}_neuron"].v_threshold
        assert len(np.unique(thresholds)) == thresholds.shape[0]  # one per channel
    assert len(np.unique(graph.nodes["blocks_0_conv"].weight)) > 2  # the first conv: real weights
    assert_graph_runs_as_bso(graph, model)
    import export_nir  # scripts/

    with pytest.raises(
        SystemExit
    ) as exit_:  # spikingjelly's importer takes one threshold per layer
        export_nir.parse_args(["run", "out.nir", "--binary-weights", "--check", "8"])
    assert exit_.value.code == 2
    assert "--check re-imports with spikingjelly's importer" in capsys.readouterr().err


@pytest.mark.parametrize("consumer", ["snntorch", "norse"])
def test_snntorch_and_norse_run_a_hard_reset_export_as_bso(consumer, tmp_path):
    """The file as written, imported with the consumer's documented call (scripts/nir_consumer.py;
    both are dev extras): a model with NIR's hard reset gives bso's predictions on every sample.
    The full digits check, with Sinabs and the soft reset, is `make check-nir`."""
    import nir_consumer  # scripts/

    model, _ = digits_model(torch.float32, v_reset=0.0)
    to_nir(model, (1, 8, 8), tmp_path / "model.nir", T=4)
    x = torch.randn(40, 1, 8, 8) * 2
    np.save(tmp_path / "x.npy", x.numpy())
    out = tmp_path / "out.json"
    result = nir_consumer.main(
        [consumer, str(tmp_path / "model.nir"), str(tmp_path / "x.npy"), "4", str(out)]
    )
    assert result["imported"], result.get("traceback")
    ours, _ = run_bso(model, x, 4)
    assert result["predictions"] == ours.argmax(-1).tolist()
    assert result["versions"][consumer] is not None
