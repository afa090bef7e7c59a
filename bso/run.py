"""The run directory: everything needed to trust and repeat a run.

config.yaml      the resolved config            run_info.json  git commit, package versions, device
metrics.jsonl    one JSON record per epoch      checkpoint.pt  weights (binary ones as +-1) + optimizer
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from bso.distributed import run_dir_for_rank

# torchrun: Hydra's run directory of ranks > 0 goes to the temp dir (configs/hydra/default.yaml)
if not OmegaConf.has_resolver("bso_rank_dir"):
    OmegaConf.register_new_resolver("bso_rank_dir", run_dir_for_rank)

PACKAGES = (
    "bso",
    "torch",
    "torchvision",
    "spikingjelly",
    "hydra-core",
    "omegaconf",
    "wandb",
    "numpy",
    "scikit-learn",
    "tqdm",
)


def git_commit(path: Path) -> dict:
    def git(*args):
        out = subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True)
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def package_versions() -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def write_run_info(run_dir: Path, cfg: DictConfig, device: torch.device, extra: dict) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    info = {
        "command": sys.argv,
        "git": git_commit(Path(__file__).resolve().parent),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": package_versions(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor(),
        **extra,
    }
    (run_dir / "run_info.json").write_text(json.dumps(info, indent=2))


class MetricsFile:
    """Appends one JSON line per record to ``<run_dir>/metrics.jsonl``."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "metrics.jsonl"

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
