"""What a resumed run restores and may change, without training one: the random number generators,
the best epoch, the config (the runs that resume are in test_run_safety.py and test_long_runs.py)."""

from __future__ import annotations

import os
import random
import signal
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from bso.preflight import config_for_resume
from bso.resume import GracefulInterrupt, Progress, restore, rng_state, set_rng_state
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


def test_sigterm_asks_the_run_to_stop_and_the_handlers_are_put_back():
    """In the main thread SIGTERM sets the flag instead of killing the process; after the block
    the previous handler is back. In another thread (where Python allows no signal handler) the
    block installs nothing and does not fail."""
    before = signal.getsignal(signal.SIGTERM)
    with GracefulInterrupt() as interrupt:
        assert not interrupt()
        os.kill(os.getpid(), signal.SIGTERM)
        assert interrupt.signal == "SIGTERM" and interrupt()
    assert signal.getsignal(signal.SIGTERM) is before
    errors = []

    def in_a_thread():
        try:
            with GracefulInterrupt() as other:
                errors.append(other.signal)
        except Exception as err:  # noqa: BLE001 - the test reports it
            errors.append(err)

    thread = threading.Thread(target=in_a_thread)
    thread.start()
    thread.join()
    assert errors == [None] and signal.getsignal(signal.SIGTERM) is before


def test_restore_puts_back_the_schedules_state():
    """The cosine learning rate continues where the checkpoint left it."""
    from bso.loop import Schedules

    cfg = OmegaConf.create({"lr_schedule": "cosine", "hparam_decay": None})

    def build():
        model = torch.nn.Linear(2, 1)
        sgd = torch.optim.SGD(model.parameters(), lr=0.1)
        router = SimpleNamespace(full_precision=sgd, binary=None)
        router.state_dict, router.load_state_dict = sgd.state_dict, sgd.load_state_dict
        return model, router, Schedules(router, cfg, epochs=10)

    model, router, schedules = build()
    for epoch in range(1, 4):
        router.full_precision.step()  # an epoch's updates, then its schedule
        schedules.step(epoch)
    checkpoint = {
        "rng": [rng_state()],
        "tally": [],
        "model": model.state_dict(),
        "optimizer": router.state_dict(),
        "schedules": schedules.state_dict(),
        "epoch": 3,
        "best_acc1": 0.0,
        "best_epoch": 0,
    }
    model2, router2, schedules2 = build()
    dist = SimpleNamespace(rank=0, device=torch.device("cpu"), is_main=True)
    assert restore(checkpoint, model2, router2, schedules2, dist).epoch == 3
    assert schedules2.cosine.state_dict() == schedules.cosine.state_dict()
    for r, s in ((router, schedules), (router2, schedules2)):
        r.full_precision.step()
        s.step(4)
    assert (
        router2.full_precision.param_groups[0]["lr"] == router.full_precision.param_groups[0]["lr"]
    )
