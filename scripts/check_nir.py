"""Do third-party simulators run bso's NIR exports as bso does? (`make check-nir`, docs/metrics.md)

    python scripts/check_nir.py --install                    # trains two digits models, checks both
    python scripts/check_nir.py RUN [RUN ...]                # run directories (or checkpoints) to check

For each run: scripts/export_nir.py writes its NIR file; every consumer imports that file, unmodified,
with its own documented call (scripts/nir_consumer.py) and runs the run's whole test set for the run's
T steps; this reports per consumer whether the file imported as written, the fraction of bso's test
predictions it reproduces and its accuracy, with the package versions. Without RUN it trains the
digits model twice (~15 s each on 2 CPU cores): with NIR's hard reset (model.neuron.v_reset=0.0) and
with the paper's soft reset (the default), into outputs/nir-check/. Then the same for two untrained,
narrow residual networks (ResNet-19 and Bi-Real ResNet-18, random BatchNorm statistics, hard reset)
on the same test images: how each consumer runs residual additions (--no-residual skips them).

Consumers: snnTorch and Norse in this environment (bso's `dev` extras), spikingjelly (bso's own
dependency) and Sinabs in its own virtual environment (--sinabs-venv), since Sinabs pins nir<=1.0.4.
``--install`` installs them first: snntorch and norse with pip here; the Sinabs environment is made
with ``python -m venv`` and sees this environment's packages (torch) through a .pth file, behind its
own site-packages, where pip puts sinabs and its pinned nir / nirtorch.

Writes benchmarks/results/nir_interop.{json,md}. Exit status 1 when snnTorch or Norse does not
import a hard-reset model's file or reproduces fewer than --min-agreement of its predictions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
HERE = Path(__file__).resolve().parent
CONSUMERS = ("snntorch", "norse", "spikingjelly", "sinabs")
REQUIRED = ("snntorch", "norse")  # must run a hard-reset export as bso does
TRAIN = {  # the two digits models the check trains when no run is given
    "hard": ["logger=none", "model.neuron.v_reset=0.0"],
    "soft": ["logger=none"],
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="*", type=Path, help="run directories or checkpoints")
    parser.add_argument("--consumers", nargs="+", choices=CONSUMERS, default=list(CONSUMERS))
    parser.add_argument("--install", action="store_true", help="pip-install the consumers first")
    parser.add_argument(
        "--sinabs-venv",
        type=Path,
        default=ROOT / ".venv-sinabs",
        help="Sinabs' own virtual environment (default .venv-sinabs)",
    )
    parser.add_argument(
        "--work", type=Path, default=ROOT / "outputs" / "nir-check", help="trained runs, files"
    )
    parser.add_argument("--min-agreement", type=float, default=0.99)
    parser.add_argument(
        "--no-residual",
        dest="residual",
        action="store_false",
        help="skip the two untrained residual networks (ResNet-19, Bi-Real ResNet-18)",
    )
    parser.add_argument(
        "--out", type=Path, default=RESULTS / "nir_interop", help="results (.json and .md)"
    )
    return parser.parse_args(argv)


def pip(python: Path | str, *packages: str) -> None:
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *packages],
        check=True,
    )


def install(consumers: list[str], sinabs_venv: Path) -> None:
    here = [c for c in consumers if c in ("snntorch", "norse")]
    if here:
        pip(sys.executable, *here)
    if "sinabs" in consumers:
        python = sinabs_python(sinabs_venv)
        if not python.exists():
            subprocess.run([sys.executable, "-m", "venv", str(sinabs_venv)], check=True)
        site = subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        # torch and numpy from this environment, behind the venv's own packages
        Path(site, "bso-environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
        pip(python, "sinabs")


def sinabs_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if platform.system() == "Windows" else "bin/python")


def train(work: Path) -> list[Path]:
    runs = []
    for name, overrides in TRAIN.items():
        run = work / f"digits_{name}_reset"
        if not _completed(run):  # a finished run is reused
            print(f"training the digits model ({name} reset) into {run}", flush=True)
            subprocess.run(
                [sys.executable, str(ROOT / "train.py"), *overrides, f"hydra.run.dir={run}"],
                check=True,
                cwd=ROOT,
            )
        runs.append(run)
    return runs


@torch.no_grad()
def reference(run: Path, nir_file: Path):
    """Export ``run`` with scripts/export_nir.py to ``nir_file``; (its model in float32, its T, the
    checkpoint, the test images and labels)."""
    import export_nir  # scripts/

    from bso.export import load_trained

    export_nir.main([str(run), str(nir_file)])
    model, cfg, file = load_trained(run)
    images, labels = test_set(cfg)
    return model.float(), int(cfg.engine.T), file, images, labels


def test_set(cfg) -> tuple[torch.Tensor, torch.Tensor]:
    from bso.data import build_dataloaders
    from bso.engine.common import input_at

    _, test_loader = build_dataloaders(cfg.dataset, seed=cfg.get("seed", 0))
    batches = [(input_at(x, 0).float(), y) for x, y in test_loader]
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])


def residual_models(cfg) -> list[tuple[str, torch.nn.Module]]:
    """Untrained ResNet-19 and Bi-Real ResNet-18 (CIFAR-style stem, no max pool), narrow, with
    random BatchNorm statistics and NIR's hard reset: how consumers run residual additions."""
    from bso.models import BiRealResNet18, SpikingResNet19

    torch.manual_seed(0)
    neuron = {"v_reset": 0.0}
    channels = int(cfg.dataset.in_channels)
    models = [
        ("SpikingResNet19", SpikingResNet19(channels, 10, (8, 16, 16), (1, 1, 1), neuron=neuron)),
        (
            "BiRealResNet18",
            BiRealResNet18(
                channels, 10, (8, 16, 16, 16), 1, stem_stride=1, stem_pool=False, neuron=neuron
            ),
        ),
    ]
    return [(name, random_statistics(model)) for name, model in models]


