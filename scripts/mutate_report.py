"""The report of ``make mutate`` (scripts/mutate.py): mutation.json (every mutant's outcome) and
mutation.md (the score, the survivors and why)."""

from __future__ import annotations

import json
import platform
from pathlib import Path

META_KEYS = (
    "machine",
    "date",
    "seed",
    "population",
    "sampled",
    "minutes",
    "command",
    "tests_run",
    "rerun",
)


def cpu_name() -> str:
    """The CPU's model name (scripts/bench/_common.py has the same, but importing it imports bso,
    which this process must not: every forked test run imports bso from the mutated tree)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_report(
    results: list[dict], meta: dict, out: Path, explanations: dict[str, str], min_per_module: int
) -> dict:
    """mutation.json (every mutant's outcome) and mutation.md (the score, the survivors and why,
    from ``explanations``: id -> why it survives)."""
    killed = [r for r in results if r["status"] != "survived"]
    survived = [r for r in results if r["status"] == "survived"]
    explained = [r for r in survived if r["id"] in explanations]
    n = len(results)
    by_module = {}
    for r in results:
        m = by_module.setdefault(r["module"], {"mutants": 0, "killed": 0})
        m["mutants"] += 1
        m["killed"] += r["status"] != "survived"
    summary = dict(
        meta,
        mutants=n,
        killed=len(killed),
        timeouts=sum(r["status"] == "timeout" for r in results),
        survived=len(survived),
        survived_explained=len(explained),
        score=len(killed) / n if n else None,
        by_module=by_module,
        results=[dict(r, explained=explanations.get(r["id"])) for r in results],
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "mutation.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [
        "# Mutation score of the core",
        "",
        f"`make mutate` (`{meta['command']}`), {meta['machine']}, {meta['date']}: "
        f"{meta['sampled']} of the {meta['population']} mutants (a seeded sample, seed "
        f"{meta['seed']}, in proportion to each module's mutants, at least {min_per_module} each), "
        f"{meta['minutes']:.0f} min"
        + (f"; {meta['rerun']}" if meta.get("rerun") else "")
        + f". Each ran `{meta['tests_run']}` (-x); a failure, an error or a hang kills it.",
        "",
        f"**{len(killed)} of {n} killed: {100 * summary['score']:.1f} %.** "
        f"{len(survived)} survived, {len(explained)} of them explained below.",
        "",
        "| module | mutants | killed |",
        "|---|---|---|",
    ]
    for module, m in by_module.items():
        lines.append(f"| `{module}` | {m['mutants']} | {m['killed']} |")
    lines += ["", "## Survivors", ""]
    if not survived:
        lines.append("None.")
    for r in survived:
        why = explanations.get(r["id"], "**Not explained: a test should kill it.**")
        lines.append(
            f"- `{r['id']}` `{r['module']}:{r['line']}` {r['operator']}: "
            f"`{r['before']}` -> `{r['after']}`. {why}"
        )
    (out / "mutation.md").write_text("\n".join(lines) + "\n")
    return summary
