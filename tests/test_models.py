"""Models: every model x weight mode x engine, the paper's model-size column, layer lists, DVS
inputs, AGMM's gate, and the 1-bit export."""

import math

import pytest
import torch
from hydra.utils import instantiate
from spikingjelly.activation_based import functional

from bso.checkpoint import export_1bit, load_checkpoint, pack_signs, unpack_signs
from bso.layers import binary_weight_values, named_binary_parameters
from bso.models import VGG11, BiRealResNet18, SpikingResNet19, SpikingVGG, model_size, parse_layers
from bso.models.agmm import AGMMGate
from bso.neurons import reset_neurons
from bso.optim import build_optimizer
from conftest import compose_config

MODELS = ["vgg11", "vgg11_ws", "resnet18", "resnet19", "vgg_tiny"]
OPTIMIZER_FOR = {"binary": "bso", "latent": "adam", "full": "sgd"}

# --- sizes (paper Table 2's model-size column) ----------------------------------------------------


@pytest.mark.parametrize(
    "classes,size_mb,fp_mb,other",
    [(10, 1.20, 36.91, 12_426), (100, 1.39, 37.10, 58_596)],
)
def test_vgg11_size_matches_the_paper(classes, size_mb, fp_mb, other):
    size = model_size(SpikingVGG(VGG11, in_channels=3, num_classes=classes))
    assert size.binary_params == 9_216_000
    # other = first conv 1,728 + bias 64, BN 2 x 2,752, FC 512 x classes + classes
    assert size.full_precision_params == other
    assert round(size.size_mb, 2) == size_mb
    assert round(size.full_precision_size_mb, 2) == fp_mb


def test_full_precision_vgg_has_no_binary_weights():
    size = model_size(SpikingVGG(VGG11, num_classes=10, weights="full"))
    assert size.binary_params == 0
    assert round(size.size_mb, 2) == 36.91


def test_resnet18_size_matches_the_paper_within_0_1_mb():
    size = model_size(BiRealResNet18(num_classes=1000))
    # binary 3x3 convs: stage 1: 4 x 64*64*9 = 147,456; stage 2: 64*128*9 + 3 x 128*128*9 = 516,096;
    # stage 3: 128*256*9 + 3 x 256*256*9 = 2,064,384; stage 4: 256*512*9 + 3 x 512*512*9 = 8,257,536
    assert size.binary_params == 10_985_472  # / 8 bits = 1.373 MB
    # 32-bit: stem 3*64*9 + BN 128; downsample 1x1 (64*128 + 128*256 + 256*512) + BN 1,792;
    # block BNs 2 x 3,840; FC 512*1000 + 1000  => 696,360 x 4 B = 2.785 MB
    assert size.full_precision_params == 696_360
    # 1,373,184 B + 2,785,440 B = 4.16 MB (the paper's 4.22 counts some detail differently)
    assert size.size_mb == pytest.approx(4.158624, abs=1e-9)


def test_resnet19_and_vgg11_ws_sizes():
    r19 = model_size(SpikingResNet19(num_classes=10))
    # 3x3 binary convs: 128 wide: 6 x 128*128*9; 256 wide: 128*256*9 + 5 x 256*256*9;
    # 512 wide: 256*512*9 + 3 x 512*512*9
    assert r19.binary_params == 6 * 147_456 + 294_912 + 5 * 589_824 + 1_179_648 + 3 * 2_359_296
    ws = model_size(SpikingVGG(VGG11, num_classes=10, norm="none", weight_standardization=True))
    assert (
        ws.binary_params == 9_216_000 and round(ws.size_mb, 2) == 1.19
    )  # no BN, a gain per channel


# --- construction and one training step ---------------------------------------------------------


def test_layer_list_parsing_and_errors():
    assert parse_layers("64C3-AP2-128C5-MP2") == [
        ("conv", 64, 3),
        ("AP", 2, 2),
        ("conv", 128, 5),
        ("MP", 2, 2),
    ]
    assert parse_layers(["8C3", "AP2"]) == [("conv", 8, 3), ("AP", 2, 2)]
    with pytest.raises(ValueError, match="64X3"):
        parse_layers("64X3")
    with pytest.raises(ValueError, match="start with a conv"):
        parse_layers("AP2-64C3")


