"""Release parity: `bso` trains exactly what the authors' released code trained.

The golden files in tests/fixtures/release/ (README there) were recorded from the released code's own
training loop: a narrow spiking VGG, T=4, online per-step updates, three fixed batches. Starting from
the same weights, bso must reproduce every step's logits, every step's flip count per layer, T-BSO's
second moments, the final binary weights (exactly) and the final momentum -- in the plain mode and in
the lean mode (engine.lean: packed 1-bit weights flipped inside backward, bso.lean) alike.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch

from bso.engine import OnlineEngine
from bso.layers import named_binary_parameters
from bso.models import SpikingVGG
from bso.optim import BSO, TBSO, build_router

FIXTURES = Path(__file__).parent / "fixtures" / "release"


def load_golden(optimizer: str) -> dict:
    return torch.load(FIXTURES / f"release_{optimizer}_small_T4.pt", weights_only=False)


def release_model(golden: dict, **options) -> SpikingVGG:
    """The golden network with its recorded initial state, loaded by position."""
    model = SpikingVGG(layers=golden["architecture"], in_channels=3, num_classes=10, **options)
    state = model.state_dict()
    assert len(state) == len(golden["init_state"])
    model.load_state_dict(
        {k: v.to(state[k].dtype) for k, v in zip(state, golden["init_state"], strict=True)}
    )
    return model


def release_optimizer(model, golden: dict):
    h = golden["hyper"]
    if golden["optimizer"] == "tbso":
        binary = partial(TBSO, num_steps=h["T"], gamma=h["gamma"], beta1=h["beta1"], beta2=h["beta2"])
    else:  # the release's reset=True branch
        binary = partial(BSO, gamma=h["gamma"], beta=h["beta1"], reset_momentum=True)
    return build_router(model, binary, partial(torch.optim.SGD, lr=h["lr_fp"]))


def replay(
    golden: dict, engine: OnlineEngine | None = None, lean: bool = False, **model_options
) -> dict:
    """Train on the golden batches with the release recipe; record what each step produced."""
    h = golden["hyper"]
    model = release_model(golden, **model_options)
    engine = engine or OnlineEngine(T=h["T"], trace="ndot", mse_weight=h["mse_weight"], lean=lean)
    engine.prepare(model)
    router = release_optimizer(model, golden)
    logits, losses, flips, second_moments = [], [], [], []
    forward, step = model.forward, router.step

    def recording_forward(x):
        out = forward(x)
        logits.append(out.detach().clone())
        return out

    def recording_step(t=None):
        counts = step(t)
        flips.append(counts.tolist())
        if golden["optimizer"] == "tbso":
            weights = router.binary.binary_weights()
            second_moments.append([float(router.binary.state[w]["v"][t]) for w in weights])
        return counts

    model.forward, router.step = recording_forward, recording_step
    model.train()
    assert engine.fused_update == lean
    for x, y in golden["batches"]:
        engine.train_batch(model, router, x, y)
    momentum = [router.binary.state[w]["momentum"] for w in router.binary.binary_weights()]
    return dict(
        model=model, logits=logits, flips=flips, v=second_moments, momentum=momentum, router=router
    )


@pytest.fixture(
    scope="module",
    params=[("tbso", "plain"), ("tbso", "lean"), ("bso", "plain"), ("bso", "lean")],
    ids=lambda p: "-".join(p),
)
def golden_run(request):
    optimizer, mode = request.param
    golden = load_golden(optimizer)
    ours = replay(golden, lean=mode == "lean")
    if mode == "lean":  # no binary-weight gradient was ever stored
        assert all(p.grad is None for p in ours["router"].binary.binary_weights())
    return golden, ours


def test_logits_match_the_release_at_every_step(golden_run):
    golden, ours = golden_run
    assert len(ours["logits"]) == len(golden["steps"]) == 3 * golden["hyper"]["T"]
    for i, (out, step) in enumerate(zip(ours["logits"], golden["steps"], strict=True)):
        assert torch.allclose(out, step["logits"], atol=1e-5, rtol=0), f"step {i}"


def test_flips_per_layer_match_the_release_at_every_step(golden_run):
    golden, ours = golden_run
    assert ours["flips"] == [step["flips_per_layer"] for step in golden["steps"]]
    assert sum(map(sum, ours["flips"])) > 0


def test_second_moments_match_the_release(golden_run):
    golden, ours = golden_run
    if golden["optimizer"] == "bso":  # BSO keeps no second moment
        assert all("v" not in ours["router"].binary.state[w] for w in ours["router"].binary.binary_weights())
        return
    for i, (v, step) in enumerate(zip(ours["v"], golden["steps"], strict=True)):
        assert torch.allclose(torch.tensor(v), torch.tensor(step["v_t"]), rtol=1e-5, atol=0), i


def test_final_weights_and_momentum_match_the_release(golden_run):
    golden, ours = golden_run
    final = ours["model"].state_dict()
    binary = {name for name, _ in named_binary_parameters(ours["model"])}
    for (name, value), expected in zip(final.items(), golden["final_state"], strict=True):
        if name in binary:  # the +-1 weights: identical
            assert torch.equal(value, expected.to(value.dtype)), name
        else:
            assert torch.allclose(value.float(), expected.float(), atol=1e-5), name
    for m, expected in zip(ours["momentum"], golden["final_momentum"], strict=True):
        assert torch.allclose(m, expected, rtol=1e-4, atol=1e-9)


def test_the_papers_ndot_formula_trains_differently():
    """The paper's written NDOT trace is an option, and it is not what the release ran."""
    golden = load_golden("tbso")
    h = golden["hyper"]
    paper = replay(golden, OnlineEngine(T=h["T"], trace="ndot_paper", mse_weight=h["mse_weight"]))
    assert paper["flips"][0] == golden["steps"][0]["flips_per_layer"]  # a_hat[1] = s[1] for both
    assert paper["flips"] != [step["flips_per_layer"] for step in golden["steps"]]
