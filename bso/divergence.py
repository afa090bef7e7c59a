"""Stop a run whose loss or weights stop being finite numbers (``divergence.stop``).

The check costs no host synchronisation per step on a GPU: every batch folds ``isfinite(loss)`` into
one device tensor (the index of the first non-finite batch, -1 while there is none), which is read on
the host only every ``divergence.check_every`` batches and at the end of the epoch, where the loop
synchronises anyway. On the CPU reading it is free, so it is read after every batch. At the end of
each epoch every parameter and buffer is checked too (one reduction, one read). Under torchrun the
ranks agree (an all-reduce of the flag), so they stop together.

A diverged run ends with status ``diverged`` (epoch and batch in ``status.json``), keeps the
``last.pt`` / ``best.pt`` of its last finite epoch, never writes a non-finite ``best.pt``, and is
listed as diverged by ``scripts/report.py``.
"""

from __future__ import annotations

import torch
from torch import nn

from bso.distributed import all_reduce_max


class RunDiverged(Exception):
    """The loss or the weights became NaN or infinite."""

    def __init__(self, message: str, epoch: int, batch: int | None):
        super().__init__(message)
        self.epoch, self.batch = epoch, batch


class FiniteCheck:
    """Per epoch: ``observe(loss, batch)`` after each batch (no sync), ``check()`` when due."""

    def __init__(self, epoch: int, device: torch.device, check_every: int = 50):
        self.epoch = epoch
        self.device = device
        self.every = 1 if device.type == "cpu" else max(int(check_every), 1)
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)

    def observe(self, loss: torch.Tensor, batch: int) -> None:
        bad = ~torch.isfinite(loss.detach()).all()
        self.first_bad.masked_fill_(bad & (self.first_bad < 0), batch)

    def due(self, batch: int) -> bool:
        return batch % self.every == 0

    def check(self) -> None:
        # the flag of every rank (the largest first-bad index; any rank's counts)
        first_bad = int(all_reduce_max(self.first_bad))
        if first_bad >= 0:
            raise RunDiverged(
                f"the training loss became non-finite (NaN or inf) in epoch {self.epoch}, batch "
                f"{first_bad}; the run stopped (lower the learning rate, or divergence.stop=false to "
                "train on regardless)",
                self.epoch,
                first_bad,
            )

    def check_model(self, model: nn.Module) -> None:
        tensors = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
        if not tensors:
            return
        finite = torch.stack([torch.isfinite(t).all() for t in tensors]).all()
        bad = all_reduce_max((~finite).to(torch.long))
        if int(bad):
            names = [
                name
                for name, t in (*model.named_parameters(), *model.named_buffers())
                if t.is_floating_point() and not bool(torch.isfinite(t).all())
            ]
            raise RunDiverged(
                f"weights became non-finite (NaN or inf) in epoch {self.epoch}: {', '.join(names[:5])}"
                f"{' ...' if len(names) > 5 else ''}; the run stopped",
                self.epoch,
                None,
            )
