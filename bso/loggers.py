"""External loggers. Every run also writes ``metrics.jsonl`` in its run directory (bso.rundir)."""

from __future__ import annotations

from pathlib import Path

WANDB_MODES = ("offline", "online", "disabled")


class NullLogger:
    """``logger=none``: log nowhere but the run directory."""

    def __init__(self, run_dir: str | Path | None = None, run_config: dict | None = None, **_):
        pass  # accepts (and ignores) wandb's options such as tags, so experiments compose with it

    run_id = None

    def log(self, metrics: dict, step: int) -> None:
        pass

    def finish(self, status: str = "completed") -> None:
        pass


class WandbLogger:
    """Weights & Biases, offline by default (``logger.mode=online`` to stream; needs network)."""

    def __init__(
        self,
        run_dir: str | Path,
        run_config: dict | None = None,
        project: str = "bso",
        mode: str = "offline",
        entity: str | None = None,
        group: str | None = None,
        name: str | None = None,
        tags: list[str] | tuple[str, ...] = (),
        run_id: str | None = None,
    ):
        """``run_id``: the id of the wandb run to continue (a resumed bso run logs into the same one)."""
        if mode not in WANDB_MODES:
            raise ValueError(f"unknown logger.mode={mode!r}; choose one of {WANDB_MODES}")
        import wandb

        try:
            self.run = wandb.init(
                project=project,
                entity=entity,
                group=group,
                name=name,
                tags=list(tags),
                mode=mode,
                dir=str(run_dir),
                config=run_config,
                id=run_id,
                resume="allow" if run_id else None,
            )
        except wandb.errors.Error as err:  # no network, no login: one line, not wandb's trace
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise ValueError(
                f"logger.mode={mode}: wandb could not start ({type(err).__name__}: {first}); log in "
                "(wandb login) and check the network, or use logger.mode=offline (wandb sync "
                "uploads it later) or logger=none"
            ) from err
        self.run_id = self.run.id

    def log(self, metrics: dict, step: int) -> None:
        self.run.log(metrics, step=step)

    def finish(self, status: str = "completed") -> None:
        """Record the bso run status (completed / failed / interrupted) in the wandb summary."""
        self.run.summary["status"] = status
        self.run.finish(exit_code=0 if status == "completed" else 1)