@pytest.mark.parametrize(
    ("in_channels", "size", "classes"), [(3, 32, 100), (2, 48, 7)], ids=["cifar100", "dvs"]
)
@pytest.mark.parametrize("model_cls", [SpikingVGG, BiRealResNet18, SpikingResNet19])
def test_models_take_cifar_and_dvs_inputs_and_any_number_of_classes(
    model_cls, in_channels, size, classes
):
    model = model_cls(in_channels=in_channels, num_classes=classes)
    assert model(torch.rand(2, in_channels, size, size)).shape == (2, classes)


@pytest.mark.integration
@pytest.mark.parametrize("engine", ["online", "bptt"])
@pytest.mark.parametrize("weights", ["binary", "latent", "full"])
@pytest.mark.parametrize("model_name", MODELS)
def test_model_trains_one_step_with_each_weight_mode_and_engine(model_name, weights, engine):
    overrides = [
        f"model={model_name}",
        f"model.weights={weights}",
        f"engine={engine}",
        "engine.T=2",
        "dataset=cifar10",
        f"optimizer={OPTIMIZER_FOR[weights]}",
    ]
    if engine == "online":
        overrides.append("engine.update=per_step")
    cfg = compose_config(*overrides)
    model = instantiate(cfg.model)
    eng = instantiate(cfg.engine)
    eng.prepare(model)
    optimizer = build_optimizer(model, cfg.optimizer)
    torch.manual_seed(0)
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    summed, loss, flips = eng.train_batch(model, optimizer, x, y)
    assert summed.shape == (2, 10) and torch.isfinite(loss)
    assert len(flips) == len(optimizer.binary_names)
    for _, w in binary_weight_values(model):  # float or packed (engine.lean) storage
        assert torch.all(w.abs() == 1)
    grads = [p.grad for _, p in model.named_parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)


# --- AGMM's gate ---------------------------------------------------------------------------------


def test_agmm_gate_in_every_model():
    for model in (
        SpikingVGG(agmm=True, agmm_num_steps=2),
        SpikingResNet19(agmm=True, agmm_num_steps=2),
        BiRealResNet18(agmm=True, agmm_num_steps=2, num_classes=10),
    ):
        gates = [n for n, _ in model.named_parameters() if n.endswith("alpha")]
        assert len(gates) == len(named_binary_parameters(model))  # one gate per binary conv


def _gate_input() -> torch.Tensor:
    """[B=2, C=2, H=1, W=2]; per-(sample, channel) means 0, 3 | -1, 0; per-sample means 1.5 | -0.5."""
    return torch.tensor([[[[1.0, -1.0]], [[2.0, 4.0]]], [[[-3.0, 1.0]], [[0.0, 0.0]]]])


def _sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def test_agmm_gate_is_alpha_t_times_sigmoid_of_the_spatial_mean_times_x():
    """X'[t] = alpha[t] * sigmoid(E(X[t])) * X[t] (bso/models/agmm.py), E = mean over H, W per
    sample and channel; alpha[t] per time step, the last one reused beyond T; reset restarts t."""
    gate = AGMMGate(num_steps=2)
    assert [n for n, _ in gate.named_parameters()] == ["alpha"] and gate.alpha.tolist() == [
        1.0,
        1.0,
    ]
    with torch.no_grad():
        gate.alpha.copy_(torch.tensor([2.0, 0.5]))
    x = _gate_input()
    means = [[0.0, 3.0], [-1.0, 0.0]]  # [sample][channel]

    def expected(alpha):
        out = torch.empty_like(x, dtype=torch.float64)
        for b in range(2):
            for c in range(2):
                out[b, c] = alpha * _sigmoid(means[b][c]) * x[b, c].double()
        return out

    for alpha in (2.0, 0.5, 0.5):  # t = 0, 1, then t = 2 >= T reuses alpha[1]
        out = gate(x)
        torch.testing.assert_close(out.double(), expected(alpha), rtol=1e-6, atol=0)
        # a zero mean: sigmoid(0) = 1/2 exactly, so X' = alpha / 2 * X exactly
        assert torch.equal(out[0, 0], alpha / 2 * x[0, 0]) and torch.equal(out[1, 1], x[1, 1])
    functional.reset_net(gate)
    torch.testing.assert_close(gate(x).double(), expected(2.0), rtol=1e-6, atol=0)
    # alpha[t]'s gradient is sum(sigmoid(E) * X) at step t only
    gate.zero_grad()
    functional.reset_net(gate)
    gate(x).sum().backward()
    assert gate.alpha.grad[1] == 0.0
    want = sum(_sigmoid(means[b][c]) * float(x[b, c].sum()) for b in range(2) for c in range(2))
    assert float(gate.alpha.grad[0]) == pytest.approx(want, rel=1e-6)


