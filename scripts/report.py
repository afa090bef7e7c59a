"""``python scripts/report.py ...`` in a checkout: the ``bso-report`` command (bso/report/cli.py),
with this checkout's benchmark results as fig4's default input. ``--help`` lists the artefacts."""

from pathlib import Path

from bso.report.cli import main

if __name__ == "__main__":
    main(fig4_json=Path(__file__).resolve().parents[1] / "benchmarks/results/memory_vs_T.json")
