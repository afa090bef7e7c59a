"""NIR export (bso.export): write, read back with the `nir` package, re-import with spikingjelly's NIR
importer and simulate; the same spikes and logits as bso, with either reset."""

from __future__ import annotations

import nir
import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from bso.checkpoint import export_1bit
from bso.export import NIRExportError, load_trained, to_nir
from bso.export.nir import compare, run_bso, simulate
from bso.lean import pack
from bso.models import BiRealResNet18, SpikingResNet19, SpikingVGG
from conftest import compose_config


def digits_model(dtype=torch.float64, packed: bool = False):
    """The digits model (vgg_tiny) with random BatchNorm statistics and affine parameters, so that
    folding them matters."""
    cfg = compose_config(output_dir="/tmp/unused")  # resolvable without a Hydra run
    model = instantiate(cfg.model)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(-1.5, 1.5)  # negative scales too
                m.bias.uniform_(-0.5, 0.5)
        model.classifier.weight.normal_(0, 0.3)
    model = model.to(dtype).eval()
    if packed:
        for block in list(model.blocks)[1:]:
            pack(block.conv)
    return model, cfg


@pytest.mark.integration
@pytest.mark.parametrize("packed", [False, True], ids=["float", "packed"])
def test_round_trip_gives_bsos_spikes_and_logits(tmp_path, packed):
    """Every spike of every layer and every logit equal, with bso's soft reset (the graph's metadata)
    and with NIR's hard reset applied on both sides. float64, except the lean mode's packed +-1
    weights, which unpack to float32 (the lean mode trains in float32)."""
    dtype = torch.float32 if packed else torch.float64
    model, _ = digits_model(dtype, packed=packed)
    path = tmp_path / "model.nir"
    to_nir(model, (1, 8, 8), path, T=4)
    x = torch.randn(24, 1, 8, 8, dtype=dtype) * 2
    result = compare(model, path, x, T=4)
    for reset in ("soft", "hard"):
        assert result[reset]["spiking_layers"] == 4
        assert result[reset]["max_abs_logit_diff"] == 0.0, result
        assert result[reset]["spike_mismatch"] == 0.0, result
        assert result[reset]["prediction_agreement"] == 1.0, result
    # the two resets are different networks: bso's outputs differ from NIR's hard reset
    soft_bso, _ = run_bso(model, x, 4)
    hard_nir, _ = simulate(path, x, 4, soft_reset=False, dtype=dtype)
    assert not torch.equal(soft_bso, hard_nir)
    agree = (soft_bso.argmax(-1) == hard_nir.argmax(-1)).double().mean().item()
    assert result["bso_vs_hard_reset_agreement"] == agree < 1.0


def test_graph_read_back_holds_the_folded_weights_and_lif_parameters(tmp_path):
    model, _ = digits_model()
    path = tmp_path / "model.nir"
    to_nir(model, (1, 8, 8), path, T=4, dt=1e-3)
    graph = nir.read(str(path))
    kinds = [type(graph.nodes[n]).__name__ for n in graph.nodes]
    assert kinds.count("Conv2d") == 4 and kinds.count("LIF") == 4 and kinds.count("AvgPool2d") == 3
    assert graph.metadata["T"] == 4 and graph.metadata["producer"] == "bso"
    lif = graph.nodes["blocks_1_neuron"]
    assert lif.metadata["reset"] == "subtract" and lif.metadata["bso_layer"] == "blocks.1.neuron"
    np.testing.assert_allclose(lif.tau, 2 * 1e-3)  # tau_NIR = tau x dt
    np.testing.assert_array_equal(lif.r, 2.0)  # undecayed input: r = tau
    np.testing.assert_array_equal(lif.v_threshold, 1.0)
    np.testing.assert_array_equal(lif.v_leak, 0.0)
    # BatchNorm folded: W' = a W with a = gamma / sqrt(var + eps), W = +-1
    block = model.blocks[1]
    a = (block.bn.weight / torch.sqrt(block.bn.running_var + block.bn.eps)).detach()
    conv = graph.nodes["blocks_1_conv"]
    np.testing.assert_allclose(
        conv.weight, (block.conv.weight.detach() * a.view(-1, 1, 1, 1)).numpy()
    )
    np.testing.assert_allclose(
        conv.bias, (block.bn.bias - a * block.bn.running_mean).detach().numpy()
    )
    np.testing.assert_allclose(np.abs(conv.weight / a.numpy()[:, None, None, None]), 1.0)


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
    assert report["check"]["soft"]["prediction_agreement"] == 1.0
    assert report["check"]["soft"]["spike_mismatch"] < 1e-3  # float32 folding: ties only
    loaded, _, _ = load_trained(tmp_path)
    again = to_nir(loaded, (1, 8, 8), T=4)
    read = nir.read(str(tmp_path / "out.nir"))
    for name, node in again.nodes.items():
        for key in ("weight", "bias", "tau", "v_threshold"):
            if hasattr(node, key):
                np.testing.assert_array_equal(getattr(node, key), getattr(read.nodes[name], key))


