"""End to end on the embedded digits (CPU): learning, +-1 weights, schedules, run directory."""

import json

import pytest
import torch

from bso.layers import binary_weight_values, named_binary_parameters
from bso.train import train
from conftest import compose_config


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


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
