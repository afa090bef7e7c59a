"""Longer checks, deselected by `make test` (run them with `make test-slow`)."""

import pytest

from bso.data.synthetic import write_cifar
from bso.train import train
from conftest import compose_config

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("optimizer", ["tbso", "bso"])
def test_paper_forms_learn_the_digits(optimizer, tmp_path):
    """The paper's variants instead of the released code's: OTTT trace, plain CE, T-BSO threshold
    gamma * sqrt(v + eps), BSO without momentum reset, accumulated updates."""
    extra = (
        ["optimizer.binary.threshold=paper"]
        if optimizer == "tbso"
        else ["optimizer.binary.reset_momentum=false"]
    )
    cfg = compose_config(
        f"optimizer={optimizer}",
        "engine.trace=ottt",
        "engine.mse_weight=0",
        "engine.update=accumulate",
        "dataset.epochs=12",
        *extra,
        output_dir=tmp_path,
    )
    assert train(cfg)["test/acc1"] >= 0.90


@pytest.mark.parametrize("engine", ["online", "bptt"])
def test_full_vgg11_trains_on_cifar_files(engine, tmp_path):
    data = write_cifar(tmp_path / "data", "cifar10", per_file=8)
    cfg = compose_config(
        "dataset=cifar10",
        "model=vgg11",
        f"engine={engine}",
        "engine.T=2",
        "dataset.epochs=1",
        "dataset.batch_size=20",
        "dataset.num_workers=0",
        f"dataset.root={data}",
        *(["optimizer=adam", "model.weights=latent"] if engine == "bptt" else []),
        output_dir=tmp_path / "run",
    )
    record = train(cfg)
    assert record["epoch"] == 1 and record["memory/activation_peak_mb"] > 0
