"""The paper's numbers as data (bso.paper), their commands and sweeps, and the report (bso.report,
``bso-report``) on run directories written here (config composed by Hydra, metrics records as
train.py writes them): the tables, the figures and the energy report."""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from bso import paper
from bso.report import cli as report_cli
from bso.report import figures, matching, runs, tables
from conftest import CONFIG_DIR, ROOT, compose_config

FIG4_JSON = ROOT / "benchmarks/results/memory_vs_T.json"

ALL_CELLS = [c for artefact in paper.CELLS for c in paper.cells(artefact)]


def composed(cell: paper.Cell):
    (cfg,) = matching.compose_cells([cell])
    return cfg


# ------------------------------------------------------------------------- the paper as data


@pytest.mark.integration
def test_every_reproducible_cell_composes_to_its_setting():
    """Each command trains what the cell says: dataset, method, T, and the swept value."""
    reproducible = [c for c in ALL_CELLS if c.reproducible]
    for cell in ALL_CELLS:
        if not cell.reproducible:
            assert cell.note and cell.command.startswith("not reproducible here")
    for cell, cfg in zip(reproducible, matching.compose_cells(reproducible), strict=True):
        assert (cfg.dataset.name, runs.method_of(cfg), cfg.engine.T) == (
            cell.dataset,
            cell.method,
            cell.T,
        ), cell
        if cell.artefact == "table3":
            assert math.isclose(cfg.optimizer.binary.gamma, cell.x)
        if cell.artefact == "table4":
            assert math.isclose(1 - cfg.optimizer.binary.beta1, cell.x[0])
            assert math.isclose(1 - cfg.optimizer.binary.beta2, cell.x[1])
            assert cfg.optimizer.binary.gamma == 5e-7


@pytest.mark.integration
def test_digits_cells_train_the_same_method_and_value_on_the_digits():
    cells = [c for c in ALL_CELLS if c.method in paper.METHOD_OVERRIDES]
    minis = [c.on_digits() for c in cells]
    for cell, mini, cfg in zip(cells, minis, matching.compose_cells(minis), strict=True):
        assert (cfg.dataset.name, runs.method_of(cfg), cfg.engine.T) == (
            "digits",
            cell.method,
            cell.T,
        )
        assert mini.command.startswith("python train.py ") and "experiment=" not in mini.command


@pytest.mark.integration
def test_the_models_we_build_have_the_papers_sizes():
    """Table 2 / 5 model sizes (1-bit binary weights + 32-bit others) against our models.
    ImageNet's Bi-Real ResNet-18 is 4.16 MB here against the paper's 4.22: not asserted."""
    for cell in paper.cells("table2") + paper.cells("table5"):
        if cell.reproducible and cell.arch == "VGG-11":
            assert matching.built_size_mb(cell) == pytest.approx(cell.size_mb, abs=0.015), cell


def test_table3_gammas_are_the_paper_units_times_1e_5():
    gammas = sorted(c.x for c in paper.cells("table3"))
    assert gammas == pytest.approx([5e-8, 2e-7, 5e-7, 8e-7, 1e-6, 1.5e-6, 2e-6, 5e-5])
    # Table 3 at the default gamma is Table 2's T-BSO T=2 cell: the same setting, the same number
    t3 = next(c for c in paper.cells("table3") if math.isclose(c.x, 5e-7))
    t2 = next(
        c for c in paper.cells("table2") if (c.dataset, c.method, c.T) == ("cifar100", "tbso", 2)
    )
    assert runs.identity(composed(t3)) == runs.identity(composed(t2)) and t3.value == t2.value


def _expand(params) -> list[list[str]]:
    """A basic sweeper's jobs: the cartesian product of its params."""
    axes = []
    for key, value in params.items():
        (override,) = OverridesParser.create().parse_overrides([f"{key}={value}"])
        values = (
            list(override.sweep_string_iterator())
            if override.is_sweep_override()
            else [override.get_value_element_as_str()]
        )
        axes.append([f"{key}={v}" for v in values])
    return [list(job) for job in itertools.product(*axes)]


