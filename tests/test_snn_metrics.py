"""Firing rates, SOPs and energy (bso.metrics.snn) against hand computations on tiny networks."""

from __future__ import annotations

import json

import pytest
import torch
from spikingjelly.activation_based.op_counter import DispatchCounterMode, SynOpCounter
from torch import nn

from bso.engine import evaluate
from bso.lean import PackedWeights
from bso.metrics.snn import EnergyModel, SNNCounter, conv_fanout_sum, counter_for, measure
from bso.models import SpikingVGG
from bso.neurons import LIFNode
from conftest import compose_config


def test_conv_fanout_counts_each_spike_once_per_output_it_reaches():
    """3x3 conv, padding 1, 2 output channels on a 3x3 map: a corner spike reaches 4 positions, an
    edge spike 6, the centre 9 (x 2 channels)."""
    conv = nn.Conv2d(1, 2, 3, padding=1, bias=False)
    spikes = torch.zeros(1, 1, 3, 3)
    spikes[0, 0, 0, 0] = 1  # corner
    assert conv_fanout_sum(spikes, conv) == 8
    spikes[0, 0, 0, 1] = 1  # edge
    assert conv_fanout_sum(spikes, conv) == 8 + 12
    spikes[0, 0, 1, 1] = 1  # centre
    assert conv_fanout_sum(spikes, conv) == 8 + 12 + 18
    strided = nn.Conv2d(1, 3, 2, stride=2, bias=False)  # each input reaches one output window
    assert conv_fanout_sum(torch.ones(1, 1, 4, 4), strided) == 16 * 3


def test_spike_ops_match_spikingjelly_synop_counter():
    """On 0/1 input the count is spikingjelly's SynOpCounter's (which runs the conv itself)."""
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 5, 3, padding=1, bias=False)
    conv.weight.data = torch.where(torch.rand_like(conv.weight) < 0.5, -1.0, 1.0)
    spikes = (torch.rand(2, 3, 6, 6) < 0.3).float()
    counter = SynOpCounter()
    with DispatchCounterMode([counter]):
        conv(spikes)
    assert conv_fanout_sum(spikes, conv) == counter.get_total()


def tiny_model(packed: bool = False) -> SpikingVGG:
    """1x1 full-precision conv (weight 1, bias 0) -> LIF, then a binary 3x3 conv (all +1, 2 output
    channels) -> LIF, no BatchNorm, GAP and a 2 x 2 classifier; LIF tau 2, V_th 1."""
    model = SpikingVGG("1C1-2C3", in_channels=1, num_classes=2, norm="none")
    with torch.no_grad():
        model.blocks[0].conv.weight.fill_(1.0)
        model.blocks[0].conv.bias.zero_()
        model.blocks[1].conv.weight.fill_(1.0)
    if packed:
        model.blocks[1].conv = PackedWeights.from_module(model.blocks[1].conv)
    return model.eval()


@pytest.mark.parametrize("packed", [False, True], ids=["float", "packed"])
def test_counts_match_a_hand_computation(packed):
    """Image: 2 in the corner, 0.8 in the centre, 0 elsewhere; T = 2.

    Layer 1 (u[t] = u[t-1]/2 - s[t-1]/2 + x, fire at u >= 1): the corner fires at t=1 (v=1) and t=2
    (u = 0.5 + 2); the centre only at t=2 (u = 0.4 + 0.8): 3 spikes / (9 neurons x 2 steps).
    Layer 2 (every weight +1): t=1 the corner spike's 4 windows get 1 and fire (x 2 channels = 8);
    t=2 every window holds the centre spike, all 9 x 2 fire: 26 spikes / (18 x 2).
    SOPs into layer 2: t=1 corner 4 x 2 = 8; t=2 corner 8 + centre 9 x 2 = 18: 34.
    MACs: first conv 9 outputs x fan-in 1 x 2 steps = 18; classifier 2 x 2 x 2 steps = 8."""
    model = tiny_model(packed)
    image = torch.zeros(1, 1, 3, 3)
    image[0, 0, 0, 0], image[0, 0, 1, 1] = 2.0, 0.8
    batch = image.repeat(3, 1, 1, 1)  # per-sample numbers do not depend on the batch
    loader = [(batch, torch.zeros(3, dtype=torch.long))]
    energy = EnergyModel(ac_pj=0.9, mac_pj=4.6)
    record = measure(model, loader, T=2, device=torch.device("cpu"), energy=energy)
    assert record["firing_rate/blocks.0.neuron"] == 3 / 18
    assert record["firing_rate/blocks.1.neuron"] == 26 / 36
    assert record["firing_rate/all"] == (3 + 26) / (18 + 36)
    assert record["spikes/per_sample"] == 29
    assert record["macs/blocks.0.conv"] == 18
    assert record["sops/blocks.1.conv"] == 34
    assert record["macs/classifier"] == 8
    assert "sops/classifier" not in record and "sops/blocks.0.conv" not in record
    assert record["sops/total"] == 34 and record["macs/total"] == 26
    assert record["energy/ac_uj"] == pytest.approx(34 * 0.9e-6, rel=1e-12)
    assert record["energy/mac_uj"] == pytest.approx(26 * 4.6e-6, rel=1e-12)
    assert record["energy/total_uj"] == pytest.approx((34 * 0.9 + 26 * 4.6) * 1e-6, rel=1e-12)
    assert record["test/acc1"] in (0.0, 1.0)


