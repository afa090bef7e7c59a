"""The software environment of a result, and what this machine can do with bso.

:func:`describe` is what every run directory records as ``environment.json``: every installed
distribution and its version, the lock file's hash and whether this environment matches it, the git
commit and dirty state, Python, torch's CUDA / cuDNN build and the devices, thread counts.

``python -m bso.env`` (or ``bso-env``) prints it as one screen, with what follows from it: whether
``backend=fused`` and ``fast.compile`` can run here, spikingjelly's CUDA backends, the wandb
mode and which private torch / spikingjelly APIs are present (:mod:`bso.compat`) -- the first thing
to paste into a bug report. ``--json`` prints the whole record instead.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
LOCK_NAME = "requirements.lock"


def canonical(name: str) -> str:
    """A distribution's name as pip compares it (PEP 503): ``Hydra_Core`` -> ``hydra-core``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def distributions() -> dict[str, str]:
    """Every installed distribution: {canonical name: version}, sorted by name."""
    found = {canonical(d.metadata["Name"]): d.version for d in metadata.distributions()}
    return dict(sorted(found.items()))


def read_lock(path: Path) -> dict[str, str]:
    """The exact versions a lock file pins: {canonical name: version} of its ``name==version`` lines."""
    pins = {}
    for line in path.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)", line.strip())
        if match:
            pins[canonical(match[1])] = match[2]
    return pins


def lock_state(installed: dict[str, str], path: Path | None = None) -> dict:
    """The lock file (``requirements.lock`` of the checkout bso runs from): its sha256 and whether
    ``installed`` matches it -- every pinned distribution installed at its pinned version; others
    may be installed beside them. ``path`` None and no checkout (bso installed from a wheel):
    ``{"path": None}``."""
    path = path or ROOT / LOCK_NAME
    if not path.is_file():
        return {"path": None, "sha256": None, "matches": None, "differences": {}}
    differences = {
        name: {"locked": version, "installed": installed.get(name)}
        for name, version in read_lock(path).items()
        if installed.get(name) != version
    }
    return {
        "path": str(path),
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "matches": not differences,
        "differences": differences,
    }


def git_state(path: Path = ROOT) -> dict:
    """The commit bso's checkout is at and whether tracked files differ from it (None: not a git
    checkout, or no git)."""

    def git(*args):
        try:
            out = subprocess.run(
                ["git", "-C", str(path), *args], capture_output=True, text=True, timeout=30
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def torch_build() -> dict:
    """torch's version and CUDA / cuDNN build, the CUDA devices and driver (None where absent)."""
    cuda = torch.cuda.is_available()
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "torch": torch.__version__,
        "cuda_build": torch.version.cuda,
        "cudnn": cudnn,
        "cuda_available": cuda,
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if cuda
        else [],
        "driver": nvidia_driver() if cuda else None,
    }