@pytest.mark.parametrize("artefact", sorted(paper.SWEEPS))
def test_sweep_configs_run_every_cell_of_their_artefact_with_three_seeds(artefact):
    jobs = set()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        for sweep in paper.SWEEPS[artefact]:
            cfg = compose(
                config_name="train", overrides=[f"+sweep={sweep}"], return_hydra_config=True
            )
            jobs |= {tuple(job) for job in _expand(cfg.hydra.sweeper.params)}
    seeds = {o for job in jobs for o in job if o.startswith("seed=")}
    settings = {tuple(o for o in j if not o.startswith("seed=")) + ("logger=none",) for j in jobs}
    identities = {runs.identity(c) for c in matching.compose_overrides(sorted(settings))}
    assert seeds == {"seed=0", "seed=1", "seed=2"}
    wanted = [c for c in paper.cells(artefact) if c.reproducible and c.dataset != "imagenet"]
    missing = [
        c.command
        for c, cfg in zip(wanted, matching.compose_cells(wanted), strict=True)
        if runs.identity(cfg) not in identities
    ]
    assert not missing


def test_optuna_sweep_searches_tbso_gamma_log_uniform_and_maximises():
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(
            config_name="train",
            overrides=["+sweep=optuna", "dataset=digits"],
            return_hydra_config=True,
        )
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "maximize"
    assert sweeper.params["optimizer.binary.gamma"].startswith("tag(log, interval(")
    assert {"optimizer.binary.beta1", "optimizer.binary.beta2"} <= set(sweeper.params)
    assert cfg.optimizer.name == "tbso"


# ------------------------------------------------------------------- runs written by the test


def write_run(
    run_dir, overrides, accs, *, epochs=None, status=None, hydra_overrides=None, extra=()
):
    """A run directory as train.py + Hydra leave it: config.yaml, metrics.jsonl, overrides."""
    epochs = len(accs) if epochs is None else epochs
    cfg = compose_config(*overrides, f"dataset.epochs={epochs}", output_dir=run_dir)
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    records = [{"epoch": e + 1, "test/acc1": a, "train/acc1": a} for e, a in enumerate(accs)]
    lines = [json.dumps(r) for r in [*records, *extra]]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (run_dir / ".hydra").mkdir()
    (run_dir / ".hydra" / "overrides.yaml").write_text(
        OmegaConf.to_yaml(OmegaConf.create(list(hydra_overrides or overrides)))
    )
    if status:
        (run_dir / "status.json").write_text(json.dumps({"status": status, "epoch": len(accs)}))
    return run_dir


def test_runs_on_a_2x2_sweep_give_one_row_per_setting_with_the_swept_keys(tmp_path, capsys):
    """A 2x2 multirun, -m engine.T=2,4 optimizer.binary.gamma=5e-7,1e-6, here with 2 seeds."""
    accs = {
        (2, "5e-07"): (0.80, 0.84),
        (2, "1e-06"): (0.70, 0.70),
        (4, "5e-07"): (0.90, 0.94),
        (4, "1e-06"): (0.60, 0.62),
    }
    for i, ((T, gamma), by_seed) in enumerate(accs.items()):
        for seed, acc in enumerate(by_seed):
            overrides = [f"engine.T={T}", f"optimizer.binary.gamma={gamma}", f"seed={seed}"]
            write_run(tmp_path / f"{i}_{seed}", overrides, [0.1, acc])
    rows, keys = tables.runs_rows(runs.load_runs(tmp_path))
    assert keys == ["optimizer.binary.gamma"]  # T is its own column; seeds are aggregated
    assert len(rows) == 4
    row = next(r for r in rows if r["T"] == 4 and r["optimizer.binary.gamma"] == "5e-07")
    assert row["final"] == "92.00 +- 2.83" and row["runs"] == "2" and row["seeds"] == "0,1"

    fig_path = tmp_path / "acc_vs_gamma.png"
    report_cli.main(
        ["runs", str(tmp_path), "--by", "optimizer.binary.gamma", "--figure", str(fig_path)]
    )
    out = capsys.readouterr().out
    assert "| optimizer.binary.gamma |" in out and fig_path.stat().st_size > 0
    fig = figures.runs_figure(rows, keys, "optimizer.binary.gamma", tmp_path / "again.png")
    (ax,) = fig.axes
    assert len(ax.lines) >= 2 and len(ax.get_legend().get_texts()) == 2  # one line per T
    fig = figures.runs_figure(rows, keys, "engine.T", tmp_path / "by_T.png")
    ax = fig.axes[0]
    assert list(ax.get_xticks()) == [2, 4] and ax.get_xscale() == "linear"
    assert len(ax.get_legend().get_texts()) == 2  # one line per gamma
    assert ax.xaxis.get_major_formatter().get_offset() == ""


