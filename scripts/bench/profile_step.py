"""torch.profiler table of one online training iteration (default: VGG-11, T-BSO, lean, batch 16,
T=4): which operators take the time besides the convolutions.

    python scripts/bench/profile_step.py                       # lean
    python scripts/bench/profile_step.py --mode plain --batch 16 --T 4 --rows 30

Prints the operators sorted by self time (CPU, or CUDA on a GPU) after one warm-up iteration.
"""

from __future__ import annotations

import argparse

import torch
from _common import build_method, resolve_device
from torch.profiler import ProfilerActivity, profile

from bso.models import VGG11


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--method", default="tbso", choices=["tbso", "bso", "bptt_latent"])
    parser.add_argument("--mode", default="lean", choices=["lean", "plain"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--T", type=int, default=4)
    parser.add_argument("--layers", default=VGG11)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    model, engine, opt = build_method(args.method, args.T, args.layers, device, args.mode == "lean")
    engine.train_batch(model, opt, x, y)  # warm-up
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        engine.train_batch(model, opt, x, y)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=args.rows))


if __name__ == "__main__":
    main()
