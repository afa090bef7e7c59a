"""Mutation testing of the core: do the tests fail when the method is wrong?

Each mutant is one small change of one module, made on its syntax tree (a curated operator set:
arithmetic operators swapped, comparisons flipped, boolean operators swapped, a negation or sign
dropped, a numeric constant changed, True/False swapped, min/max swapped, the first two positional
arguments of a call swapped, a call statement or augmented assignment dropped). Docstrings, the
messages of ``raise`` statements and f-strings are not mutated. Each mutant is written into one
copy of the tree (the worktree is never touched) and the fast tier of the test files that cover
its module, then the golden tests (``tests/test_release_parity.py``), run against it with ``-x``:
a failing, erroring or hanging run kills it; a passing run lets it survive.

    python scripts/mutate.py                      # the seeded sample, -> benchmarks/results/mutation.*
    python scripts/mutate.py --sample 0           # every mutant (hours on 2 cores)
    python scripts/mutate.py --list               # the mutants, without running anything
    python scripts/mutate.py --only ID [ID ...]   # run these mutants (ids from --list or the report)
    python scripts/mutate.py --rerun-survivors    # after adding tests: the report's survivors again
    python scripts/mutate.py --report             # rewrite mutation.md (after explaining survivors)

Survivors that no test should kill (equivalent mutants, or code that no test on this machine can
reach) are explained in ``EQUIVALENT`` below, by id; the report marks the others. The operators are
in ``mutants.py``, the report in ``mutate_report.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

from mutants import Mutant, mutants_of, mutated
from mutate_report import META_KEYS, cpu_name, write_report

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = "tests/test_release_parity.py"
# the compiled variants of the golden replays (torch.compile: a minute per run) and the full-width
# VGG-11 replay (half a minute per variant; its recorded float32 sums depend on the CPU) run in
# `make test`, not here
GOLDEN_LEFT_OUT = ("fused", "full_width")

# module (or folder) -> the test files whose fast tier covers it; the golden tests run after them
# for the modules a training step runs (NO_GOLDEN: the others, which no replay reaches)
TESTS = {
    "bso/optim/binary.py": ["tests/test_optim.py"],
    "bso/optim/case.py": ["tests/test_optim.py", "tests/test_library.py"],
    "bso/optim/router.py": [
        "tests/test_optim.py",
        "tests/test_baselines.py",
        "tests/test_library.py",
    ],
    "bso/optim/__init__.py": ["tests/test_optim.py"],
    "bso/backend.py": [
        "tests/test_backend.py",
        "tests/test_optim.py",
        "tests/test_neurons_layers.py",
    ],
    "bso/neurons.py": ["tests/test_neurons_layers.py"],
    "bso/layers.py": [
        "tests/test_neurons_layers.py",
        "tests/test_baselines.py",
        "tests/test_models.py",
    ],
    "bso/bits.py": ["tests/test_lean.py"],
    "bso/engine/": [
        "tests/test_training.py",
        "tests/test_baselines.py",
        "tests/test_neurons_layers.py",
    ],
    "bso/metrics/snn.py": ["tests/test_snn_metrics.py"],
    "bso/export/nir.py": ["tests/test_nir_export.py"],
    "bso/resume.py": ["tests/test_resume.py", "tests/test_run_safety.py"],
}
MODULES = [
    "bso/optim/__init__.py",
    "bso/optim/binary.py",
    "bso/optim/case.py",
    "bso/optim/router.py",
    "bso/backend.py",
    "bso/neurons.py",
    "bso/layers.py",
    "bso/bits.py",
    "bso/engine/__init__.py",
    "bso/engine/bptt.py",
    "bso/engine/common.py",
    "bso/engine/online.py",
    "bso/metrics/snn.py",
    "bso/export/nir.py",
    "bso/resume.py",
]
PYTEST_MARK = "not slow and not integration"
NO_GOLDEN = ("bso/metrics/snn.py", "bso/export/nir.py", "bso/resume.py")
MIN_PER_MODULE = 4
# modules whose tests are mostly integration tests (runs that resume; the export's round trip
# through NIR, 20 s): those too
INTEGRATION_TOO = {"bso/resume.py": "not slow", "bso/export/nir.py": "not slow"}
# their two longest tests (a minute and a half together: a Hydra sweep and subprocess error exits,
# beside the resume logic) are left out
LEFT_OUT = [
    "tests/test_run_safety.py::test_a_relaunched_sweep_skips_finished_jobs_and_exits_0",
    "tests/test_run_safety.py::test_user_errors_are_one_line_and_leave_no_directory",
]

# Survivors explained, by id: equivalent mutants (the same values as the original), or code that no
# test on this machine can reach (CUDA), with the reason.
EQUIVALENT: dict[str, str] = {
    "1c2edfcc": "Equivalent: the all-zeros input only gives the output's spatial shape; with a "
    "batch of 2 the coverage read from its first entry is the same.",
    "28567558": "Equivalent: PyTorch requires groups to divide in_channels, so / and // give the "
    "same number (a float instead of an int, equal in every sum and comparison).",
    "3fde4552": "Equivalent: tbso_flip multiplies its first two arguments (W * M), and a float32 "
    "product is the same in either order.",
    "f8d35865": "Equivalent: evaluate's class count is overwritten by the output's width at every "
    "batch and read after the loop, where an empty test set divides by zero either way.",
    "f9bd024b": "Not equivalent under torchrun, but unreachable in one process: it only shows the "
    "progress bar on ranks other than 0, and the engines' tests run in one process.",
    "6f752de2": "Not equivalent under torchrun, but grad_sync is a no-op outside DDP, and the "
    "engines' tests run in one process (test_distributed's torchrun runs are integration tests).",
    "33f1ea40": "Not equivalent under torchrun, but grad_sync is a no-op outside DDP, and the "
    "engines' tests run in one process (test_distributed's torchrun runs are integration tests).",
    "8f87bc1a": "Equivalent: the classifier conv's kernel covers its whole input (a global pool and "
    "the linear layer as one conv), so its output is 1 x 1 for any stride.",
    "35e104f8": "Equivalent: strict=True only checks that size, stride and padding have the same "
    "length, and all three are pairs.",
    "e2a0b213": "Equivalent for the models bso builds: their average pools are square, so the "
    "kernel's height and width are the same number.",
    "a6fd2516": "Not equivalent, but unreachable in one process: the rank is 0 and a run saved by "
    "one process has one RNG state, so min and max of (0, 0) agree; they differ only when a run "
    "resumes under torchrun with another world size, which the tests run here never do.",
}


def all_mutants() -> list[Mutant]:
    return [m for module in MODULES for m in mutants_of(module, (ROOT / module).read_text())]


def mutated_source(mutant: Mutant) -> str:
    source = mutated(mutant, (ROOT / mutant.module).read_text())
    if source is None:
        raise SystemExit(
            f"error: mutant {mutant.id} no longer matches {mutant.module}; --list again"
        )
    return source


def stratified_sample(population: list[Mutant], size: int, seed: int) -> list[Mutant]:
    """``size`` mutants (about: shares are rounded), seeded: each module's share of them in
    proportion to its mutants, but at least ``MIN_PER_MODULE`` (or all it has)."""
    chosen = []
    for module in MODULES:
        mine = [m for m in population if m.module == module]
        share = round(size * len(mine) / len(population))
        rng = random.Random(f"{seed}:{module}")  # a module's sample does not depend on the others
        chosen += rng.sample(mine, min(len(mine), max(share, MIN_PER_MODULE)))
    return sorted(chosen, key=lambda m: (MODULES.index(m.module), m.index, m.choice))


def tests_for(module: str) -> tuple[list[str], str]:
    """The test files that cover ``module`` and the marker expression that selects their tests."""
    for key, tests in TESTS.items():
        if module == key or (key.endswith("/") and module.startswith(key)):
            return list(tests), INTEGRATION_TOO.get(module, PYTEST_MARK)
    raise SystemExit(f"error: no test files mapped to {module}; add it to TESTS in {__file__}")


def golden_tests(tree: Path) -> list[str]:
    """The golden tests' ids, but for the compiled (fused) replays and the full-width replay."""
    status, _, _, output = run_pytest(
        tree, ["--collect-only", "-q", "-m", PYTEST_MARK, GOLDEN], 600
    )
    if status != "passed":
        raise SystemExit(f"error: cannot collect {GOLDEN}: {output[-1:]}")
    ids = [line for line in output if line.startswith(GOLDEN + "::")]
    return [i for i in ids if not any(word in i for word in GOLDEN_LEFT_OUT)]


