"""End to end on the embedded digits (CPU): learning, +-1 weights, schedules, run directory; the
evaluation's top-1 / top-5; a run's weights from another run (init_from, eval.py)."""

import json

import pytest
import torch

from bso.layers import binary_weight_values, named_binary_parameters
from bso.train import evaluate_checkpoint, train
from conftest import compose_config


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.integration
@pytest.mark.parametrize("optimizer", ["tbso", "bso"])
def test_digits_reaches_90_percent(optimizer, tmp_path):
    """The default recipe (vgg_tiny, T=4, 8 epochs, per-step updates, NDOT trace)."""
    cfg = compose_config(f"optimizer={optimizer}", output_dir=tmp_path)
    final = train(cfg)
    assert final["test/acc1"] >= 0.90, final
    records = _records(tmp_path)
    assert [r["epoch"] for r in records] == list(range(1, cfg.dataset.epochs + 1))
    assert all(r["flip_rate/all"] > 0 for r in records[:2])  # the weights do flip

    # the checkpoint holds the binary weights as exactly +-1, and nothing else per binary weight
    ckpt = torch.load(tmp_path / "last.pt", weights_only=False)
    binary_names = ckpt["binary_weights"]
    assert binary_names == ["blocks.1.conv.weight", "blocks.2.conv.weight", "blocks.3.conv.weight"]
    for name in binary_names:
        assert set(ckpt["model"][name].unique().tolist()) == {-1.0, 1.0}
    for state in ckpt["optimizer"]["binary"]["state"].values():
        assert set(state) <= {"momentum", "v"}


@pytest.mark.integration
def test_weights_stay_pm1_throughout_training(tmp_path):
    from hydra.utils import instantiate

    from bso.data import build_dataloaders
    from bso.optim import build_optimizer

    cfg = compose_config("engine.T=3", output_dir=tmp_path)
    model = instantiate(cfg.model)
    engine = instantiate(cfg.engine)
    engine.prepare(model)
    router = build_optimizer(model, cfg.optimizer)
    train_loader, _ = build_dataloaders(cfg.dataset)
    real_step = router.step
    checked = []

    def checking_step(t=None):
        flips = real_step(t)
        for _, w in binary_weight_values(model):  # float or packed (engine.lean) storage
            checked.append(bool(torch.all(w.abs() == 1)))
        return flips

    router.step = checking_step
    result = engine.train_epoch(model, router, train_loader, torch.device("cpu"))
    assert len(checked) == 3 * 3 * len(train_loader) and all(checked)
    assert int(result.flips.sum()) > 0
    # no float copy of a binary weight anywhere in the model
    binary_ids = {id(w) for _, w in named_binary_parameters(model)}
    shapes = [w.shape for _, w in named_binary_parameters(model)]
    others = [t for t in model.state_dict(keep_vars=True).values() if id(t) not in binary_ids]
    assert not any(t.shape in shapes for t in others)


@pytest.mark.integration
def test_hyperparameter_decay_and_cosine_lr_are_applied_at_epoch_ends(tmp_path):
    cfg = compose_config(
        "dataset.epochs=3",
        "engine.T=1",
        "optimizer.hparam_decay.every_epochs=1",
        "optimizer.hparam_decay.factor=0.1",
        "optimizer.lr_schedule=cosine",
        "save_checkpoint=false",
        output_dir=tmp_path,
    )
    train(cfg)
    records = _records(tmp_path)
    gammas = [r["gamma"] for r in records]
    assert gammas == pytest.approx([5e-7, 5e-7, 5e-8])  # after 0-based epochs 1, 2 (not 0)
    lrs = [r["lr"] for r in records]
    assert lrs == pytest.approx([0.1, 0.075, 0.025])  # cosine over 3 epochs
    assert not (tmp_path / "last.pt").exists()


# --- evaluation: the prediction is the argmax of the outputs summed over the T steps ---------------