@torch.no_grad()
def random_statistics(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` in eval mode with random BatchNorm statistics and affine parameters (negative
    scales too), so that folding them matters."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.uniform_(-1.5, 1.5)
            m.bias.uniform_(-0.5, 0.5)
    return model.eval()


def run_consumer(consumer, python, nir_file, images_file, T, work) -> dict:
    out = work / f"{consumer}.json"
    out.unlink(missing_ok=True)
    command = [str(python), str(HERE / "nir_consumer.py"), consumer, str(nir_file)]
    done = subprocess.run(
        [*command, str(images_file), str(T), str(out)], capture_output=True, text=True
    )
    if not out.is_file():
        return {"imported": False, "error": (done.stderr or done.stdout).strip()[-300:]}
    return json.loads(out.read_text())


@torch.no_grad()
def check_file(model, T, nir_file, images, labels, pythons, entry) -> dict:
    """Run ``nir_file`` in every consumer and compare with ``model`` (bso) on ``images``."""
    from bso.export.nir_compare import run_bso
    from bso.neurons import LIFNode

    ours = torch.cat([run_bso(model, x, T)[0].argmax(-1) for x in images.split(120)]).numpy()
    labels = labels.numpy()
    resets = {str(m.v_reset) for m in model.modules() if isinstance(m, LIFNode)}
    entry.update(
        {
            "reset": "soft (subtract V_th)"
            if resets == {"None"}
            else f"hard (v_reset={', '.join(resets)})",
            "T": T,
            "samples": len(labels),
            "bso_accuracy": float((ours == labels).mean()),
            "consumers": {},
        }
    )
    np.save(nir_file.with_name("images.npy"), images.numpy())
    for consumer, python in pythons.items():
        if consumer == "sinabs" and not Path(python).exists():
            result = {"imported": False, "error": f"no Sinabs environment at {python}"}
        else:
            images_file = nir_file.with_name("images.npy")
            result = run_consumer(consumer, python, nir_file, images_file, T, nir_file.parent)
        predictions = result.pop("predictions", None)
        result.pop("traceback", None)
        if predictions is not None:
            predictions = np.asarray(predictions)
            result["agreement"] = float((predictions == ours).mean())
            result["accuracy"] = float((predictions == labels).mean())
        entry["consumers"][consumer] = result
        print(f"{entry['model']:34s} {consumer:13s} {summary(result)}", flush=True)
    return entry


def check(args: argparse.Namespace) -> dict:
    from bso.export import to_nir

    if args.install:
        install(args.consumers, args.sinabs_venv)
    runs = args.runs or train(args.work)
    pythons = {c: sys.executable for c in args.consumers}
    if "sinabs" in pythons:
        pythons["sinabs"] = sinabs_python(args.sinabs_venv)
    report = {
        "machine": f"{platform.platform()}, {os.cpu_count()} CPUs",
        "python": platform.python_version(),
        "runs": [],
    }
    cfg = None
    for run in runs:
        with tempfile.TemporaryDirectory() as tmp:
            nir_file = Path(tmp) / "model.nir"
            model, T, file, images, labels = reference(run, nir_file)
            entry = {"run": _shown(run), "checkpoint": _shown(file), "trained": True}
            entry["model"] = f"{type(model).__name__} ({'soft' if _soft(model) else 'hard'} reset)"
            report["runs"].append(check_file(model, T, nir_file, images, labels, pythons, entry))
            cfg = cfg or load_config(run)
    if args.residual and cfg is not None:
        for name, model in residual_models(cfg):
            with tempfile.TemporaryDirectory() as tmp:
                nir_file = Path(tmp) / "model.nir"
                to_nir(model, images.shape[1:], nir_file, T=T)
                entry = {"run": None, "trained": False, "model": f"{name} (untrained, hard reset)"}
                report["runs"].append(
                    check_file(model, T, nir_file, images, labels, pythons, entry)
                )
    return report


def _completed(run: Path) -> bool:
    status = run / "status.json"
    return status.is_file() and json.loads(status.read_text()).get("status") == "completed"


def _shown(path: Path) -> str:
    """``path`` relative to the repository where it is inside it."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _soft(model) -> bool:
    from bso.neurons import LIFNode

    return all(m.v_reset is None for m in model.modules() if isinstance(m, LIFNode))


def load_config(run: Path):
    from bso.export import load_trained

    return load_trained(run)[1]


def summary(result: dict) -> str:
    if "agreement" in result:
        line = f"imported as written: yes | agreement with bso {100 * result['agreement']:.2f}% | "
        return line + (result.get("error") or f"accuracy {100 * result['accuracy']:.2f}%")
    where = "imported as written: " + ("yes" if result.get("imported") else "no")
    return f"{where} | {result.get('error', '')}"


def markdown(report: dict) -> str:
    lines = [
        "# NIR interop: bso's exports in third-party simulators",
        "",
        f"`python scripts/check_nir.py` on {report['machine']} (Python {report['python']}).",
        "",
        "| model | consumer | version (nir) | imported as written | agreement with bso | accuracy |",
        "|---|---|---|---|---|---|",
    ]
    for run in report["runs"]:
        name = f"{run['model']}, T={run['T']} (bso: {100 * run['bso_accuracy']:.2f} %)"
        for consumer, r in run["consumers"].items():
            versions = r.get("versions") or {}
            version = f"{versions.get(consumer)} ({versions.get('nir')})" if versions else "-"
            imported = "yes" if "agreement" in r else f"no: {r.get('error', '')}".replace("|", "/")
            if "agreement" in r and r.get("error"):
                imported += f" ({r['error']})"
            agreement = f"{100 * r['agreement']:.2f} %" if "agreement" in r else "-"
            accuracy = f"{100 * r['accuracy']:.2f} %" if "accuracy" in r else "-"
            lines.append(
                f"| {name} | {consumer} | {version} | {imported} | {agreement} | {accuracy} |"
            )
    return "\n".join(lines) + "\n"


def failures(report: dict, minimum: float) -> list[str]:
    bad = []
    for run in report["runs"]:
        if not run["reset"].startswith("hard") or not run["trained"]:
            continue
        for consumer in REQUIRED:
            result = run["consumers"].get(consumer)
            if result is not None and result.get("agreement", 0.0) < minimum:
                bad.append(f"{consumer} on {run['run']}: {summary(result)}")
    return bad


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    report = check(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(report))
    print(f"wrote {args.out.with_suffix('.json')} and .md")
    bad = failures(report, args.min_agreement)
    if bad:
        print("error: a hard-reset export not run as bso runs it:\n  " + "\n  ".join(bad))
        sys.exit(1)
    return report


if __name__ == "__main__":
    main()
