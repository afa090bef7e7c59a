"""``python scripts/report.py ...`` in a checkout: the ``bso-report`` command (bso/report_cli.py),
with the checkout's benchmark results as fig4's default input. ``--help`` lists the artefacts."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's bso, also when run from elsewhere

from bso import report_cli  # noqa: E402
from bso.report_cli import COMMANDS, FIGURES, add_with_option, build, parse_args  # noqa: E402, F401

report_cli.FIG4_JSON = ROOT / "benchmarks/results/memory_vs_T.json"


def main(argv: list[str] | None = None) -> None:
    report_cli.main(argv)


if __name__ == "__main__":
    main()