def nvidia_driver() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
    try:
        out = subprocess.run(query, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout else None


def threads() -> dict:
    """How many threads torch uses, the cores this process may use, and the variables that set them."""
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    variables = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY")
    return {
        "torch_intra_op": torch.get_num_threads(),
        "torch_inter_op": torch.get_num_interop_threads(),
        "cpu_count": os.cpu_count(),
        "usable_cores": len(affinity) if affinity is not None else None,
        **{name: os.environ.get(name) for name in variables},
    }


def describe() -> dict:
    """The whole environment, as a run directory records it (``environment.json``)."""
    installed = distributions()
    return {
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "executable": sys.executable,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "git": git_state(),
        "lock": lock_state(installed),
        "torch_build": torch_build(),
        "threads": threads(),
        "distributions": installed,
    }


def environment_changes(before: dict, after: dict) -> list[str]:
    """What differs between two :func:`describe` records: distributions (``torch 2.14.1 ->
    2.15.0``), the git commit, the lock file, torch's CUDA build."""
    changes = []
    old, new = before.get("distributions", {}), after.get("distributions", {})
    for name in sorted(set(old) | set(new)):
        if old.get(name) != new.get(name):
            changes.append(f"{name} {old.get(name, 'absent')} -> {new.get(name, 'absent')}")
    for key, field in (("git", "commit"), ("git", "dirty"), ("lock", "sha256")):
        a, b = before.get(key, {}).get(field), after.get(key, {}).get(field)
        if a != b:
            changes.append(f"{key} {field} {a} -> {b}")
    for field in ("cuda_build", "cudnn", "devices"):
        a, b = before.get("torch_build", {}).get(field), after.get("torch_build", {}).get(field)
        if a != b:
            changes.append(f"{field} {a} -> {b}")
    return changes


def capabilities(env: dict) -> list[tuple[str, str]]:
    """(what, whether this machine has it and what follows), for the screen."""
    from bso import compat
    from bso.compiled import cpp_compiler

    build = env["torch_build"]
    cuda = build["cuda_available"]
    compiler = cpp_compiler()
    has_compiler = shutil.which(compiler) is not None
    triton = importlib.util.find_spec("triton") is not None
    rows = [
        ("C++ compiler", f"{compiler}: {'found' if has_compiler else 'not on PATH (set CXX)'}"),
        ("Triton", "installed" if triton else "not installed"),
        (
            "backend=fused",
            _yes(has_compiler or (cuda and triton), "CPU" if has_compiler else None)
            + (" + CUDA" if cuda and triton else ""),
        ),
        ("fast.compile", _yes(cuda and triton, "CUDA") if cuda else "no (CUDA only)"),
        ("spikingjelly CUDA kernels", _spikingjelly_cuda(cuda, triton)),
        ("wandb", _wandb_mode(env["distributions"])),
    ]
    missing = [path for path, found in compat.available().items() if not found]
    rows.append(
        (
            "private APIs",
            f"missing: {', '.join(missing)} (public paths instead: bso/compat.py)"
            if missing
            else f"all {len(compat.PRIVATE_APIS)} present (bso/compat.py)",
        )
    )
    return rows


def _yes(ok: bool, where: str | None) -> str:
    return f"yes ({where})" if ok and where else ("yes" if ok else "no")


def _spikingjelly_cuda(cuda: bool, triton: bool) -> str:
    from bso import compat

    if not cuda:
        return "no CUDA device (bso's CPU path runs spikingjelly's torch operations)"
    native = "native kernels built" if compat.spikingjelly_native_cuda() else "no native kernels"
    return f"{native}; Triton kernels {'available' if triton else 'unavailable'}"


def _wandb_mode(installed: dict[str, str]) -> str:
    if "wandb" not in installed:
        return "not installed (logger=none)"
    mode = os.environ.get("WANDB_MODE")
    return f"{installed['wandb']}, " + (
        f"WANDB_MODE={mode}" if mode else "offline unless logger.mode=online (configs/logger)"
    )


KEY_PACKAGES = ("torchvision", "spikingjelly", "hydra-core", "omegaconf")


def render(env: dict) -> str:
    """One screen: versions, devices, threads, the lock, what bso can do here."""
    build, lock, git, th = env["torch_build"], env["lock"], env["git"], env["threads"]
    packages = env["distributions"]
    if lock["path"] is None:
        lock_text = "no requirements.lock (bso installed from a wheel)"
    elif lock["matches"]:
        lock_text = f"matches requirements.lock (sha256 {lock['sha256'][:12]})"
    else:
        diff = ", ".join(
            f"{n} {d['installed'] or 'missing'} (locked {d['locked']})"
            for n, d in list(lock["differences"].items())[:5]
        )
        more = len(lock["differences"]) - 5
        lock_text = f"differs from requirements.lock: {diff}" + (
            f" +{more} more" if more > 0 else ""
        )
    commit = git["commit"][:12] if git["commit"] else "not a git checkout"
    rows = [
        ("Python", f"{env['python']} ({env['implementation']}) on {env['platform']}"),
        ("bso", f"{packages.get('bso', '?')}, git {commit}" + (" (dirty)" if git["dirty"] else "")),
        *((name, packages.get(name, "not installed")) for name in KEY_PACKAGES),
        ("torch", f"{build['torch']}, CUDA build {build['cuda_build']}, cuDNN {build['cudnn']}"),
        (
            "CUDA devices",
            ", ".join(build["devices"]) + f" (driver {build['driver']})"
            if build["devices"]
            else "none",
        ),
        (
            "threads",
            f"torch {th['torch_intra_op']} intra-op / {th['torch_inter_op']} inter-op; "
            f"{th['usable_cores']} of {th['cpu_count']} cores usable; "
            f"OMP_NUM_THREADS={th['OMP_NUM_THREADS']}",
        ),
        ("environment", f"{len(packages)} distributions; {lock_text}"),
        *capabilities(env),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bso-env", description=__doc__.split("\n\n")[1])
    parser.add_argument("--json", action="store_true", help="print the whole record as JSON")
    args = parser.parse_args(argv)
    env = describe()
    print(json.dumps(env, indent=2) if args.json else render(env))


if __name__ == "__main__":
    main()
