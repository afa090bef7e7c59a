"""Export a trained bso network to an NIR graph file (Neuromorphic Intermediate Representation).

    python scripts/export_nir.py outputs/<run dir> model.nir            # best_1bit.pt, else best.pt, ...
    python scripts/export_nir.py outputs/<run dir>/last_1bit.pt model.nir --check 64

The graph holds Conv2d and LIF nodes only (BatchNorm, average pools and the global pool folded
into the convs), so snnTorch, Norse and spikingjelly read it as written; bso's LIF maps to NIR's LIF
with tau = tau_steps x dt, r = 1, v_threshold = V_th / tau_steps (dt = 1e-4 s per time step by
default, in the graph's metadata). A model trained with model.neuron.v_reset=<number> is NIR's
neuron exactly; the paper's soft reset (v_reset=null) is not NIR's, and the LIF nodes say so in their
metadata (docs/metrics.md). --check N runs N test-set samples through bso and through the exported
file (spikingjelly's NIR importer) and prints how far apart they are, with either reset;
scripts/check_nir.py runs the file in snnTorch, Norse and Sinabs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from bso.data import input_shape
from bso.export import load_trained, to_nir
from bso.export.nir import DT
from bso.export.nir_compare import compare


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "checkpoint", type=Path, help="a run directory, last.pt / best.pt or *_1bit.pt"
    )
    parser.add_argument("out", type=Path, help="the NIR file to write (HDF5, e.g. model.nir)")
    parser.add_argument(
        "--input-shape",
        type=int,
        nargs=3,
        metavar=("C", "H", "W"),
        help="one sample's shape (default: the run's dataset: its in_channels and image size)",
    )
    parser.add_argument("--dt", type=float, default=DT, help="seconds per time step (default 1e-4)")
    parser.add_argument(
        "--binary-weights",
        action="store_true",
        help="keep the binary convs' weights +-1: BatchNorm's scale goes into per-channel "
        "thresholds (not readable by spikingjelly's importer, so no --check)",
    )
    parser.add_argument(
        "--check",
        type=int,
        default=0,
        metavar="N",
        help="compare bso and the exported graph on N test-set samples (reads the run's dataset)",
    )
    args = parser.parse_args(argv)
    if args.check and args.binary_weights:
        parser.error(
            "--check re-imports with spikingjelly's importer, which takes one threshold "
            "per layer; check the export without --binary-weights"
        )
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        model, cfg, file = load_trained(args.checkpoint)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"export_nir.py: {err}") from err
    shape = args.input_shape or input_shape(cfg.get("dataset") or {})
    if shape is None:
        raise SystemExit(
            f"export_nir.py: {file} does not record the input shape; pass --input-shape C H W"
        )
    T = (cfg.get("engine") or {}).get("T")
    try:
        graph = to_nir(model, shape, args.out, T=T, dt=args.dt, binary_weights=args.binary_weights)
    except ValueError as err:  # NIRExportError names the layer
        raise SystemExit(f"export_nir.py: {file}: {err}") from err
    print(f"wrote {args.out}: {len(graph.nodes)} nodes from {file} (input {tuple(shape)}, T={T})")
    report = {"nodes": len(graph.nodes)}
    if args.check:
        from bso.data import build_dataloaders
        from bso.engine.common import input_at

        if T is None:
            raise SystemExit("export_nir.py --check: the checkpoint does not record engine.T")
        _, test_loader = build_dataloaders(cfg.dataset, seed=cfg.get("seed", 0))
        xs = []
        for x, _ in test_loader:
            xs.append(input_at(x, 0) if x.dim() == 5 else x)
            if sum(len(b) for b in xs) >= args.check:
                break
        x = torch.cat(xs)[: args.check]
        report["check"] = compare(model, args.out, x, int(T))
        print(json.dumps(report["check"], indent=2))
    return report


if __name__ == "__main__":
    main()
