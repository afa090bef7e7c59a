"""bso.compat: each private API of torch / spikingjelly is looked up in one place; where one is
missing, bso says so in one line and takes the public path (the lean mode's values where it is
missing: tests/test_lean.py)."""

from __future__ import annotations

import logging

import pytest
import torch

from bso import compat


@pytest.fixture
def without(monkeypatch):
    """``without(prefix)``: bso.compat finds no private API whose path starts with ``prefix``."""
    found = compat.private
    monkeypatch.setattr(compat, "_WARNED", set())

    def hide(prefix):
        monkeypatch.setattr(compat, "private", lambda p: None if p.startswith(prefix) else found(p))

    return hide


def test_private_finds_what_this_install_has_and_none_for_the_rest():
    assert compat.private("torch.ops.aten._batch_norm_impl_index") is not None
    assert compat.private("torch.utils._python_dispatch.TorchDispatchMode") is not None
    assert compat.private("torch.ops.aten._no_such_op") is None
    assert compat.private("torch._no_such_module.x") is None
    assert compat.private("spikingjelly._ops.surrogate._no_such_function") is None
    assert compat.private("no_such_package.anything") is None
    assert compat.batch_norm_kernels() is not None
    assert compat.spikingjelly_cpu_surrogate() is not None


def test_each_missing_api_is_one_warning_line_once(without, caplog):
    without("torch.ops.aten._batch_norm_impl_index")
    with caplog.at_level(logging.WARNING, logger="bso.compat"):
        assert compat.batch_norm_kernels() is None
        assert compat.batch_norm_kernels() is None
    (record,) = caplog.records
    message = record.getMessage()
    assert "\n" not in message
    assert message.startswith("bso: torch.ops.aten._batch_norm_impl_index is not in this torch")
    assert "re-runs BatchNorm in backward" in message


def test_without_the_recompile_limit_the_default_stays_and_one_line_says_so(without, caplog):
    config = compat.private("torch._dynamo.config")
    before = config.recompile_limit
    without("torch._dynamo")
    with caplog.at_level(logging.WARNING, logger="bso.compat"):
        compat.raise_recompile_limit(before + 100)
    assert config.recompile_limit == before
    assert ["recompile_limit" in r.getMessage() for r in caplog.records] == [True]


def test_the_benchmarks_refuse_without_torchs_dispatch_mode(without):
    assert issubclass(compat.torch_dispatch_mode(), object)
    without("torch.utils._python_dispatch")
    with pytest.raises(RuntimeError, match="TorchDispatchMode.*requirements.lock"):
        compat.torch_dispatch_mode()


def test_no_module_but_compat_reaches_into_a_private_api():
    """Every private torch / spikingjelly name bso and its scripts use goes through bso.compat."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    pattern = re.compile(r"(torch|spikingjelly)(\.\w+)*\._[a-z]\w*|nn\.modules\.utils\._")
    offenders = []
    for path in [*root.glob("bso/**/*.py"), *root.glob("scripts/**/*.py"), *root.glob("*.py")]:
        if path.name == "compat.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if pattern.search(code) and "__" not in pattern.search(code).group(0):
                offenders.append(f"{path.relative_to(root)}:{number}: {line.strip()}")
    assert offenders == []
    assert torch.ops.aten.avg_pool2d_backward is not None  # public aten ops are fine
