"""The lean mode (``engine.lean``): train BSO / T-BSO online with only what the algorithm needs,
and the same flips, bit for bit, as the plain mode.

* 1-bit weights while training: every stored +-1 weight is held as packed bits (8 per byte, a uint8
  parameter without gradient) and unpacked per layer when used (:meth:`SynapticConv2d.pack_weight_`).
* No stored gradients: the binary optimizer's flip rule runs inside backward, as soon as a layer's
  weight gradient exists and after that layer computed its input gradient with the old weights;
  the gradient is then freed (:meth:`bso.optim.BinaryOptimizer.fused_update_`). Full-precision
  parameters keep their ``.grad`` and are stepped after backward, as in the plain mode.
* Smaller activations: in each conv block, BatchNorm + LIF run as one autograd step that saves the
  BatchNorm input and the spikes (bool), and rebuilds the LIF charge from the neuron's state in
  backward (:func:`bso.neurons.batchnorm_lif_step`; exact for V_th = 1, else not fused).

Per-step updates only: an accumulated update needs the T gradients summed, so it keeps them.

``engine.lean``: ``auto`` (default) packs when it applies -- an online engine with
``update=per_step`` and a model with stored +-1 weights -- and logs why it does not otherwise;
``true`` requires it (a clear error where it cannot apply); ``false`` is the plain mode.
"""

from __future__ import annotations

import logging

from torch import nn

from bso.layers import SYNAPTIC_LAYERS
from bso.models.parts import SpikingConvBlock
from bso.neurons import can_fuse_batchnorm_lif

log = logging.getLogger(__name__)

LEAN_MODES = ("auto", True, False)


def parse_lean(value) -> str | bool:
    """'auto' | true | false (Hydra gives booleans; strings from the command line are accepted)."""
    if isinstance(value, str) and value.lower() in ("true", "false"):
        value = value.lower() == "true"
    if value not in LEAN_MODES:
        raise ValueError(f"unknown engine.lean={value!r}; choose auto, true or false")
    return value


def packable_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, SYNAPTIC_LAYERS) and m.is_binary]


def apply_lean(model: nn.Module, lean, update: str) -> bool:
    """Put ``model`` in the lean mode if ``lean`` asks for it and it applies; returns whether it is on.
    Call before the optimizer is built (it replaces the binary weights by packed ones)."""
    lean = parse_lean(lean)
    layers = packable_layers(model)
    if any(m.is_packed for m in layers):
        lean = True  # already packed (prepared before): only the lean mode can train it
    if lean is False:
        return False
    reason = None
    if update != "per_step":
        reason = (
            f"engine.update={update} sums the T gradients before one update, so the gradients "
            "must be stored"
        )
    elif not layers:
        reason = f"{type(model).__name__} has no stored +-1 weights (model.weights=binary)"
    elif any(m.weight_standardization for m in layers):
        reason = "weight standardisation needs the float weights"
    if reason is not None:
        if lean is True:
            raise ValueError(
                f"engine.lean=true packs the +-1 weights and flips them inside backward (BSO/T-BSO, "
                f"online, per-step updates), but {reason}. Use engine.lean=auto or false."
            )
        log.info(f"engine.lean=auto: plain mode (float weights and stored gradients): {reason}")
        return False
    for layer in layers:
        layer.pack_weight_()
    fused = 0
    for block in model.modules():  # BatchNorm + LIF in one step that saves less for backward
        if isinstance(block, SpikingConvBlock) and isinstance(block.gate, nn.Identity):
            block.fuse_batchnorm_lif = can_fuse_batchnorm_lif(block.bn, block.neuron)
            fused += block.fuse_batchnorm_lif
    log.info(
        f"engine.lean: {len(layers)} binary layers hold packed 1-bit weights; BSO/T-BSO flips them "
        f"inside backward (no stored binary-weight gradients); {fused} BatchNorm+LIF steps fused"
    )
    return True