def copy_tree(dest: Path) -> None:
    ignore = shutil.ignore_patterns(
        ".git", "outputs", "benchmarks", "__pycache__", "*.egg-info", ".pytest_cache", "dist"
    )
    shutil.copytree(ROOT, dest, ignore=ignore, symlinks=True)


PRELOAD = [
    "torch",
    "numpy",
    "pytest",
    "hydra",
    "omegaconf",
    "spikingjelly.activation_based.neuron",
    "nir",
]


def preload() -> None:
    """Import the third-party packages once; every test run is a fork of this process, so that it
    pays only for importing bso (from the mutated tree) and for its tests. Nothing runs a torch
    operation here (no thread pool exists at the fork)."""
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)


def run_pytest(tree: Path, args: list[str], timeout: float) -> tuple[str, float, int, list[str]]:
    """('passed' | 'failed' | 'timeout', seconds, exit code, output lines) of ``pytest args`` in
    ``tree``, in a forked child (its own session: a timeout ends it and what it started)."""
    log = tempfile.NamedTemporaryFile(prefix="bso-mutate-", suffix=".log", delete=False)
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # the child: pytest in the tree, bso imported from it
        code = 3
        try:
            os.setsid()
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            os.chdir(tree)
            os.environ.update(PYTHONPATH=str(tree), PYTHONDONTWRITEBYTECODE="1")
            os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
            os.environ.setdefault("WANDB_MODE", "offline")
            sys.dont_write_bytecode = True
            sys.path.insert(0, str(tree))
            import pytest

            code = int(pytest.main(args))
            bso = sys.modules.get("bso")
            if bso is not None and not bso.__file__.startswith(str(tree)):
                print(f"bso was imported from {bso.__file__}, not from the mutated tree")
                code = 99
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    status = None
    while time.perf_counter() - start < timeout:
        done, code = os.waitpid(pid, os.WNOHANG)
        if done:
            status = os.waitstatus_to_exitcode(code)
            break
        time.sleep(0.1)
    seconds = time.perf_counter() - start
    if status is None:
        os.killpg(pid, 9)
        os.waitpid(pid, 0)
    lines = Path(log.name).read_text(errors="replace").strip().splitlines()
    os.unlink(log.name)
    if status == 99:
        raise SystemExit(f"error: {lines[-1]}")
    name = "timeout" if status is None else "passed" if status == 0 else "failed"
    return name, seconds, status, lines


