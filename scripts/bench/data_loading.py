"""Data-loading throughput of the real loaders on synthetic files in the real on-disk formats
(CIFAR-10 pickles, CIFAR10-DVS event files): samples/s over one pass of the training loader.

    python scripts/bench/data_loading.py                     # 2 workers
    python scripts/bench/data_loading.py --workers 0 4 --out /tmp/loading

For DVS-CIFAR10 the one-time frame integration (spikingjelly's cache build) is timed separately.
Writes <out>.json and <out>.md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from _common import ROOT, dataset_config, write_results

from bso.data import build_dataloaders
from bso.data.synthetic import write_cifar, write_cifar10_dvs


def one_pass(loader) -> tuple[int, float]:
    start, n = time.perf_counter(), 0
    for x, _ in loader:
        n += len(x)
    return n, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--workers", type=int, nargs="+", default=[2])
    parser.add_argument(
        "--cifar-per-file", type=int, default=1000, help="5 train files of this size"
    )
    parser.add_argument("--dvs-per-class", type=int, default=30)
    parser.add_argument("--dvs-events", type=int, default=100_000, help="events per DVS sample")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/data_loading")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_cifar(tmp / "cifar", "cifar10", per_file=args.cifar_per_file)
        write_cifar10_dvs(tmp / "dvs", per_class=args.dvs_per_class, events=args.dvs_events)
        start = time.perf_counter()
        build_dataloaders(
            dataset_config(
                "dvs_cifar10",
                root=tmp / "dvs",
                num_workers=0,
                frames=10,
                train_per_class=int(args.dvs_per_class * 0.9),
                mean=0.0,
                std=1.0,
            )
        )
        cache_s = time.perf_counter() - start
        for workers in args.workers:
            for name, cfg in (
                (
                    "cifar10",
                    dataset_config(
                        "cifar10", root=tmp / "cifar", num_workers=workers, pin_memory=False
                    ),
                ),
                (
                    "dvs_cifar10",
                    dataset_config(
                        "dvs_cifar10",
                        root=tmp / "dvs",
                        num_workers=workers,
                        frames=10,
                        train_per_class=int(args.dvs_per_class * 0.9),
                        mean=0.0,
                        std=1.0,
                        pin_memory=False,
                    ),
                ),
            ):
                train, _ = build_dataloaders(cfg)
                one_pass(train)  # start the workers, warm the page cache
                n, seconds = one_pass(train)
                row = {
                    "dataset": name,
                    "workers": workers,
                    "batch": cfg.batch_size,
                    "samples": n,
                    "samples_per_s": n / seconds,
                }
                if name == "dvs_cifar10":
                    row["frame_cache_build_s"] = cache_s
                rows.append(row)
                print(json.dumps(row), flush=True)
    lines = ["| dataset | workers | batch | samples/s |", "|---|---|---|---|"]
    lines += [
        f"| {r['dataset']} | {r['workers']} | {r['batch']} | {r['samples_per_s']:.0f} |"
        for r in rows
    ]
    write_results(args.out, {"device": "cpu", "workers": args.workers}, rows, lines)


if __name__ == "__main__":
    main()