def test_average_pool_input_counts_every_pooled_spike():
    """After AP2 the next conv's input is spikes / 4; each of those spikes is counted: one spike in
    a pooled cell of a 1x1 conv with 3 outputs -> 3 SOPs, as without the pool."""
    model = SpikingVGG("1C1-AP2-3C1", in_channels=1, num_classes=2, norm="none").eval()
    with torch.no_grad():
        model.blocks[0].conv.weight.fill_(1.0)
        model.blocks[0].conv.bias.zero_()
    image = torch.zeros(1, 1, 2, 2)
    image[0, 0, 0, 0] = image[0, 0, 1, 1] = 1.5  # two spikes at t=1 in the one 2x2 cell
    with SNNCounter(model, T=1) as counter:
        model(image)
    assert counter.record()["sops/blocks.1.conv"] == 2 * 3


def test_linear_layer_fed_spikes_counts_one_op_per_spike_and_output():
    """LIF -> Linear(4, 10): inputs 2, 0, 1.5, 0.5 give 2 spikes, each reaching 10 outputs: 20 SOPs
    (fan-out, not fan-in 4); 10 outputs x fan-in 4 = 40 dense MACs per sample."""
    model = nn.Sequential(LIFNode(), nn.Linear(4, 10))
    with SNNCounter(model, T=1) as counter:
        model(torch.tensor([[2.0, 0.0, 1.5, 0.5]]))
    record = counter.record()
    assert record["sops/1"] == 20
    assert record["sops/total"] == 20 and record["macs/total"] == 0
    assert record["spikes/per_sample"] == 2


class _UserBlock(nn.Module):
    """A user's block: a .conv attribute but none of bso's block attributes."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 1, bias=False)
        self.neuron = LIFNode()

    def forward(self, x):
        return self.neuron(self.conv(x))


def test_a_user_blocks_conv_is_counted_from_what_it_receives():
    """Real values in: 2x2 outputs x 3 channels x fan-in 1 = 12 MACs; spikes in: 2 spikes x 3
    outputs each = 6 SOPs."""
    model = nn.Sequential(_UserBlock())
    with SNNCounter(model, T=1) as counter:
        model(torch.tensor([[[[0.5, 0.25], [0.75, 0.125]]]]))
    assert counter.record()["macs/0.conv"] == 12
    model = _UserBlock()
    with SNNCounter(model, T=1) as counter:
        model(torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]]))
    assert counter.record()["sops/conv"] == 6


def test_hooks_leave_the_evaluation_unchanged_and_are_removed():
    torch.manual_seed(0)
    model = SpikingVGG("4C3-8C3-AP2", in_channels=1, num_classes=3).eval()
    x, y = torch.randn(5, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1])
    plain = evaluate(model, [(x, y)], 3, torch.device("cpu"))
    spikes, outputs = [], []  # counted by hand: every neuron output of every step

    def count(module, args, out):
        spikes.append(float(out.sum()))
        outputs.append(out.numel())

    ours = [block.neuron.register_forward_hook(count) for block in model.blocks]
    with SNNCounter(model, T=3) as counter:
        hooked = evaluate(model, [(x, y)], 3, torch.device("cpu"))
    for handle in ours:
        handle.remove()
    assert plain == hooked
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    record = counter.record()
    assert len(spikes) == 3 * 2 and 0 < sum(spikes) < sum(outputs)  # some fire, not all
    assert record["firing_rate/all"] == pytest.approx(sum(spikes) / sum(outputs), rel=1e-12)
    assert record["spikes/per_sample"] == pytest.approx(sum(spikes) / 5, rel=1e-12)


def test_config_switch_and_bad_energy_values():
    cfg = compose_config("metrics.snn=false")
    assert counter_for(cfg, SpikingVGG("2C3", in_channels=1), 2).record() == {}
    cfg = compose_config("metrics.energy.ac_pj=0.03")
    counter = counter_for(cfg, SpikingVGG("2C3", in_channels=1), 2)
    assert counter.energy.ac_pj == 0.03 and counter.energy.mac_pj == 4.6
    with pytest.raises(ValueError, match="metrics.energy.mac_pj must be a number >= 0"):
        counter_for(compose_config("metrics.energy.mac_pj=-1"), SpikingVGG("2C3"), 2)
    with pytest.raises(ValueError, match="unknown metrics.energy keys"):
        counter_for(compose_config("+metrics.energy.dram_pj=1"), SpikingVGG("2C3"), 2)


@pytest.mark.integration
def test_a_digits_epoch_logs_the_metrics(tmp_path):
    """One digits epoch (lean mode, a narrow VGG to keep it short) writes firing rates, SOPs and
    energy to metrics.jsonl."""
    from bso.train import train

    cfg = compose_config(
        "dataset.epochs=1",
        "engine.T=2",
        "dataset.batch_size=256",
        "save_checkpoint=false",
        "model.layers=8C3-16C3-AP2",
        output_dir=tmp_path,
    )
    train(cfg, overrides=[])
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    # 8 x 8 x 8 and 16 x 8 x 8 neurons per sample, T=2 steps: the rates weigh them so
    rates = [record[f"firing_rate/blocks.{block}.neuron"] for block in range(2)]
    assert all(rate > 0 for rate in rates)  # both layers fire
    assert record["spikes/per_sample"] == pytest.approx(
        2 * (512 * rates[0] + 1024 * rates[1]), rel=1e-9
    )
    assert record["firing_rate/all"] == pytest.approx(
        (512 * rates[0] + 1024 * rates[1]) / 1536, rel=1e-9
    )
    assert record["macs/blocks.0.conv"] == 8 * 64 * 9 * 2  # 8 channels x 8x8 x fan-in 9 x T
    assert record["macs/classifier"] == 16 * 10 * 2
    assert record["sops/blocks.1.conv"] == record["sops/total"] > 0
    assert record["energy/total_uj"] == pytest.approx(
        (record["sops/total"] * 0.9 + record["macs/total"] * 4.6) * 1e-6
    )
