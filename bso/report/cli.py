"""``bso-report`` (``python scripts/report.py`` in a checkout): the paper's tables and figures from
run directories, side by side with the paper's numbers (bso.paper).

    bso-report table2 outputs/               # Table 2: every dataset, method and T
    bso-report table3 outputs/ --figure t3.png        # accuracy vs gamma (log axis)
    bso-report table4 outputs/ --figure t4.png        # heat map over the two betas
    bso-report table5 outputs/
    bso-report fig5 outputs/ --figure fig5.png        # accuracy vs T per method
    bso-report fig4 [benchmarks/results/memory_vs_T.json] --figure fig4.png
    bso-report runs outputs/multirun/<sweep> [--by engine.T --figure acc.png]
    bso-report runs outputs/ --env torch --env lock     # a column per package version / lock hash
    bso-report energy outputs/ --figure firing.png    # firing rates, SOPs, energy

Per paper cell: the paper's value, ours (final-epoch test top-1, mean +- std over seeds; best epoch's
value and which epoch), the difference final - paper, the number of completed runs (unfinished ones
are named, never averaged in), and for a cell with no run the exact command that trains it.
`python train.py -m +sweep=<artefact>` (or `bso-train -m ...`) runs a whole artefact (configs/sweep/).

`runs` lists every run below ROOT, one row per distinct setting: the keys a multirun swept (from
each run's .hydra/overrides.yaml) are columns, seeds are aggregated. --env KEY (repeatable) adds a
column from each run's environment.json -- a distribution's version (torch, spikingjelly, ...), `lock`
(the lock file's hash; `*` where the environment differed from it), `git` or `python` -- and runs of
one setting in different environments get separate rows.

`energy` lists every setting below ROOT with its accuracy, firing rate, SOPs / MACs and energy per
sample and the ratio to the full-precision SNN of the same architecture; --figure plots the firing
rate of each spiking layer (docs/metrics.md).

--digits maps the paper's cells onto the embedded digits (same methods and swept values, vgg_tiny):
the mini reproduction (`make reproduce-mini`). --with KEY=VALUE adds an override to every cell's
command and to the matching (e.g. --with dataset.epochs=3 for short runs).
Output: markdown on stdout; --out FILE.md, --csv FILE.csv, --figure FILE.png, and --wandb logs the
table (a wandb.Table) and figure to a new wandb run (offline unless --wandb-mode online).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bso import paper
from bso.report import energy, figures, matching, tables
from bso.report.runs import load_runs

# fig4's default input: the memory benchmark's results, relative to the working directory
# (scripts/report.py passes the checkout's)
FIG4_JSON = Path("benchmarks/results/memory_vs_T.json")
COMMANDS = ("runs", "energy", *paper.ARTEFACTS)
FIGURES = ("table3", "table4", "fig4", "fig5", "energy")


def add_with_option(parser: argparse.ArgumentParser, help: str) -> None:
    """``--with KEY=VALUE`` (repeatable) -> ``args.extra``: extra Hydra overrides."""
    parser.add_argument(
        "--with", dest="extra", action="append", default=[], metavar="KEY=VALUE", help=help
    )


def parse_args(argv: list[str], fig4_json: Path = FIG4_JSON) -> argparse.Namespace:
    """The command line, checked: a wrong combination of options exits with a message."""
    if argv and argv[0] not in COMMANDS and not argv[0].startswith("-"):
        argv = ["runs", *argv]  # `bso-report outputs/`: the runs listing
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("artefact", choices=COMMANDS, help="what to produce")
    parser.add_argument(
        "root",
        type=Path,
        nargs="?",
        default=None,
        help="run directories below this (default outputs/); fig4: the benchmark JSON",
    )
    parser.add_argument("--by", help="runs: the config key on the x axis of --figure")
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY",
        help="runs: a column from environment.json: a package (torch), lock, git or python",
    )
    parser.add_argument("--figure", type=Path, help="write the figure to this PNG")
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    parser.add_argument("--csv", type=Path, help="also write the table as CSV here")
    parser.add_argument(
        "--digits", action="store_true", help="the paper's cells mapped onto the embedded digits"
    )
    add_with_option(parser, "an override added to every cell's command (repeatable)")
    parser.add_argument("--wandb", action="store_true", help="log the table to wandb")
    parser.add_argument("--wandb-mode", default="offline", choices=("offline", "online"))
    parser.add_argument("--wandb-project", default="bso")
    args = parser.parse_args(argv)

    if args.artefact == "energy" and (args.digits or args.extra or args.by):
        parser.error("energy: lists the runs below ROOT; --digits, --with and --by do not apply")
    if args.artefact == "runs":
        if args.figure and not args.by:
            parser.error("runs: --figure needs --by KEY (the x axis, e.g. --by engine.T)")
        if args.by and not args.figure:
            parser.error("runs: --by only chooses the figure's x axis; add --figure FILE.png")
        if args.digits or args.extra:
            parser.error("runs: --digits and --with apply to the paper artefacts only")
    elif args.env:
        parser.error(f"{args.artefact}: --env is for `runs`")
    else:
        if args.by:
            parser.error(f"{args.artefact}: --by is for `runs`; the artefact fixes its axes")
        if args.figure and args.artefact not in FIGURES:
            parser.error(f"{args.artefact} has no figure; figures: {', '.join(FIGURES)}")
        if args.artefact == "fig4" and (args.digits or args.extra):
            parser.error("fig4 reads the memory benchmark; --digits / --with do not apply")
    for extra in args.extra:
        if "=" not in extra:
            parser.error(f"--with expects KEY=VALUE, got {extra!r}")
    if args.root is None:
        args.root = fig4_json if args.artefact == "fig4" else Path("outputs")
    if args.artefact != "fig4" and not args.root.is_dir():
        parser.error(f"{args.root} is not a directory (give the directory your runs are under)")
    return args


def build(args: argparse.Namespace):
    """(title, rows, columns, the matplotlib figure written to --figure or None)."""
    if args.artefact == "fig4":
        meta, points = tables.memory_points(args.root)
        rows = tables.fig4_rows(points)
        fig = figures.plot_fig4(meta, points, args.figure) if args.figure else None
        return paper.TITLES["fig4"], rows, None, fig

    runs = load_runs(args.root)
    if args.artefact == "energy":
        rows = energy.energy_rows(runs)
        if not rows:
            raise SystemExit(f"no run directories (config.yaml + metrics.jsonl) under {args.root}")
        fig = energy.firing_rate_figure(rows, args.figure) if args.figure else None
        return energy.ENERGY_TITLE, rows, None, fig
    if args.artefact == "runs":
        if not runs:
            raise SystemExit(f"no run directories (config.yaml + metrics.jsonl) under {args.root}")
        rows, keys = tables.runs_rows(runs, args.env)
        fig = figures.runs_figure(rows, keys, args.by, args.figure) if args.figure else None
        return f"{len(runs)} runs under {args.root}", rows, None, fig

    cells = matching.prepare_cells(args.artefact, digits=args.digits, extra=args.extra)
    rows = matching.cell_rows(args.artefact, cells, matching.match(cells, runs))
    fig = figures.artefact_figure(args.artefact, cells, rows, args.figure) if args.figure else None
    title = paper.TITLES[args.artefact]
    if args.digits:
        where = sorted({paper.DATASET_NAMES[c.paper_dataset] for c in cells})
        title += (
            f" -- ours on the digits (vgg_tiny, CPU); the paper column is {', '.join(where)}"
            " (VGG-11), for orientation: no difference is computed across datasets"
        )
    sweeps = paper.SWEEPS.get(args.artefact, ())
    if sweeps and not args.digits:
        title += "\n\nAll of it: " + " ; ".join(f"`python train.py -m +sweep={s}`" for s in sweeps)
    return title, rows, None, fig


def main(argv: list[str] | None = None, fig4_json: Path = FIG4_JSON) -> None:
    """Parse ``argv`` (default: the command line), print the table, write the files asked for."""
    args = parse_args(sys.argv[1:] if argv is None else argv, fig4_json)
    try:
        title, rows, columns, fig = build(args)
    except (ValueError, FileNotFoundError) as err:  # e.g. --by a key no run swept
        raise SystemExit(f"bso-report {args.artefact}: {err}") from err
    text = f"{title}\n\n{tables.markdown(rows, columns)}"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        args.csv.write_text(tables.to_csv(rows))
    if fig:
        print(f"\nwrote {args.figure}")
    if args.wandb:
        where = tables.log_wandb(
            args.artefact,
            rows,
            [args.figure] if fig else [],
            mode=args.wandb_mode,
            project=args.wandb_project,
        )
        print(f"logged the table to wandb ({args.wandb_mode}): {where}")


if __name__ == "__main__":
    main()
