"""The three examples of docs/library.md run and reach their stated accuracy on the embedded digits
(one epoch each, T=2: about 30 s of CPU time in all)."""

from __future__ import annotations

import runpy

import pytest

from conftest import ROOT

pytestmark = pytest.mark.integration  # three 1-epoch trainings


def example(name: str):
    return runpy.run_path(str(ROOT / "examples" / f"{name}.py"), run_name="example")["main"]


@pytest.mark.parametrize(
    ("name", "kwargs", "at_least"),
    [
        ("spikingjelly_cnn_online", {"epochs": 1, "T": 2}, 0.90),  # (a) online, T-BSO: 94.7%
        ("bptt_multistep", {"epochs": 1, "T": 2}, 0.85),  # (b) BPTT, T-BSO: 89.2%
        ("plain_pytorch_bso", {"epochs": 1}, 0.88),  # (c) plain PyTorch, BSO: 92.8%
    ],
)
def test_example_reaches_its_stated_accuracy(name, kwargs, at_least, capsys):
    accuracy = example(name)(**kwargs)
    out = capsys.readouterr().out
    assert "test accuracy" in out
    assert accuracy >= at_least, f"examples/{name}.py reached {accuracy:.3f} < {at_least}"
