"""Run an NIR file in one third-party simulator, with that simulator's documented import call, and
write its predictions: the helper of scripts/check_nir.py, run with the consumer's own Python (Sinabs
lives in its own environment). Imports neither bso nor anything but the consumer, nir and torch.

    python scripts/nir_consumer.py snntorch model.nir inputs.npy T out.json [--dt 1e-4]

``inputs.npy``: the images, (N, C, H, W) float32; every image is fed at each of the T steps (direct
encoding) and the prediction is the argmax of the output summed over the steps. ``out.json``:
``{"imported": true|false, "error": ..., "predictions": [...], "versions": {...}}``; exit 0 either
way (an import that fails is a result), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import nir
import numpy as np
import torch

CONSUMERS = ("snntorch", "norse", "sinabs", "spikingjelly")
BATCH = 120


def versions(consumer: str) -> dict:
    found = {}
    for package in (consumer, "nir", "nirtorch", "torch"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


def stepwise(net, reset=None):
    """A function running ``net`` (a per-step module with the nirtorch calling convention,
    ``out, state = net(x, state)``) for T steps on the same input: the summed output."""

    def run(x, T):
        if reset is not None:
            reset(net)
        state, total = None, 0.0
        for _ in range(T):
            out, state = net(x) if state is None else net(x, state)
            total = total + out
        return total

    return run


def load(consumer: str, path: str, dt: float, batch: int):
    """A function running the imported network on a batch for T steps -> the summed output."""
    graph = nir.read(path)
    if consumer == "snntorch":  # snnTorch's documented call; its time step is fixed (1e-4 s)
        import snntorch.utils
        from snntorch.import_nir import import_from_nir

        return stepwise(import_from_nir(graph), reset=snntorch.utils.reset)
    if consumer == "norse":
        import norse.torch

        return stepwise(norse.torch.from_nir(graph, dt=dt))
    if consumer == "spikingjelly":
        from spikingjelly.activation_based.nir_exchange import import_from_nir

        return stepwise(import_from_nir(graph, dt=dt))
    if consumer == "sinabs":
        import sinabs

        net = sinabs.from_nir(graph, batch_size=batch)

        def run(x, T):  # Sinabs' squeeze layers take (batch x time, ...) with time inner
            sinabs.reset_states(net)
            frames = x.unsqueeze(1).expand(-1, T, *x.shape[1:]).reshape(-1, *x.shape[1:])
            out = net(frames)
            out = out[0] if isinstance(out, tuple) else out
            return out.reshape(x.shape[0], T, -1).sum(1)

        return run
    raise ValueError(consumer)


@torch.no_grad()
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("consumer", choices=CONSUMERS)
    parser.add_argument("nir_file")
    parser.add_argument("inputs", help="images as a .npy array (N, C, H, W)")
    parser.add_argument("T", type=int)
    parser.add_argument("out", help="the JSON file to write")
    parser.add_argument("--dt", type=float, default=1e-4, help="seconds per step (default 1e-4)")
    args = parser.parse_args(argv)
    images = torch.from_numpy(np.load(args.inputs)).float()
    result = {"consumer": args.consumer, "versions": versions(args.consumer), "imported": False}
    try:
        run = load(args.consumer, args.nir_file, args.dt, BATCH)
        result["imported"] = True
        graph = nir.read(args.nir_file)
        expected = [
            int(np.prod(n.output_type["output"]))
            for n in graph.nodes.values()
            if isinstance(n, nir.Output)
        ]
        predictions = []
        for start in range(0, len(images), BATCH):
            x = images[start : start + BATCH]
            if len(x) < BATCH and args.consumer == "sinabs":  # a fixed batch size: pad the last
                x = torch.cat([x, x.new_zeros(BATCH - len(x), *x.shape[1:])])
            summed = run(x, args.T).reshape(len(x), -1)
            if summed.shape[1] not in expected:  # the consumer returned another node's output
                result["error"] = (
                    f"returned {summed.shape[1]} values per sample, not the graph's output "
                    f"({expected[0]})"
                )
            predictions += summed.argmax(-1)[: len(images) - start].tolist()
        result["predictions"] = predictions
    except Exception as err:  # an import or a run that fails is the finding; its first line
        frame = traceback.extract_tb(err.__traceback__)[-1]
        where = f"{'/'.join(Path(frame.filename).parts[-2:])}:{frame.lineno} `{frame.line}`"
        result["error"] = f"{type(err).__name__}: {err}".splitlines()[0][:200] + f" at {where}"
        result["traceback"] = traceback.format_exc()[-2000:]
    with open(args.out, "w") as f:
        json.dump(result, f)
    return result


if __name__ == "__main__":
    outcome = main()
    print(f"{outcome['consumer']}: imported={outcome['imported']} {outcome.get('error', '')}")
    sys.exit(0)
