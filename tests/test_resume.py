"""What a resumed run restores and may change, without training one: the random number generators,
the best epoch, the config (the runs that resume are in test_run_safety.py and test_long_runs.py)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from bso.preflight import config_for_resume
from bso.resume import Progress, rng_state, set_rng_state
from conftest import compose_config


def _draws():
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_every_generator_replays_its_draws_after_set_rng_state():
    state = rng_state()
    first = _draws()
    _draws()
    set_rng_state(state)
    assert _draws() == first


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without CUDA")
def test_a_cuda_generator_state_is_ignored_without_cuda():
    """A checkpoint from a GPU run resumed on a CPU: its CUDA states are not applied."""
    state = dict(rng_state(), cuda=[torch.get_rng_state()])
    first = _draws()
    set_rng_state(state)
    assert _draws() == first


def test_the_best_epoch_is_the_first_with_the_highest_accuracy():
    progress = Progress()
    assert progress.update_best(1, 0.5)
    assert not progress.update_best(2, 0.4)
    assert not progress.update_best(3, 0.5)  # a tie keeps the earlier epoch
    assert progress.update_best(4, 0.625)
    assert (progress.best_epoch, progress.best_acc1) == (4, 0.625)


def test_a_resume_takes_the_keys_it_may_change_and_refuses_the_others(tmp_path):
    """dataset.epochs (a key a resumed run may change) comes from the command line; a change to
    the method (optimizer.binary.gamma) is refused, naming the key."""
    saved = OmegaConf.to_container(compose_config(output_dir=tmp_path))
    longer = compose_config("dataset.epochs=7", output_dir=tmp_path)
    resumed = config_for_resume(longer, saved, ["dataset.epochs=7"], tmp_path / "last.pt")
    assert resumed.dataset.epochs == 7 != saved["dataset"]["epochs"]
    other = compose_config("optimizer.binary.gamma=0.001", output_dir=tmp_path)
    with pytest.raises(ValueError, match=r"changes \['optimizer.binary.gamma'\]"):
        config_for_resume(other, saved, ["optimizer.binary.gamma=0.001"], tmp_path / "last.pt")