class FixedLogits(torch.nn.Module):
    """Ignores its input's values: sample i (its index, held in x) gets ``logits[t][i]`` at step t."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits, self.t = logits, 0

    def forward(self, x):
        out = self.logits[self.t % len(self.logits)][x.long().flatten()]
        self.t += 1
        return out


def test_top1_and_top5_on_hand_built_logits():
    """12 classes; the true class of samples 0..4 ranks 1st, 3rd, 5th, 6th and 12th: top-1 1/5,
    top-5 3/5. Two steps whose logits disagree: the ranks are those of their sum."""
    from bso.engine import evaluate

    ranking = torch.tensor([11.0, 10.0, 9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.0])
    summed = torch.stack([ranking.roll(k) for k in range(5)])  # class k is 1st for sample k
    targets = torch.tensor([0, 1 + 2, 2 + 4, 3 + 5, 4 + 11]) % 12  # 1st, 3rd, 5th, 6th, 12th
    noise = torch.zeros(5, 12)
    noise[:, 5] = 100.0  # step 0 alone would rank class 5 first everywhere; step 1 cancels it
    steps = torch.stack([summed / 2 + noise, summed / 2 - noise])
    x = torch.arange(5.0).view(5, 1)
    loader = [(x[:3], targets[:3]), (x[3:], targets[3:])]  # two batches: counts add up
    record = evaluate(FixedLogits(steps), loader, T=2, device=torch.device("cpu"))
    assert record["acc1"] == 1 / 5 and record["acc5"] == 3 / 5
    # the loss: each step's cross entropy / T, summed over the steps, averaged over the samples
    ce = sum(torch.nn.functional.cross_entropy(s, targets, reduction="sum") for s in steps) / 2 / 5
    assert record["loss"] == pytest.approx(float(ce), rel=1e-6)
    # 10 classes or fewer: no top-5 (it would be nearly always right)
    record = evaluate(
        FixedLogits(steps[:, :, :10]), [(x, targets % 10)], T=2, device=torch.device("cpu")
    )
    assert set(record) == {"loss", "acc1"}


# --- weights from another run ----------------------------------------------------------------------


class _Started(Exception):
    """Raised by the patched epoch loop once it has seen the weights a run starts from."""


def _start_weights(monkeypatch, cfg, overrides):
    """The state_dict the model holds when ``train`` enters its first epoch (then stops it)."""
    from bso.engine import OnlineEngine

    seen = {}

    def first_epoch(self, model, *args, **kwargs):
        seen.update({k: v.clone() for k, v in model.state_dict().items()})
        raise _Started

    monkeypatch.setattr(OnlineEngine, "train_epoch", first_epoch)
    with pytest.raises(_Started):
        train(cfg, overrides=overrides)
    return seen


@pytest.mark.integration
def test_init_from_starts_from_the_checkpoints_weights_and_refuses_another_model(
    tmp_path, monkeypatch
):
    tiny = ["dataset.epochs=1", "engine.T=2", "metrics.snn=false"]
    train(compose_config(*tiny, output_dir=tmp_path / "first"), overrides=tiny)
    first = torch.load(tmp_path / "first" / "last.pt", weights_only=False)["model"]
    fresh = _start_weights(monkeypatch, compose_config(*tiny, output_dir=tmp_path / "fresh"), tiny)
    assert fresh.keys() == first.keys()
    assert not torch.equal(fresh["blocks.1.conv.weight"], first["blocks.1.conv.weight"])
    for name in ("last.pt", "last_1bit.pt"):  # the full checkpoint or the 1-bit export
        overrides = [*tiny, f"init_from={tmp_path / 'first' / name}"]
        start = _start_weights(
            monkeypatch, compose_config(*overrides, output_dir=tmp_path / name), overrides
        )
        assert start.keys() == first.keys()
        for key, value in first.items():  # +-1 weights, BatchNorm statistics, classifier: exactly
            assert torch.equal(start[key], value), (name, key)
    # another architecture on the command line: refused before the run directory exists
    overrides = [*tiny, "model.layers=16C3-AP2", f"init_from={tmp_path / 'first' / 'last.pt'}"]
    with pytest.raises(
        ValueError,
        match=r"holds model vgg_tiny .*layers=32C3-64C3-AP2-128C3-128C3-AP2.*"
        r"but this run builds model vgg_tiny .*layers=16C3-AP2",
    ):
        train(compose_config(*overrides, output_dir=tmp_path / "other"), overrides=overrides)
    assert not (tmp_path / "other").exists()


@pytest.mark.integration
def test_eval_reproduces_the_final_test_accuracy(tmp_path):
    final = train(compose_config("dataset.epochs=1", "engine.T=2", output_dir=tmp_path / "run"))
    for name in ("last_1bit.pt", "last.pt"):  # T=2 comes from the checkpoint's own config
        cfg = compose_config(
            f"checkpoint={tmp_path / 'run' / name}", output_dir=tmp_path / name, config_name="eval"
        )
        record = evaluate_checkpoint(cfg, overrides=[])
        assert record["test/acc1"] == final["test/acc1"]
    with pytest.raises(ValueError, match="eval.py needs checkpoint="):
        evaluate_checkpoint(compose_config(output_dir=tmp_path / "none", config_name="eval"))


@pytest.mark.parametrize(
    "overrides",
    [
        ["optimizer=tbso"],  # the lean mode (engine.lean=auto)
        ["optimizer=bso", "engine.lean=false"],
        ["optimizer=sgd", "engine=bptt", "model.weights=full"],  # FP-SNN
        ["optimizer=sgd", "model.weights=full", "engine.trace=ottt", "engine.update=accumulate"],
        ["optimizer=adam", "engine=bptt", "model.weights=latent"],  # Q-SNN-style
    ],
    ids=["tbso", "bso_plain", "fp_snn", "ottt", "qsnn"],
)
def test_every_method_trains_with_a_hard_reset(overrides, tmp_path):
    """model.neuron.v_reset=0.0 (NIR's LIF, for deployment): every neuron of the model resets to
    0, and each method's training changes the weights."""
    from hydra.utils import instantiate

    from bso.data import build_dataloaders
    from bso.neurons import LIFNode
    from bso.optim import build_optimizer

    cfg = compose_config(*overrides, "engine.T=2", "model.neuron.v_reset=0.0", output_dir=tmp_path)
    model = instantiate(cfg.model)
    assert {m.v_reset for m in model.modules() if isinstance(m, LIFNode)} == {0.0}
    engine = instantiate(cfg.engine)
    engine.prepare(model)
    router = build_optimizer(model, cfg.optimizer)
    before = {n: p.detach().clone().float() for n, p in model.state_dict().items()}
    train_loader, _ = build_dataloaders(cfg.dataset)
    batches = []
    for batch in train_loader:
        batches.append(batch)
        if len(batches) == 2:
            break
    result = engine.train_epoch(model, router, batches, torch.device("cpu"))
    assert result.batches == 2 and torch.isfinite(torch.as_tensor(result.loss_sum))
    changed = [n for n, p in model.state_dict().items() if not torch.equal(p.float(), before[n])]
    assert any("conv" in n for n in changed), changed