def test_an_explicit_default_and_the_default_are_one_setting(tmp_path):
    write_run(tmp_path / "a", ["optimizer.binary.gamma=5e-7", "seed=0"], [0.5, 0.8])
    write_run(tmp_path / "b", ["seed=1"], [0.5, 0.9])
    write_run(tmp_path / "c", ["optimizer.binary.gamma=1e-6", "seed=0"], [0.5, 0.7])
    rows, keys = tables.runs_rows(runs.load_runs(tmp_path))
    assert keys == ["optimizer.binary.gamma"]
    assert [(r["optimizer.binary.gamma"], r["runs"]) for r in rows] == [
        ("5e-07", "2"),
        ("1e-06", "1"),
    ]


def test_unfinished_runs_are_named_and_never_averaged_in(tmp_path):
    base = ["optimizer=tbso", "engine.T=2"]
    write_run(tmp_path / "done", [*base, "seed=0"], [0.5, 0.9])
    write_run(tmp_path / "short", [*base, "seed=1"], [0.2], epochs=2)  # no status.json, 1 of 2
    write_run(tmp_path / "live", [*base, "seed=2"], [0.3, 0.4], status="running")
    write_run(tmp_path / "ok", [*base, "seed=3"], [0.6, 0.7], status="completed")
    rows, _ = tables.runs_rows(runs.load_runs(tmp_path))
    (row,) = rows
    assert row["final"] == "80.00 +- 14.14"  # 90 and 70, not 20 or 40
    assert row["runs"] == "2 (+running (epoch 2/2), unfinished (epoch 1/2))"


def test_best_epoch_from_the_records_or_their_best_keys(tmp_path):
    run = runs.load_run(write_run(tmp_path / "a", ["seed=0"], [0.5, 0.8, 0.7]))
    assert run.best == (pytest.approx(80.0), 2) and run.final_acc == pytest.approx(70.0)
    eval_only = {"test/acc1": 0.99}  # no epoch: skipped
    logged = {"epoch": 3, "test/acc1": 0.7, "best/epoch": 1, "best/test_acc1": 0.95}
    run = runs.load_run(
        write_run(tmp_path / "b", ["seed=0"], [0.5, 0.8], epochs=3, extra=[logged, eval_only])
    )
    assert run.best == (pytest.approx(95.0), 1) and run.completed


def test_table3_puts_runs_in_their_cells_and_commands_in_the_others(tmp_path, capsys):
    digits = [c.on_digits() for c in paper.cells("table3")]
    for seed, acc in enumerate((0.95, 0.97)):
        write_run(tmp_path / f"g{seed}", [*digits[2].overrides, f"seed={seed}"], [0.5, acc])
    write_run(tmp_path / "other_T", [*digits[2].overrides, "engine.T=4"], [0.5, 0.1])
    csv_path = tmp_path / "t3.csv"
    report_cli.main(
        [
            "table3",
            str(tmp_path),
            "--digits",
            "--with",
            "dataset.epochs=2",
            "--csv",
            str(csv_path),
            "--figure",
            str(tmp_path / "t3.png"),
        ]
    )
    out = capsys.readouterr().out
    rows = list(csv.DictReader(io.StringIO(csv_path.read_text())))
    assert len(rows) == 8
    (hit,) = [r for r in rows if r["runs"] != "0"]
    assert hit["gamma"] == "5e-07" and hit["ours final"] == "96.00 +- 1.41" and hit["runs"] == "2"
    assert hit["command"] == "" and hit["paper"] == "73.40"
    for r in rows:
        if r is not hit:
            assert r["command"].startswith("python train.py") and "dataset.epochs=2" in r["command"]
            assert f"optimizer.binary.gamma={r['gamma']}" in r["command"]
    assert "73.75" in out and (tmp_path / "t3.png").stat().st_size > 0


