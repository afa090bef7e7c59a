"""The presynaptic trace of a converted layer's input (:func:`bso.convert`).

How a layer finds its trace: while the converted model runs a forward pass with gradients, each
converted neuron records its output spikes and their trace; pooling, flatten and identity modules
between a neuron and the next conv/linear apply themselves to the trace too (a forward hook), and a
view of the spikes (``x.view(B, -1)``) is recognised. A conv/linear whose input is the model's input
or another module's output (BatchNorm, ReLU, a linear layer) takes the ordinary gradient. Any other
input -- made by an operation in a ``forward`` method from a neuron's spikes, e.g. ``2 * s`` or
``F.avg_pool2d(s, 2)`` -- after a neuron has fired in the same forward pass is an error that names
the layer: its weight gradient would silently come from the spikes instead of the trace.
"""

from __future__ import annotations

import torch
from spikingjelly.activation_based import layer as sj_layer
from torch import nn

# modules that may sit between a neuron and the next conv/linear: they are applied to the trace too
TRACE_TRANSPARENT = (
    nn.Identity,
    nn.Flatten,
    nn.Unflatten,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
)
DROPOUTS = (nn.modules.dropout._DropoutNd, sj_layer.Dropout)


class TraceLinks:
    """The spikes of the forward pass in progress and their presynaptic traces (see the module
    docstring). One per converted model, shared by its converted modules; emptied when the model's
    forward pass begins and ends."""

    def __init__(self) -> None:
        self.clear()

    def clear(self, *args) -> None:
        """Forward hook of the converted model's root (the end of a forward pass)."""
        self._traces: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._values: dict[int, torch.Tensor] = {}  # outputs of other modules: not spikes
        self.fired: str | None = None  # the last neuron that recorded spikes in this forward pass

    def begin(self, module: nn.Module, args: tuple) -> None:
        """Forward pre-hook of the root: a new forward pass; its inputs are not spikes."""
        self.clear()
        for arg in args:
            if isinstance(arg, torch.Tensor):
                self._values[id(arg)] = arg

    def value(self, module: nn.Module, args: tuple, output) -> None:
        """Forward hook of every other leaf module (BatchNorm, ReLU, conv, ...): its output is a
        value, not spikes, so a layer taking it needs no trace."""
        if not isinstance(output, torch.Tensor):
            return
        if isinstance(module, DROPOUTS) and args and self.trace_of(args[0]) is not None:
            return  # dropped spikes: no trace for them (the mask is unknown), so no value either
        self._values[id(output)] = output

    def is_value(self, x: torch.Tensor) -> bool:
        if id(x) in self._values:
            return True
        return any(_same_elements(x, v) for v in self._values.values())

    def record(self, spikes: torch.Tensor, trace: torch.Tensor, neuron: str | None = None) -> None:
        self._traces[id(spikes)] = (spikes, trace)
        if neuron is not None:
            self.fired = neuron

    def trace_of(self, x: torch.Tensor) -> torch.Tensor | None:
        """The trace of ``x`` if ``x`` is recorded spikes or a view of them with the same elements."""
        hit = self._traces.get(id(x))
        if hit is not None:
            return hit[1]
        for spikes, trace in self._traces.values():
            if _same_elements(x, spikes):
                return trace.reshape(x.shape)
        return None

    def carry(self, module: nn.Module, args: tuple, output) -> None:
        """Forward hook of a trace-transparent module: its output's trace is the module applied to
        its input's trace."""
        if not args or not isinstance(output, torch.Tensor):
            return
        trace = self.trace_of(args[0])
        if trace is not None:
            with torch.no_grad():
                self.record(output, module.forward(trace))
        elif self.is_value(args[0]):  # e.g. a conv's output flattened: still a value
            self._values[id(output)] = output

    def __getstate__(self):  # copies and pickles carry no tensors of a forward pass
        return {"_traces": {}, "_values": {}, "fired": None}


def _same_elements(x: torch.Tensor, y: torch.Tensor) -> bool:
    """``x`` is a view of ``y`` with the same elements in the same order (view, reshape, flatten)."""
    return (
        x.numel() == y.numel()
        and x.data_ptr() == y.data_ptr()
        and x.is_contiguous()
        and y.is_contiguous()
    )
