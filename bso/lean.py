"""The lean mode (``engine.lean``): train BSO / T-BSO online with only what the algorithm needs,
and the same flips, bit for bit, as the plain mode.

* 1-bit weights while training: every stored +-1 weight is held as packed bits (8 per byte, a uint8
  parameter without gradient) and unpacked per layer when used (:meth:`SynapticConv2d.pack_weight_`).
* No stored gradients: the binary optimizer's flip rule runs inside backward, as soon as a layer's
  weight gradient exists and after that layer computed its input gradient with the old weights;
  the gradient is then freed (:meth:`bso.optim.BinaryOptimizer.fused_update_`). Full-precision
  parameters keep their ``.grad`` and are stepped after backward, as in the plain mode.
* Smaller activations: in each conv block, BatchNorm + LIF (+ the block's average pool) run as one
  autograd step that saves the BatchNorm input and the spikes as bits, rebuilds the LIF charge from
  the neuron's state in backward and runs the pool's backward from the spikes' shape alone
  (:func:`bso.neurons.batchnorm_lif_step`; exact for V_th = 1, else not fused). The first conv's
  output is recomputed in backward from the image instead of saved, and with
  ``recompute_binary_convs`` every binary conv's output from its input spikes
  (:func:`bso.models.parts.conv_batchnorm_lif_step`).

Per-step updates only: an accumulated update needs the T gradients summed, so it keeps them.

``engine.lean``: ``auto`` (default) packs when it applies -- an online engine with
``update=per_step`` and a model with stored +-1 weights -- and logs why it does not otherwise;
``true`` requires it (a clear error where it cannot apply); ``false`` is the plain mode.
"""

from __future__ import annotations

import logging

from torch import nn

from bso.layers import SYNAPTIC_LAYERS
from bso.models.parts import SpikingConvBlock, can_recompute_conv
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


def apply_lean(model: nn.Module, lean, update: str, recompute_binary_convs: bool = False) -> bool:
    """Put ``model`` in the lean mode if ``lean`` asks for it and it applies; returns whether it is on.
    Call before the optimizer is built (it replaces the binary weights by packed ones).
    ``recompute_binary_convs`` (lean mode only) also recomputes the binary convs' outputs in backward
    from their input spikes, where the model says what its blocks' inputs are (bso.models.vgg)."""
    lean = parse_lean(lean)
    layers = packable_layers(model)
    if any(m.is_packed for m in layers):
        lean = True  # already packed (prepared before): only the lean mode can train it
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
    if reason is None and lean is False:
        reason = "engine.lean=false"
    if reason is not None and recompute_binary_convs:
        raise ValueError(
            "engine.recompute_binary_convs=true recomputes the binary convs' outputs in the lean "
            f"mode, which is off here: {reason}. Set engine.recompute_binary_convs=false."
        )
    if lean is False:
        return False
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
    blocks = [
        m for m in model.modules() if isinstance(m, SpikingConvBlock) and isinstance(m.gate, nn.Identity)
    ]
    for block in blocks:  # BatchNorm + LIF (+ pool, + conv) in one step that saves less for backward
        block.fuse_batchnorm_lif = can_fuse_batchnorm_lif(block.bn, block.neuron)
        block.recompute_conv = can_recompute_conv(block, recompute_binary_convs)
    fused = sum(b.fuse_batchnorm_lif for b in blocks)
    recomputed = sum(b.recompute_conv for b in blocks)
    if recompute_binary_convs and not any(b.conv.is_packed and b.recompute_conv for b in blocks):
        raise ValueError(
            f"engine.recompute_binary_convs=true, but {type(model).__name__} has no binary conv "
            "block whose input is known to be spikes (SpikingVGG's are); set it to false"
        )
    log.info(
        f"engine.lean: {len(layers)} binary layers hold packed 1-bit weights; BSO/T-BSO flips them "
        f"inside backward (no stored binary-weight gradients); {fused} BatchNorm+LIF(+pool) steps "
        f"fused, {recomputed} of them recompute their conv's output in backward"
    )
    return True
