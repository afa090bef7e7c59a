"""What the NIR exporter (:mod:`bso.export.nir`) can express: :func:`check_exportable` names the
first layer it cannot, with :class:`NIRExportError`."""

from __future__ import annotations

from torch import nn

from bso.models.parts import SpikingConvBlock
from bso.models.resnet import BiRealResNet18, SpikingResNet19
from bso.models.vgg import SpikingVGG
from bso.neurons import LIFNode


class NIRExportError(ValueError):
    """A layer that NIR (or this exporter) cannot express."""


def unsupported(name: str, module: nn.Module, why: str) -> NIRExportError:
    """The error for layer ``name`` that NIR (or this exporter) cannot express, and why."""
    return NIRExportError(
        f"cannot export layer '{name}' ({type(module).__name__}) to NIR: {why}. Exportable: "
        "SpikingVGG (<n>C<k> convs, AP<k> average pools), SpikingResNet19 and BiRealResNet18 "
        "(stem_pool=false), with BatchNorm or none, no AGMM gate"
    )


def check_exportable(model: nn.Module) -> None:
    """Raise :class:`NIRExportError` naming the first layer NIR cannot express."""
    if isinstance(model, SpikingVGG):
        for i, block in enumerate(model.blocks):
            _check_block(f"blocks.{i}", block)
    elif isinstance(model, SpikingResNet19):
        _check_block("stem", model.stem)
        for i, block in enumerate(model.blocks):
            for part in ("1", "2"):
                _check_parts(
                    f"blocks.{i}",
                    block,
                    [f"conv{part}", f"bn{part}", f"gate{part}", f"neuron{part}"],
                )
            if block.down_conv is not None:
                _check_parts(f"blocks.{i}", block, ["down_conv", "down_bn"])
    elif isinstance(model, BiRealResNet18):
        _check_parts("stem", model.stem, ["0", "1"])
        if not isinstance(model.stem[2], nn.Identity):
            raise unsupported(
                "stem.2", model.stem[2], _NO_MAX_POOL + " (BiRealResNet18 stem_pool=false)"
            )
        for i, block in enumerate(model.blocks):
            _check_parts(f"blocks.{i}", block, ["neuron", "conv", "bn", "gate"])
            if not isinstance(block.shortcut, nn.Identity):
                _check_parts(f"blocks.{i}.shortcut", block.shortcut, ["1", "2"])
    else:
        raise unsupported(
            type(model).__name__,
            model,
            "not one of the models this exporter maps (a chain or residual blocks of conv, "
            "BatchNorm, LIF and average pools)",
        )


_NO_MAX_POOL = "NIR has no max pooling (its pools: SumPool2d, AvgPool2d); train with AP<k> instead"


def _check_parts(prefix: str, owner: nn.Module, names: list[str]) -> None:
    """Each named child of ``owner``: a conv, a BatchNorm (or none), no gate, bso's LIF."""
    for part in names:
        name, module = f"{prefix}.{part}", owner.get_submodule(part)
        if isinstance(module, nn.Conv2d):
            if (
                module.groups != 1
                or module.padding_mode != "zeros"
                or tuple(module.dilation) != (1, 1)
            ):
                raise unsupported(name, module, "only ungrouped, undilated, zero-padded convs")
        elif isinstance(module, LIFNode):
            if module.decay_input:
                raise unsupported(name, module, "expected bso's LIF (undecayed input)")
        elif part.startswith("gate"):
            if not isinstance(module, nn.Identity):
                raise unsupported(
                    name,
                    module,
                    "AGMM's gate scales by a statistic of the whole feature map, which NIR has "
                    "no node for",
                )
        elif not isinstance(module, (nn.BatchNorm2d, nn.Identity)):
            raise unsupported(name, module, "only BatchNorm2d (folded into the conv) or none")


def _check_block(name: str, block: SpikingConvBlock) -> None:
    _check_parts(name, block, ["conv", "bn", "gate", "neuron"])
    pool = block.pool
    if isinstance(pool, nn.MaxPool2d):
        raise unsupported(f"{name}.pool", pool, _NO_MAX_POOL)
    if isinstance(pool, nn.AvgPool2d):
        k, stride, padding = (pair(pool.kernel_size), pair(pool.stride), pair(pool.padding))
        if k[0] != k[1] or stride != k or padding != (0, 0) or pool.divisor_override:
            raise unsupported(
                f"{name}.pool", pool, "only square average pools with stride = kernel"
            )
    elif not isinstance(pool, nn.Identity):
        raise unsupported(f"{name}.pool", pool, "only average pooling")


def pair(value) -> tuple[int, int]:
    """A size or a pair of sizes as a pair of ints."""
    return tuple(int(v) for v in value) if isinstance(value, tuple | list) else (value, value)
