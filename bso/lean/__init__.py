"""The lean mode (``engine.lean``): train BSO / T-BSO online with only what the algorithm needs,
and the same flips, bit for bit, as the plain mode. A layer around the core: :func:`apply` replaces
the model's binary layers and conv blocks by new modules of their lean classes (each built from the
old one, which it takes over, and set where the old one was), the way torch's quantization converts a
model; :func:`bso.optim.build_router` builds the binary optimizer of such a model as its in-backward
class. The core never imports this package.

* 1-bit weights while training (:mod:`bso.lean.layers`): every binary synaptic layer becomes a
  packed one, its +-1 weights held as bits (8 per byte, a uint8 parameter without gradient,
  :mod:`bso.bits`) and unpacked per layer when used.
* No stored gradients (:mod:`bso.lean.optim`): BSO / T-BSO's flip rule runs inside
  ``loss.backward()``, as soon as a layer's weight gradient exists and after that layer computed its
  input gradient with the old weights; the gradient is then freed. :func:`bso.optim.build_router`
  binds the packed layers to the binary optimizer it builds. Full-precision parameters keep their
  ``.grad`` and are stepped by ``optimizer.step(t)`` after backward, as in the plain mode.
* Smaller activations (:mod:`bso.lean.batchnorm_lif`, :mod:`bso.lean.blocks`): in each conv block,
  BatchNorm + LIF (+ the block's average pool) run as one autograd step that saves the BatchNorm
  input and the spikes as bits, rebuilds the LIF charge from the neuron's state in backward and runs
  the pool's backward from the spikes' shape alone (exact for V_th = 1, else not fused). The first
  conv's output is recomputed in backward from the image instead of saved, and with
  ``recompute_binary_convs`` every binary conv's output from its input spikes.

Per-step updates only: an accumulated update needs the T gradients summed, so it keeps them.

``engine.lean``: ``auto`` (default) packs when it applies -- an online engine with
``update=per_step`` and a model with stored +-1 weights -- and logs why it does not otherwise;
``true`` requires it (a clear error where it cannot apply); ``false`` is the plain mode. In your own
code: :func:`make_lean` (``bso.make_lean``).
"""

from __future__ import annotations

import logging

from torch import nn

from bso.conversion import ConvertedConv2d, ConvertedLinear
from bso.layers import SYNAPTIC_LAYERS, SynapticConv2d
from bso.lean.blocks import LeanSpikingConvBlock, can_fuse
from bso.lean.layers import PackedWeights
from bso.neurons import LIFNode
from bso.replace import replace_module

log = logging.getLogger(__name__)

LEAN_MODES = ("auto", True, False)


def parse(value) -> str | bool:
    """'auto' | true | false (Hydra gives booleans; strings from the command line are accepted)."""
    if isinstance(value, str) and value.lower() in ("true", "false"):
        value = value.lower() == "true"
    if value not in LEAN_MODES:
        raise ValueError(f"unknown engine.lean={value!r}; choose auto, true or false")
    return value


def packable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) of every synaptic layer with stored +-1 weights."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, SYNAPTIC_LAYERS) and m.is_binary
    ]


def apply(model: nn.Module, lean, update: str, recompute_binary_convs: bool = False) -> bool:
    """Put ``model`` in the lean mode if ``lean`` asks for it and it applies; returns whether it is on.
    ``recompute_binary_convs`` (lean mode only) also recomputes the binary convs' outputs in backward
    from their input spikes, where the model says what its blocks' inputs are (bso.models.vgg)."""
    lean = parse(lean)
    layers = packable_layers(model)
    if any(isinstance(m, PackedWeights) for _, m in layers):
        lean = True  # already packed (prepared before): only the lean mode can train it
    reason = None
    if update != "per_step":
        reason = (
            f"engine.update={update} sums the T gradients before one update, so the gradients "
            "must be stored"
        )
    elif not layers:
        reason = f"{type(model).__name__} has no stored +-1 weights (model.weights=binary)"
    elif any(m.weight_standardization for _, m in layers):
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
    if any(name == "" for name, _ in layers) or can_fuse(model):
        raise ValueError(
            f"the model is itself a {type(model).__name__}, which the lean mode replaces by a new "
            "module: wrap it in a container, e.g. nn.Sequential(model)"
        )
    for name, layer in layers:
        if not isinstance(layer, PackedWeights):
            replace_module(model, layer, PackedWeights.from_module(layer, name))
    # BatchNorm + LIF (+ pool, + conv) in one step that saves less for backward
    for block in [m for m in model.modules() if can_fuse(m)]:
        if not isinstance(block, LeanSpikingConvBlock):
            lean_block = LeanSpikingConvBlock.from_module(block, recompute_binary_convs)
            replace_module(model, block, lean_block)
    blocks = [m for m in model.modules() if isinstance(m, LeanSpikingConvBlock)]
    recomputed = sum(b.recompute_conv for b in blocks)
    packed_recomputed = [
        b for b in blocks if b.recompute_conv and isinstance(b.conv, PackedWeights)
    ]
    if recompute_binary_convs and not packed_recomputed:
        raise ValueError(
            f"engine.recompute_binary_convs=true, but {type(model).__name__} has no binary conv "
            "block whose input is known to be spikes (SpikingVGG's are); set it to false"
        )
    log.info(
        f"engine.lean: {len(layers)} binary layers hold packed 1-bit weights; BSO/T-BSO flips them "
        f"inside backward (no stored binary-weight gradients); {len(blocks)} BatchNorm+LIF(+pool) "
        f"steps fused, {recomputed} of them recompute their conv's output in backward"
    )
    return True


def make_lean(model: nn.Module) -> nn.Module:
    """The lean mode on a converted model (its modules replaced; returns it): every +-1 weight is held
    as packed bits (8 per byte) and BSO / T-BSO flips it inside ``loss.backward()`` as soon as its
    gradient exists, so no binary-weight gradient is ever stored. Same flips, bit for bit, as the
    plain mode. The :class:`bso.CaseOptimizer` built on the lean model flips them; train with
    :func:`bso.online_step`. Online training with one update per time step only."""
    converted = [m for m in model.modules() if isinstance(m, (ConvertedConv2d, ConvertedLinear))]
    if not converted:
        raise ValueError(
            f"{type(model).__name__} has no converted layers: call bso.convert(model) first"
        )
    neurons = [m for m in model.modules() if isinstance(m, LIFNode)]
    if not neurons or any(n.trace_rule is None for n in neurons):
        raise ValueError(
            "the lean mode flips the +-1 weights inside backward from the presynaptic trace, online: "
            "convert the model with a trace (bso.convert(model, trace='ndot'))"
        )
    binary = [m for m in converted if m.is_binary]
    with_bias = [m.bso_name for m in binary if isinstance(m, SynapticConv2d) and m.bias is not None]
    if with_bias:
        raise ValueError(
            f"the lean mode's packed convolutions have no bias, but {with_bias[0]} has one: build it "
            "with bias=False (a BatchNorm after it has one) or keep it full precision"
        )
    apply(model, True, "per_step")
    return model


__all__ = [
    "LEAN_MODES",
    "LeanSpikingConvBlock",
    "PackedWeights",
    "apply",
    "make_lean",
    "parse",
]
