"""bso: binary spiking neural networks trained online with BSO / T-BSO (ICML 2025).

The library API (docs/library.md, "Use BSO / T-BSO in your own code"):

* :class:`BSO`, :class:`TBSO` -- the flip optimizers for stored +-1 weights (paper Eq. 11-14);
* :class:`CaseOptimizer` -- binary weights to BSO / T-BSO, everything else to SGD / Adam / ...;
* :func:`convert` -- make a plain PyTorch or spikingjelly model binary (+-1 conv/linear weights,
  LIF neurons that keep the presynaptic trace; ``backend=`` how their steps run, :mod:`bso.backend`);
  :func:`make_lean` -- the lean mode on it;
* :func:`online_step` -- one time step of online training (forward, loss, backward, flip).

The training framework (``bso-train`` / ``python train.py``, Hydra configs) lives in
:mod:`bso.train`, :mod:`bso.engine`, :mod:`bso.models`.
"""

from __future__ import annotations

from importlib import metadata
from typing import TYPE_CHECKING

try:
    __version__ = metadata.version("bso")
except metadata.PackageNotFoundError:  # a checkout on PYTHONPATH, not installed
    __version__ = "0+unknown"

__all__ = [
    "BSO",
    "TBSO",
    "CaseOptimizer",
    "StepOutput",
    "__version__",
    "binary_parameters",
    "convert",
    "make_lean",
    "online_step",
    "reset",
]

# imported on first use, so that `import bso.data` (say) does not load torch models and spikingjelly
_EXPORTS = {
    "BSO": "bso.optim.binary",
    "TBSO": "bso.optim.binary",
    "CaseOptimizer": "bso.optim.case",
    "convert": "bso.conversion",
    "make_lean": "bso.lean",
    "binary_parameters": "bso.conversion",
    "online_step": "bso.step",
    "StepOutput": "bso.step",
    "reset": "bso.step",
}

if TYPE_CHECKING:
    from bso.conversion import binary_parameters, convert
    from bso.lean import make_lean
    from bso.optim.binary import BSO, TBSO
    from bso.optim.case import CaseOptimizer
    from bso.step import StepOutput, online_step, reset


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'bso' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
