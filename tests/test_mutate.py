"""`make mutate` (scripts/mutate.py) without running a mutant: the operators on a hand-built
function, what is never mutated, a mutant that computes something else, the seeded sample, the
test files each module maps to, and the report's score and survivors."""

from __future__ import annotations

import ast
import json

import mutants  # scripts/ is on the tests' path (pyproject: pythonpath)
import mutate
import mutate_report
import pytest

SOURCE = '''
def f(a, b, items):
    """a docstring: never mutated"""
    if not items:
        raise ValueError(f"no items for {a + 1}")
    n = 0
    n += 3
    record(a, b)
    return min(a, b) if a < b and b else a * 2.5
'''


def _mutations(source: str) -> set[tuple[str, str, str]]:
    tree = ast.parse(source)
    return {
        (operator, ast.unparse(node).splitlines()[0], ast.unparse(new))
        for _, node, options in mutants.mutation_points(tree)
        for operator, new in options
    }


def test_the_operators_on_a_hand_built_function():
    assert _mutations(SOURCE) == {
        ("negation dropped", "not items", "items"),
        ("constant", "0", "1"),
        ("constant", "3", "4"),
        ("arithmetic", "n += 3", "n -= 3"),
        ("statement dropped", "n += 3", "pass"),
        ("arguments swapped", "record(a, b)", "record(b, a)"),
        ("statement dropped", "record(a, b)", "pass"),
        ("arguments swapped", "min(a, b)", "min(b, a)"),
        ("min/max", "min", "max"),
        ("boolean", "a < b and b", "a < b or b"),
        ("comparison", "a < b", "a <= b"),
        ("arithmetic", "a * 2.5", "a / 2.5"),
        ("constant", "2.5", "5.0"),
    }


def test_docstrings_error_messages_and_annotations_are_not_mutated():
    source = (
        'def g(x: int = 1) -> float:\n    """doc"""\n'
        '    raise RuntimeError(f"{x + 1}" + "2")\n'
        'if __name__ == "__main__":\n    g(1 + 2)\n'
    )
    assert _mutations(source) == {("constant", "1", "2")}  # the default value only


def test_a_mutant_computes_something_else():
    tree = ast.parse("def add(a, b):\n    return a + b\n")
    ((_, node, options),) = mutants.mutation_points(tree)
    mutant = mutants.Replace(id(node), options[0][1]).visit(tree)
    scope: dict = {}
    exec(compile(ast.fix_missing_locations(mutant), "<mutant>", "exec"), scope)
    assert scope["add"](5, 3) == 2


def test_the_sample_is_seeded_and_reaches_every_module():
    population = mutate.all_mutants()
    assert len({m.id for m in population}) == len(population)
    sample = mutate.stratified_sample(population, 75, seed=0)
    assert [m.id for m in sample] == [m.id for m in mutate.stratified_sample(population, 75, 0)]
    assert {m.id for m in sample} != {m.id for m in mutate.stratified_sample(population, 75, 1)}
    for module in mutate.MODULES:
        mine = sum(m.module == module for m in population)
        assert sum(m.module == module for m in sample) >= min(mine, mutate.MIN_PER_MODULE), module
    first = sample[0]  # a sampled mutant's source parses and differs from its module's
    source = mutate.mutated_source(first)
    assert source != ast.unparse(ast.parse((mutate.ROOT / first.module).read_text()))


def test_every_module_maps_to_test_files_that_exist():
    for module in mutate.MODULES:
        files, mark = mutate.tests_for(module)
        assert files and all((mutate.ROOT / f).is_file() for f in files), module
        assert "not slow" in mark
    assert (mutate.ROOT / mutate.GOLDEN).is_file()


def test_the_report_scores_and_marks_unexplained_survivors(tmp_path):
    explanations = {"aaaa0001": "Equivalent: the same sum."}
    common = dict(module="bso/x.py", line=3, operator="arithmetic", before="a+b", after="a-b")
    results = [
        dict(common, id="aaaa0001", status="survived", seconds=1.0),
        dict(common, id="aaaa0002", status="survived", seconds=1.0),
        dict(common, id="aaaa0003", status="killed", seconds=1.0),
        dict(common, id="aaaa0004", status="timeout", seconds=9.0),
    ]
    meta = dict(machine="m", date="d", seed=0, population=9, sampled=4, minutes=1.0, command="c")
    summary = mutate_report.write_report(
        results, dict(meta, tests_run="t"), tmp_path, explanations, min_per_module=4
    )
    assert (summary["killed"], summary["survived"], summary["survived_explained"]) == (2, 2, 1)
    assert summary["score"] == 0.5
    md = (tmp_path / "mutation.md").read_text()
    assert "**2 of 4 killed: 50.0 %.**" in md
    assert "`aaaa0001` `bso/x.py:3` arithmetic: `a+b` -> `a-b`. Equivalent: the same sum." in md
    assert "`aaaa0002` `bso/x.py:3` arithmetic: `a+b` -> `a-b`. **Not explained" in md
    assert json.loads((tmp_path / "mutation.json").read_text())["timeouts"] == 1


def test_list_and_stale_explanations(capsys, monkeypatch):
    assert mutate.main(["--list", "--sample", "5"]) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) >= 5 and "mutants" in err and "warning" not in err
    monkeypatch.setitem(mutate.EQUIVALENT, "00000000", "a mutant whose code changed")
    assert mutate.main(["--list", "--sample", "5"]) == 0
    assert "no longer exist (their code changed): ['00000000']" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="no mutants"):
        mutate.main(["--only", "ffffffff"])
