"""scripts/report.py energy: the energy table and the per-layer firing-rate figure from run
directories written here (config composed by Hydra, metrics records as train.py writes them)."""

from __future__ import annotations

import json
import sys

import pytest
from omegaconf import OmegaConf

from conftest import ROOT, compose_config

sys.path.insert(0, str(ROOT / "scripts"))
import report as report_cli  # noqa: E402


def write_run(run_dir, overrides, acc, metrics: dict | None):
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


FP_SNN = ("engine=bptt", "optimizer=sgd", "model.weights=full")


def test_energy_table_averages_seeds_and_divides_by_the_fp_snn(tmp_path, capsys):
    write_run(tmp_path / "fp", [*FP_SNN, "engine.T=4"], 0.9, snn(0.2, 0.4, 2e6, 1e5))
    write_run(tmp_path / "t0", ["engine.T=4", "seed=0"], 0.8, snn(0.1, 0.2, 1e6, 1e5))
    write_run(tmp_path / "t1", ["engine.T=4", "seed=1"], 0.9, snn(0.1, 0.4, 3e6, 1e5))
    write_run(tmp_path / "t2", ["engine.T=2"], 0.7, snn(0.1, 0.1, 0.5e6, 0.5e5))
    write_run(tmp_path / "old", ["engine.T=6"], 0.7, None)  # logged no SNN metrics
    figure = tmp_path / "firing.png"
    report_cli.main(["energy", str(tmp_path), "--figure", str(figure), "--csv", str(tmp_path / "e.csv")])
    out = capsys.readouterr().out
    rows = {(r["method"], r["T"]): r for r in _csv_rows(tmp_path / "e.csv")}
    fp, tbso4, tbso2 = rows[("FP-SNN (BPTT)", "4")], rows[("T-BSO", "4")], rows[("T-BSO", "2")]
    fp_energy = (2e6 * 0.9 + 1e5 * 4.6) * 1e-6
    assert fp["energy (uJ)"] == f"{fp_energy:.3f}" and fp["vs FP-SNN"] == "1.00x"
    assert tbso4["accuracy (%)"] == "85.00 +- 7.07" and tbso4["runs"] == "2/2"
    assert tbso4["firing rate (%)"] == f"{100 * (0.15 + 0.25) / 2:.2f}"  # mean of the seeds' firing_rate/all
    assert tbso4["SOPs (M)"] == "2.000" and tbso4["MACs (M)"] == "0.100"
    assert tbso4["vs FP-SNN"] == f"{(2e6 * 0.9 + 1e5 * 4.6) / (2e6 * 0.9 + 1e5 * 4.6):.2f}x"
    t2_energy = (0.5e6 * 0.9 + 0.5e5 * 4.6) * 1e-6
    assert tbso2["vs FP-SNN"] == f"{t2_energy / fp_energy:.2f}x (T=4)"  # nearest T, named
    assert rows[("T-BSO", "6")]["energy (uJ)"] == "-" and rows[("T-BSO", "6")]["runs"] == "0/1"
    assert "0.9 pJ and 4.6 pJ" in out and figure.stat().st_size > 0


def test_energy_report_rejects_options_that_do_not_apply(tmp_path):
    with pytest.raises(SystemExit):
        report_cli.main(["energy", str(tmp_path), "--digits"])


def _csv_rows(path):
    import csv

    return list(csv.DictReader(path.open()))
