"""Paper cells (bso.paper.Cell) and the runs that reproduce them: a run counts for a cell when
it trains the setting (bso.report.runs.identity) that the cell's command composes, however the run
was launched; one table row per cell with the paper's value beside ours."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from omegaconf import DictConfig, OmegaConf

from bso import paper
from bso.compose import compose_configs
from bso.paper import Cell
from bso.report.runs import RunRecord, Summary, fmt_epochs, fmt_stats, identity

_COMPOSED: dict[tuple[str, ...], DictConfig] = {}  # overrides -> config (composing is slow)


def compose_overrides(batch: Sequence[Sequence[str]]) -> list[DictConfig]:
    """configs/train.yaml composed with each list of overrides (bso.compose), cached."""
    todo = list(dict.fromkeys(tuple(o) for o in batch if tuple(o) not in _COMPOSED))
    if todo:
        _COMPOSED.update(zip(todo, compose_configs(todo), strict=True))
    return [_COMPOSED[tuple(o)] for o in batch]


def compose_cells(cells: Sequence[Cell]) -> list[DictConfig]:
    """The config each cell's command composes (``init_from``, a path placeholder, left out)."""
    return compose_overrides(
        [
            [*(o for o in c.train_overrides() if not o.startswith("init_from=")), "logger=none"]
            for c in cells
        ]
    )


def match(cells: Sequence[Cell], runs: Iterable[RunRecord]) -> list[Summary]:
    """For each cell, the runs of its setting."""
    by_identity: dict[tuple, list[RunRecord]] = {}
    for run in runs:
        by_identity.setdefault(identity(run.cfg), []).append(run)
    keys = [
        identity(cfg) if c.reproducible else None
        for c, cfg in zip(cells, compose_cells(cells), strict=True)
    ]
    return [Summary(by_identity.get(k, []) if k else []) for k in keys]


def prepare_cells(artefact: str, digits: bool = False, extra: Sequence[str] = ()) -> list[Cell]:
    """The artefact's cells, mapped onto the digits when asked, with ``extra`` overrides added."""
    cells = paper.cells(artefact)
    if digits:
        if artefact == "table2":  # one dataset's rows: CIFAR-10's six methods at the paper's T
            cells = [c for c in cells if c.dataset == "cifar10"]
        cells = [c.on_digits() for c in cells if c.method in paper.METHOD_OVERRIDES]
    return [c.with_overrides(*extra) for c in cells]


def _setting_columns(artefact: str, cell: Cell) -> dict:
    if artefact in ("table2", "table5"):
        return {
            "dataset": paper.DATASET_NAMES.get(cell.dataset, cell.dataset),
            "method": paper.METHOD_NAMES[cell.method],
            "arch": cell.arch,
            "online": "yes" if cell.method in paper.ONLINE else "no",
            "binary": "yes" if cell.method in paper.BINARY else "no",
            "T": cell.T,
        }
    if artefact == "table3":
        return {"gamma (x1e-5)": f"{cell.x / 1e-5:g}", "gamma": f"{cell.x:g}"}
    if artefact == "table4":
        return {"1 - beta1": f"{cell.x[0]:g}", "1 - beta2": f"{cell.x[1]:g}"}
    return {"method": paper.METHOD_NAMES[cell.method], "T": cell.T}


def built_size_mb(cell: Cell) -> float | None:
    """The model size (MB: 1-bit binary weights + 32-bit others) of the model the cell's command
    builds, without training it (bso.models.model_size)."""
    if not cell.reproducible:
        return None
    from hydra.utils import instantiate

    from bso.models import model_size

    (cfg,) = compose_cells([cell])
    key = OmegaConf.to_yaml(cfg.model, resolve=True)  # the same model at every T
    if key not in _SIZES:
        _SIZES[key] = model_size(instantiate(cfg.model)).as_dict()["size_mb"]
    return _SIZES[key]


_SIZES: dict[str, float] = {}


def cell_rows(artefact: str, cells: Sequence[Cell], summaries: Sequence[Summary]) -> list[dict]:
    """One row per cell: the setting, the paper's value, ours, the difference, the command."""
    rows = []
    for cell, s in zip(cells, summaries, strict=True):
        n = len(s.done)
        final, best = s.final, s.best
        row = _setting_columns(artefact, cell)
        if artefact in ("table2", "table5"):
            row["size paper (MB)"] = f"{cell.size_mb:.2f}"
            size = s.size_mb if s.size_mb is not None else built_size_mb(cell)
            row["size ours (MB)"] = f"{size:.2f}" if size is not None else "-"
        row.update(
            {
                "paper": f"{cell.value:.2f}",
                "ours final": fmt_stats(final, n),
                "ours best": fmt_stats(best, n),
                "best epoch": fmt_epochs(s.best_epochs),
                "final - paper": f"{final[0] - cell.value:+.2f}"
                if final and cell.dataset != "digits"
                else "-",
                "runs": s.runs_text(),
                "command": "" if n else cell.command,
            }
        )
        row["_final_mean"] = final[0] if final else None
        row["_final_std"] = final[1] if final else None
        rows.append(row)
    return rows