@pytest.mark.parametrize(
    "build, layer",
    [
        (lambda: SpikingVGG("4C3-MP2-8C3", in_channels=1), "blocks.0.pool"),
        (
            lambda: SpikingVGG("4C3-8C3", in_channels=1, agmm=True, weights="latent"),
            "blocks.1.gate",
        ),
        (lambda: SpikingResNet19(in_channels=1, widths=(4, 8, 8), blocks=(1, 1, 1)), "blocks.0"),
        (
            lambda: BiRealResNet18(in_channels=1, widths=(4, 8, 8, 8), blocks_per_stage=1),
            "blocks.0",
        ),
    ],
    ids=["max_pool", "agmm", "resnet19", "resnet18"],
)
def test_what_nir_cannot_express_fails_naming_the_layer(build, layer):
    with pytest.raises(NIRExportError, match=rf"cannot export layer '{layer}'"):
        to_nir(build().eval(), (1, 8, 8))


def run_graph(graph: nir.NIRGraph, x: torch.Tensor, T: int) -> tuple[torch.Tensor, list]:
    """A direct reading of the chain graph: NIR's nodes with per-neuron thresholds, the LIF as the
    nodes' metadata says (subtract the threshold), v <- (1 - dt/tau) v + (dt r/tau) I."""
    import torch.nn.functional as F

    order, node = [], "input_1" if "input_1" in graph.nodes else next(iter(graph.nodes))
    successors = dict(graph.edges)
    while node in successors:
        node = successors[node]
        order.append(node)
    v = {}
    summed, spikes = 0.0, []
    dt = graph.metadata["dt"]
    for _ in range(T):
        h, step_spikes = x, []
        for name in order:
            n = graph.nodes[name]
            t = lambda a: torch.as_tensor(np.asarray(a), dtype=x.dtype)  # noqa: E731
            if isinstance(n, nir.Conv2d):
                pair = lambda a: tuple(int(k) for k in np.broadcast_to(a, (2,)))  # noqa: E731
                h = F.conv2d(h, t(n.weight), t(n.bias), pair(n.stride), pair(n.padding))
            elif isinstance(n, nir.LIF):
                assert n.metadata["reset"] == "subtract"
                decay, gain = 1 - dt / t(n.tau), dt * t(n.r) / t(n.tau)
                u = decay * v.get(name, torch.zeros_like(h)) + gain * h
                s = (u >= t(n.v_threshold)).to(x.dtype)
                v[name] = u - s * t(n.v_threshold)
                h = s
                step_spikes.append(s)
            elif isinstance(n, nir.AvgPool2d):
                size = lambda a: tuple(int(k) for k in np.broadcast_to(a, (2,)))  # noqa: E731
                h = F.avg_pool2d(h, size(n.kernel_size), size(n.stride))
            elif isinstance(n, nir.Flatten):
                h = h.flatten(1)
            elif isinstance(n, nir.Affine):
                h = h @ t(n.weight).T + t(n.bias)
        summed = summed + h
        spikes.append(step_spikes)
    return summed, spikes


def test_binary_weights_export_keeps_pm1_weights_with_per_channel_thresholds(tmp_path, capsys):
    """binary_weights=True: the binary convs' NIR weights are exactly +-1, BatchNorm's scale is in
    the LIF thresholds; running the graph as NIR defines it (soft reset from the metadata) gives
    bso's spikes and logits (float64)."""
    model, _ = digits_model()
    path = tmp_path / "binary.nir"
    to_nir(model, (1, 8, 8), path, T=4, binary_weights=True)
    graph = nir.read(str(path))
    for i in (1, 2, 3):
        assert set(np.unique(graph.nodes[f"blocks_{i}_conv"].weight)) == {-1.0, 1.0}
        thresholds = graph.nodes[f"blocks_{i}_neuron"].v_threshold
        assert len(np.unique(thresholds)) == thresholds.shape[0]  # one per channel
    assert len(np.unique(graph.nodes["blocks_0_conv"].weight)) > 2  # the first conv: real weights
    x = torch.randn(16, 1, 8, 8, dtype=torch.float64) * 2
    ours, our_spikes = run_bso(model, x, 4)
    theirs, their_spikes = run_graph(graph, x, 4)
    torch.testing.assert_close(theirs, ours, rtol=1e-9, atol=1e-9)
    for t in range(4):
        for layer, name in enumerate(our_spikes):
            assert torch.equal(their_spikes[t][layer], our_spikes[name][t]), (t, name)
    import export_nir  # scripts/

    with pytest.raises(
        SystemExit
    ) as exit_:  # spikingjelly's importer takes one threshold per layer
        export_nir.parse_args(["run", "out.nir", "--binary-weights", "--check", "8"])
    assert exit_.value.code == 2
    assert "--check re-imports with spikingjelly's importer" in capsys.readouterr().err