def test_agmm_gate_global_mean_and_fixed_alpha():
    gate = AGMMGate(num_steps=3, statistic="global_mean", learnable_alpha=False)
    assert not list(gate.parameters()) and torch.equal(gate.alpha, torch.ones(3))  # a buffer
    x = _gate_input()
    out = gate(x)
    for b, mean in enumerate((1.5, -0.5)):  # over channels and positions, per sample
        torch.testing.assert_close(
            out[b].double(), _sigmoid(mean) * x[b].double(), rtol=1e-6, atol=0
        )
    with pytest.raises(ValueError, match=r"unknown model.agmm_statistic='channel_mean'; choose"):
        AGMMGate(2, statistic="channel_mean")


def test_agmm_gate_sits_between_batchnorm_and_the_neuron():
    model = SpikingVGG("4C3-8C3", in_channels=1, num_classes=3, agmm=True, agmm_num_steps=2).eval()
    block = model.blocks[1]
    assert isinstance(block.gate, AGMMGate) and not isinstance(model.blocks[0].gate, AGMMGate)
    seen = {}
    block.bn.register_forward_hook(lambda m, i, o: seen.update(bn=o))
    block.gate.register_forward_hook(lambda m, i, o: seen.update(gate_in=i[0], gate_out=o))
    block.neuron.register_forward_pre_hook(lambda m, i: seen.update(neuron_in=i[0]))
    reset_neurons(model)
    with torch.no_grad():
        model(torch.randn(2, 1, 8, 8))
    assert seen["gate_in"] is seen["bn"] and seen["neuron_in"] is seen["gate_out"]


# --- the 1-bit export ----------------------------------------------------------------------------


def test_pack_unpack_signs():
    w = torch.tensor([1.0, -1.0, -1.0, 1.0, 1.0, 1.0, -1.0, -1.0, 1.0, -1.0])
    packed = pack_signs(w)
    assert packed.tolist() == [0b10011100, 0b10000000]
    assert torch.equal(unpack_signs(packed, w.shape), w)


@pytest.mark.integration
@pytest.mark.parametrize(
    "make",
    [
        lambda: SpikingVGG(VGG11, num_classes=10),
        lambda: SpikingVGG(VGG11, num_classes=10, weights="latent"),
        lambda: BiRealResNet18(num_classes=10, stem_stride=1, stem_pool=False),
        lambda: SpikingResNet19(num_classes=10),
        lambda: SpikingVGG(VGG11, num_classes=10, norm="none", weight_standardization=True),
    ],
)
def test_1bit_export_round_trip_is_bit_exact(make, tmp_path):
    torch.manual_seed(0)
    model = make().eval()
    with torch.no_grad():  # make BN statistics non-trivial
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(3, 3, 32, 32)
    reset_neurons(model)
    with torch.no_grad():
        expected = sum(model(x) for _ in range(3))
    size = export_1bit(model, tmp_path / "m.pt")
    torch.manual_seed(1)
    restored = make().eval()
    load_checkpoint(restored, tmp_path / "m.pt")
    reset_neurons(restored)
    with torch.no_grad():
        got = sum(restored(x) for _ in range(3))
    assert torch.equal(got, expected)
    ms = model_size(model)
    assert size < 1.06 * ms.size_mb * 1e6  # within a few percent of the paper's count


def test_vgg11_export_is_about_1_2_mb_against_37_mb_float(tmp_path):
    model = SpikingVGG(VGG11, num_classes=10)
    size = export_1bit(model, tmp_path / "m.pt")
    assert 1.20e6 <= size <= 1.20e6 * 1.05
    torch.save(model.state_dict(), tmp_path / "float.pt")
    assert (tmp_path / "float.pt").stat().st_size > 36e6
