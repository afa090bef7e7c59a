"""Run directories -> the paper's tables and figures, beside the paper's numbers (bso.paper).

- ``runs``: a run directory as a ``RunRecord`` (config, per-epoch records, status), the setting
  and method it trained, the runs of one setting aggregated over seeds (``Summary``).
- ``matching``: the paper's cells (bso.paper.Cell) and the runs that reproduce each of them.
- ``tables``: markdown / CSV / wandb tables, the runs table (one row per setting), Figure 4's table.
- ``figures``: accuracy against a swept value, Table 4's heat map, memory against T (Figure 4).
- ``energy``: firing rates, synaptic operations and energy per sample of every setting.
- ``cli``: the ``bso-report`` command (``python scripts/report.py`` in a checkout).
"""

from bso.report.matching import cell_rows, compose_cells, match, prepare_cells
from bso.report.runs import RunRecord, Summary, identity, load_run, load_runs, method_of
from bso.report.tables import markdown, runs_rows, to_csv

__all__ = [
    "RunRecord",
    "Summary",
    "cell_rows",
    "compose_cells",
    "identity",
    "load_run",
    "load_runs",
    "markdown",
    "match",
    "method_of",
    "prepare_cells",
    "runs_rows",
    "to_csv",
]