def test_a_models_name_is_a_label_not_a_setting(tmp_path):
    """Runs whose config names its model (`model.name`) count for cells composed without one."""
    cell = paper.cells("table3")[2].on_digits().with_overrides("dataset.epochs=2")
    run_dir = write_run(tmp_path / "a", cell.overrides, [0.5, 0.9])
    cfg = OmegaConf.load(run_dir / "config.yaml")
    cfg.model.name = "vgg_tiny"
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    write_run(tmp_path / "b", [*cell.overrides, "model.layers=8C3-16C3-AP2"], [0.5, 0.9])
    (summary,) = matching.match([cell], runs.load_runs(tmp_path))
    assert [r.dir.name for r in summary.done] == ["a"]  # another model is another setting


def test_table3_on_paper_data_gives_the_difference(tmp_path):
    cell = paper.cells("table3")[0]
    record = {"epoch": 400, "test/acc1": 0.7300}
    run = runs.RunRecord(tmp_path, composed(cell), [record], "completed")
    (row,) = matching.cell_rows("table3", [cell], matching.match([cell], [run]))
    assert row["final - paper"] == "-0.75" and row["command"] == ""


def test_table2_on_empty_outputs_prints_every_command(tmp_path, capsys):
    report_cli.main(["table2", str(tmp_path)])
    out = capsys.readouterr().out
    for cell in paper.cells("table2"):
        assert cell.command in out
    assert out.count("\n| ") == 1 + len(paper.cells("table2"))  # header + one row per cell
    assert "python train.py -m +sweep=table2" in out


