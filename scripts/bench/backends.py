"""The cost of the released code's floating-point order (docs/parity.md): training time per batch of
the paper's T-BSO VGG-11 (experiment=cifar10_tbso) with ``backend=release`` against
``backend=fast``, interleaved batch by batch so that a shared machine's load falls on both alike.

    python scripts/bench/backends.py                      # CPU, batch 16, T=4, plain and lean
    python scripts/bench/backends.py --batch 128 --device cuda

Prints the median seconds per batch of each order and the ratio release / fast.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from _common import build_method, timed_batch

from bso.models import VGG11


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--T", type=int, default=4)
    parser.add_argument("--batches", type=int, default=6, help="timed batches per order")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (args.batch,), generator=g).to(device)
    for lean in (False, True):
        runs = {
            order: build_method("tbso", args.T, VGG11, device, lean=lean, backend=order)
            for order in ("release", "fast")
        }
        seconds = {order: [] for order in runs}
        for i in range(args.batches + 1):  # the first batch of each warms up, untimed
            for order, (model, engine, optimizer) in runs.items():
                elapsed = timed_batch(engine, model, optimizer, x, y, device)
                if i:
                    seconds[order].append(elapsed)
        median = {order: statistics.median(s) for order, s in seconds.items()}
        print(
            f"{'lean' if lean else 'plain'}: release {median['release']:.3f} s/batch, fast "
            f"{median['fast']:.3f} s/batch, ratio release/fast {median['release'] / median['fast']:.3f} "
            f"(batch {args.batch}, T={args.T}, {args.device}, {args.batches} batches each, interleaved)"
        )


if __name__ == "__main__":
    main()