def run_tests(tree: Path, tests: list[str], mark: str, timeout: float):
    """('passed' | 'failed' | 'timeout', seconds, last line) of ``tests`` (-x: to the first failure)."""
    args = ["-x", "-q", "-p", "no:cacheprovider", "-m", mark, *tests]
    args += [a for t in LEFT_OUT for a in ("--deselect", t)]
    status, seconds, code, lines = run_pytest(tree, args, timeout)
    if code == 5:
        raise SystemExit(f"error: pytest collected nothing from {tests}: {lines[-1:]}")
    return status, seconds, lines[-1] if lines else ""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", type=int, default=64, help="mutants to run (0: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="+", metavar="ID", help="run only these mutants")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument(
        "--rerun-survivors",
        action="store_true",
        help="run the survivors of the report in --out again (after adding tests) and update it",
    )
    parser.add_argument(
        "--report",
        action="store_true",
        help="rewrite mutation.md from mutation.json in --out (after explaining survivors)",
    )
    parser.add_argument(
        "--no-baseline",
        action="store_true",
        help="skip the check that the unmutated tree passes the tests (while developing tests)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)

    if args.report:
        saved = json.loads((args.out / "mutation.json").read_text())
        meta = {k: saved[k] for k in META_KEYS if k in saved}
        write_report(
            [{k: v for k, v in r.items() if k != "explained"} for r in saved["results"]],
            meta,
            args.out,
            EQUIVALENT,
            MIN_PER_MODULE,
        )
        print(f"rewrote {args.out / 'mutation.md'}")
        return 0
    population = all_mutants()
    ids = {m.id for m in population}
    if len(ids) != len(population):
        raise SystemExit("error: two mutants share an id")
    stale = sorted(set(EQUIVALENT) - ids)
    if stale:  # an id names its module's line and place: an edit there makes a new mutant
        print(
            f"warning: EQUIVALENT explains mutants that no longer exist (their code changed): "
            f"{stale}; delete them, and explain the new survivors after --rerun-survivors",
            file=sys.stderr,
        )
    saved = None
    if args.rerun_survivors:
        saved = json.loads((args.out / "mutation.json").read_text())
        args.only = [r["id"] for r in saved["results"] if r["status"] == "survived"]
        if not args.only:
            print("no survivors to rerun")
            return 0
    if args.only:
        unknown = set(args.only) - ids
        if unknown:
            raise SystemExit(f"error: no mutants {sorted(unknown)}; see --list")
        chosen = [m for m in population if m.id in args.only]
    elif args.sample and args.sample < len(population):
        chosen = stratified_sample(population, args.sample, args.seed)
    else:
        chosen = population
    if args.list:
        for m in chosen:
            print(f"{m.id} {m.module}:{m.line} {m.operator}: {m.before} -> {m.after}")
        print(f"{len(chosen)} of {len(population)} mutants", file=sys.stderr)
        return 0

    start = time.time()
    results = []
    preload()
    with tempfile.TemporaryDirectory(prefix="bso-mutate-") as tmp:
        tree = Path(tmp) / "tree"
        copy_tree(tree)
        golden = golden_tests(tree)
        # the unmutated tree passes every test file that will run (one run: the timeout's scale)
        files = sorted({f for m in chosen for f in tests_for(m.module)[0]})
        marks = {tests_for(m.module)[1] for m in chosen}
        mark = PYTEST_MARK if marks == {PYTEST_MARK} else "not slow"
        if all(m.module in NO_GOLDEN for m in chosen):
            golden = []
        baseline = 300.0
        if not args.no_baseline:
            status, baseline, tail = run_tests(tree, files + golden, mark, timeout=3600)
            if status != "passed":
                raise SystemExit(f"error: the unmutated tree fails {files} or {GOLDEN}: {tail}")
            print(f"baseline (every test file, unmutated): {baseline:.0f} s, {tail}", flush=True)
        for i, m in enumerate(chosen, 1):
            path = tree / m.module
            original = path.read_text()
            path.write_text(mutated_source(m))
            tests, mark = tests_for(m.module)
            try:
                status, seconds, tail = run_tests(
                    tree,
                    tests + ([] if m.module in NO_GOLDEN else golden),
                    mark,
                    timeout=max(120.0, 2 * baseline),
                )
            finally:
                path.write_text(original)
            status = {"passed": "survived", "failed": "killed"}.get(status, status)
            results.append(
                dict(
                    id=m.id,
                    module=m.module,
                    line=m.line,
                    operator=m.operator,
                    before=m.before,
                    after=m.after,
                    status=status,
                    seconds=round(seconds, 1),
                )
            )
            print(
                f"[{i}/{len(chosen)}] {status:8} {seconds:5.0f} s  {m.id} {m.module}:{m.line} "
                f"{m.operator}: {m.before} -> {m.after}",
                flush=True,
            )
    meta = dict(
        machine=f"{cpu_name()}, {os.cpu_count()} cores",
        date=time.strftime("%Y-%m-%d", time.gmtime()),
        seed=args.seed,
        population=len(population),
        sampled=len(chosen),
        minutes=(time.time() - start) / 60,
        command=" ".join(["python", "scripts/mutate.py", *(argv or sys.argv[1:])]),
        tests_run="pytest -m 'not slow and not integration' <the module's test files> "
        f"{GOLDEN} (but its compiled and full-width replays; no golden for {', '.join(NO_GOLDEN)}; "
        f"integration tests too for {', '.join(INTEGRATION_TOO)})",
    )
    if saved is not None:  # the last run's results, its survivors' replaced by this rerun's
        rerun = {r["id"]: dict(r, rerun=True) for r in results}
        results = [rerun.get(r["id"], r) for r in saved["results"]]
        results = [{k: v for k, v in r.items() if k != "explained"} for r in results]
        meta = {k: saved[k] for k in META_KEYS if k in saved}
        meta["rerun"] = (
            f"its {len(rerun)} survivors rerun on {time.strftime('%Y-%m-%d', time.gmtime())} "
            f"after tests were added ({(time.time() - start) / 60:.0f} min)"
        )
        out = args.out
    elif args.only:  # a few mutants: a report beside, not over, the sample's
        out = Path(tempfile.mkdtemp(prefix="bso-mutate-only-"))
    else:
        out = args.out
    summary = write_report(results, meta, out, EQUIVALENT, MIN_PER_MODULE)
    print(
        f"{summary['killed']} of {summary['mutants']} mutants killed "
        f"({100 * summary['score']:.1f} %); report: {out / 'mutation.md'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