@pytest.mark.parametrize(
    "argv",
    [
        ["runs", "{tmp}", "--figure", "x.png"],  # --figure without --by
        ["runs", "{tmp}", "--by", "engine.T"],  # --by without --figure
        ["table2", "{tmp}", "--figure", "x.png"],  # Table 2 has no figure
        ["table3", "{tmp}/missing"],
        ["table3", "{tmp}", "--with", "dataset.epochs"],
    ],
)
def test_bad_arguments_fail_early_with_a_message(argv, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        report_cli.main([a.format(tmp=tmp_path) for a in argv])
    assert exc.value.code == 2 and "error:" in capsys.readouterr().err


def test_a_figure_by_a_key_no_run_swept_is_refused(tmp_path):
    write_run(tmp_path / "a", ["optimizer.binary.gamma=5e-7"], [0.5, 0.8])
    write_run(tmp_path / "b", ["optimizer.binary.gamma=1e-6"], [0.5, 0.8])
    with pytest.raises(SystemExit, match="'optimizer.binary.beta1' was not swept"):
        report_cli.main(["runs", str(tmp_path), "--by", "optimizer.binary.beta1",
                         "--figure", str(tmp_path / "x.png")])  # fmt: skip
    assert not (tmp_path / "x.png").exists()


def test_runs_on_a_directory_without_runs_says_so(tmp_path):
    with pytest.raises(SystemExit, match="no run directories"):
        report_cli.main(["runs", str(tmp_path)])


def test_fig4_reads_the_memory_benchmark_and_overlays_the_paper(tmp_path, capsys):
    report_cli.main(["fig4", str(FIG4_JSON), "--figure", str(tmp_path / "fig4.png")])
    out = capsys.readouterr().out
    assert "58.18" in out and "2.86" in out
    meta, points = tables.memory_points(FIG4_JSON)
    fig = figures.plot_fig4(meta, points, tmp_path / "again.png")
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert sum(", paper" in t for t in labels) == 3 and sum(", ours" in t for t in labels) == 3


def test_wandb_table_is_logged_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    rows = [{"T": 2, "paper": "73.40", "ours final": "72.00", "_final_mean": 72.0}]
    where = tables.log_wandb("table3", rows, mode="offline", run_dir=tmp_path)
    assert str(tmp_path) in where
    assert list(tmp_path.rglob("*.wandb"))  # the offline run file, nothing sent


# ------------------------------------------------------------------------------- the energy report


def write_energy_run(run_dir, overrides, acc, metrics: dict | None):
    """A completed one-epoch run whose record carries ``metrics`` (the SNN metrics), or none."""
    cfg = compose_config(*overrides, "dataset.epochs=1", output_dir=run_dir)
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    record = {"epoch": 1, "test/acc1": acc, "train/acc1": acc, **(metrics or {})}
    (run_dir / "metrics.jsonl").write_text(json.dumps(record) + "\n")
    (run_dir / "status.json").write_text(json.dumps({"status": "completed", "epoch": 1}))


def snn(rate0, rate1, sops, macs):
    return {
        "firing_rate/blocks.0.neuron": rate0,
        "firing_rate/blocks.1.neuron": rate1,
        "firing_rate/all": (rate0 + rate1) / 2,
        "spikes/per_sample": 1000.0,
        "sops/total": sops,
        "macs/total": macs,
        "energy/total_uj": (sops * 0.9 + macs * 4.6) * 1e-6,
    }


def test_energy_table_averages_seeds_and_divides_by_the_fp_snn(tmp_path, capsys):
    write_energy_run(
        tmp_path / "fp",
        [*paper.METHOD_OVERRIDES["fp_snn"], "engine.T=4"],
        0.9,
        snn(0.2, 0.4, 2e6, 1e5),
    )
    write_energy_run(tmp_path / "t0", ["engine.T=4", "seed=0"], 0.8, snn(0.1, 0.2, 1e6, 1e5))
    write_energy_run(tmp_path / "t1", ["engine.T=4", "seed=1"], 0.9, snn(0.1, 0.4, 3e6, 1e5))
    write_energy_run(tmp_path / "t2", ["engine.T=2"], 0.7, snn(0.1, 0.1, 0.5e6, 0.5e5))
    write_energy_run(tmp_path / "old", ["engine.T=6"], 0.7, None)  # logged no SNN metrics
    figure = tmp_path / "firing.png"
    report_cli.main(
        ["energy", str(tmp_path), "--figure", str(figure), "--csv", str(tmp_path / "e.csv")]
    )
    out = capsys.readouterr().out
    rows = {(r["method"], r["T"]): r for r in _csv_rows(tmp_path / "e.csv")}
    fp, tbso4, tbso2 = rows[("FP-SNN (BPTT)", "4")], rows[("T-BSO", "4")], rows[("T-BSO", "2")]
    fp_energy = (2e6 * 0.9 + 1e5 * 4.6) * 1e-6
    assert fp["energy (uJ)"] == f"{fp_energy:.3f}" and fp["vs FP-SNN"] == "1.00x"
    assert tbso4["accuracy (%)"] == "85.00 +- 7.07" and tbso4["runs"] == "2/2"
    # the mean of the seeds' firing_rate/all
    assert tbso4["firing rate (%)"] == f"{100 * (0.15 + 0.25) / 2:.2f}"
    assert tbso4["SOPs (M)"] == "2.000" and tbso4["MACs (M)"] == "0.100"
    assert tbso4["vs FP-SNN"] == f"{(2e6 * 0.9 + 1e5 * 4.6) / (2e6 * 0.9 + 1e5 * 4.6):.2f}x"
    t2_energy = (0.5e6 * 0.9 + 0.5e5 * 4.6) * 1e-6
    assert tbso2["vs FP-SNN"] == f"{t2_energy / fp_energy:.2f}x (T=4)"  # nearest T, named
    assert rows[("T-BSO", "6")]["energy (uJ)"] == "-" and rows[("T-BSO", "6")]["runs"] == "0/1"
    assert "0.9 pJ and 4.6 pJ" in out and figure.stat().st_size > 0


def test_energy_report_rejects_options_that_do_not_apply(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        report_cli.main(["energy", str(tmp_path), "--digits"])
    assert (
        exc.value.code == 2 and "--digits, --with and --by do not apply" in capsys.readouterr().err
    )


def _csv_rows(path):
    return list(csv.DictReader(path.open()))


@pytest.mark.integration
def test_reproduce_mini_cut_down(tmp_path):
    """Two Table 3 settings, one epoch, a narrow model: trained by a Hydra multirun, then
    rendered into the same table and figure."""
    cmd = [
        sys.executable,
        "scripts/reproduce_mini.py",
        "--epochs",
        "1",
        "--seeds",
        "0",
        "--artefacts",
        "table3",
        "--gammas",
        "5e-07",
        "2e-06",
        "--with",
        "model.layers=8C3-16C3-AP2",
        "--runs",
        str(tmp_path / "runs"),
        "--out",
        str(tmp_path / "out"),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = list(csv.DictReader(io.StringIO((tmp_path / "out" / "table3.csv").read_text())))
    ran = {r["gamma"]: r for r in rows if r["runs"] == "1"}
    assert set(ran) == {"5e-07", "2e-06"} and all(r["ours final"] != "-" for r in ran.values())
    assert (tmp_path / "out" / "table3.png").stat().st_size > 0
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["epochs"] == 1
