"""Make a user's PyTorch or spikingjelly model binary: :func:`convert`.

:func:`convert` replaces, in place,

* every ``nn.Conv2d`` / ``nn.Linear`` (spikingjelly's ``layer.Conv2d`` / ``layer.Linear`` included)
  by a :class:`ConvertedConv2d` / :class:`ConvertedLinear`: a :mod:`bso.layers` synaptic layer whose
  weight is stored as exactly -1/+1 (paper section 3; the first and last layer stay full precision
  by default, as in the paper's networks), and whose weight gradient, in online training, comes from
  the presynaptic trace of its input spikes (paper Eq. 9, ``G[t] = delta[t] a_hat[t]^T``);
* every spikingjelly ``neuron.LIFNode`` by a :class:`ConvertedLIFNode`, the same neuron (its tau,
  threshold, reset, surrogate and step mode are kept) that also keeps the presynaptic trace
  ``a_hat[t] = mu[t] a_hat[t-1] + s[t]`` (:mod:`bso.neurons`) and detaches its state between time
  steps when trained online.

How a converted layer finds the trace of its input, and when it refuses: :mod:`bso.trace_links`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from spikingjelly.activation_based import layer as sj_layer
from spikingjelly.activation_based import neuron as sj_neuron
from torch import nn

from bso import backend as backends
from bso.layers import SYNAPTIC_LAYERS, SynapticConv2d, SynapticLinear, binarize_
from bso.neurons import TRACE_RULES, LIFNode, configure_neurons
from bso.trace_links import TRACE_TRANSPARENT, TraceLinks

BINARY_INITS = ("release", "sign")  # convert(init=): how the converted layers' +-1 weights start
# spikingjelly containers that fold [T, B, ...] into one call, whatever set_step_mode says
MULTI_STEP_CONTAINERS = (
    sj_layer.SeqToANNContainer,
    sj_layer.MultiStepContainer,
    sj_layer.TLastMultiStepContainer,
    sj_layer.TLastSeqToANNContainer,
)
_SUPPORTED = (
    "nn.Conv2d and nn.Linear (spikingjelly's layer.Conv2d / layer.Linear), spikingjelly's LIFNode"
)


class _Converted:
    """What the converted conv and linear layers share: the name they report errors under, the
    trace lookup, spikingjelly's step mode."""

    bso_name: str = "?"
    step_mode: str = "s"
    trace_links: TraceLinks | None = None

    def input_trace(self, x: torch.Tensor) -> torch.Tensor | None:
        links = self.trace_links
        if links is None or not torch.is_grad_enabled():
            return None
        trace = links.trace_of(x)
        if trace is None and links.fired is not None and not links.is_value(x):
            raise RuntimeError(
                f"{self.bso_name} ({type(self).__name__}) runs after the spiking neuron "
                f"{links.fired} in this forward pass, but its input is not a neuron's spikes "
                "(directly, through nn.AvgPool2d/MaxPool2d/Flatten/Identity modules, or a view "
                "such as x.view(B, -1)), so bso cannot give it the presynaptic trace its weight "
                "gradient needs in online training. Express the ops between the neuron and this "
                "layer as those modules, or train with BPTT (bso.convert(model, trace=None))."
            )
        return trace

    def extra_repr(self) -> str:
        return super().extra_repr() + ("" if self.step_mode == "s" else ", step_mode=m")


class ConvertedConv2d(_Converted, SynapticConv2d):
    """A converted ``nn.Conv2d``: +-1 (or full-precision) weights, trace-based weight gradient."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.step_mode == "m":  # spikingjelly multi-step: [T, B, ...] -> [T * B, ...]
            return super().forward(x.flatten(0, 1)).unflatten(0, x.shape[:2])
        return super().forward(x, self.input_trace(x))


class ConvertedLinear(_Converted, SynapticLinear):
    """A converted ``nn.Linear`` (see :class:`ConvertedConv2d`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        trace = self.input_trace(x) if self.step_mode == "s" else None
        if trace is None or x.dim() == 2:
            return super().forward(x, trace)
        flat = super().forward(x.reshape(-1, x.shape[-1]), trace.reshape(-1, x.shape[-1]))
        return flat.reshape(*x.shape[:-1], flat.shape[-1])


class ConvertedLIFNode(LIFNode):
    """A spikingjelly ``LIFNode`` with the same dynamics that keeps the presynaptic trace
    (:class:`bso.neurons.LIFNode`) and records its spikes for the next converted layer."""

    bso_name: str = "?"
    trace_links: TraceLinks | None = None

    @classmethod
    def from_spikingjelly(cls, src: sj_neuron.LIFNode) -> ConvertedLIFNode:
        new = cls(tau=src.tau, v_threshold=src.v_threshold, detach_reset=src.detach_reset)
        new.decay_input = src.decay_input
        new.v_reset = src.v_reset
        new.surrogate_function = src.surrogate_function
        new.step_mode = src.step_mode
        new.store_v_seq = src.store_v_seq
        v0 = 0.0 if src.v_reset is None else src.v_reset
        new.set_reset_value("v", v0)
        new.v = v0
        return new

    def multi_step_functional_forward(self, inputs, states, **kwargs):
        """spikingjelly's multi-step mode ([T, B, ...] in one call, for BPTT): the single step T times."""
        spikes = []
        for t in range(inputs[0].shape[0]):
            (spike,), states = self.single_step_functional_forward(
                tuple(x[t] for x in inputs), states, **kwargs
            )
            spikes.append(spike)
        return (torch.stack(spikes),), states

    def single_step_forward(self, x: torch.Tensor, *args, **kwargs):
        spikes = super().single_step_forward(x, *args, **kwargs)
        links = self.trace_links
        if links is not None and self.trace_rule is not None and torch.is_grad_enabled():
            links.record(spikes, self.trace, self.bso_name)
        return spikes


def convert(
    model: nn.Module,
    *,
    full_precision: Iterable[str] = ("first", "last"),
    trace: str | None = "ndot",
    init: str = "release",
    backend: str = "release",
) -> nn.Module:
    """Make ``model`` a binary (spiking) network, in place; returns it.

    Args:
        model: a plain PyTorch or spikingjelly model (single-step for online training).
        full_precision: names of conv/linear modules (as in ``model.named_modules()``) that keep
            full-precision weights; ``"first"`` / ``"last"`` name the first / last conv or linear
            layer in module order (the paper keeps both full precision). Every other conv/linear
            gets +-1 weights.
        trace: the presynaptic trace for online training, one of ``bso.neurons.TRACE_RULES``
            (``"ndot"``: the released code's, ``"ndot_paper"``, ``"ottt"``); neurons then detach their
            state between time steps. ``None``: BPTT (state kept in the graph, no trace).
        init: ``"release"``: the released code's init of binary weights, the sign of a Kaiming-normal
            draw (fan_out, relu) -- +-1 with equal probability; ``"sign"``: the sign of the model's
            current weights (sign(0) = +1), e.g. to start from a trained full-precision model.
            Full-precision layers keep their weights either way.
        backend: how the neurons' steps run, one of ``bso.backend.BACKENDS``: ``"release"`` (the
            released code's float32 order), ``"fast"`` (spikingjelly's kernels) or ``"fused"``
            (the release's values, the online steps and average pools as compiled loops; needs
            ``trace``). BSO / T-BSO take their own ``backend=``.

    Raises ``TypeError`` naming the module for layers and neurons it cannot convert (any other
    spikingjelly neuron, other conv dimensions, non-zero padding modes).
    """
    if init not in BINARY_INITS:
        raise ValueError(f"unknown init={init!r}; choose one of {BINARY_INITS}")
    if trace is not None and trace not in TRACE_RULES:
        raise ValueError(f"unknown trace={trace!r}; choose one of {TRACE_RULES} or None (BPTT)")
    if any(isinstance(m, _Converted | ConvertedLIFNode) for m in model.modules()):
        raise ValueError(f"{type(model).__name__} is already converted (bso.convert)")
    synaptic, neurons = _find_convertible(model)
    if not synaptic:
        raise ValueError(
            f"{type(model).__name__} has no nn.Conv2d or nn.Linear layer to make binary"
        )
    keep = _resolve_full_precision(full_precision, [name for name, _ in synaptic])
    if len(keep) == len(synaptic):
        raise ValueError(
            f"full_precision={list(full_precision)} keeps every conv/linear layer of "
            f"{type(model).__name__} full precision: no binary weights would remain"
        )
    if trace is not None:
        fixed = [(n, m) for n, m in model.named_modules() if isinstance(m, MULTI_STEP_CONTAINERS)]
        if fixed:
            name, module = fixed[0]
            raise ValueError(
                f"online training (trace={trace!r}) runs one time step per forward pass, but "
                f"{name or '<root>'} is a spikingjelly {type(module).__name__}, which takes "
                "[T, B, ...] whatever the step mode: put its modules in an nn.Sequential instead, "
                "or convert with trace=None to train with BPTT"
            )
        multi = [n for n, m in model.named_modules() if getattr(m, "step_mode", "s") == "m"]
        if multi:
            raise ValueError(
                f"online training (trace={trace!r}) runs one time step per forward pass, but "
                f"{multi[0] or type(model).__name__} is in spikingjelly's multi-step mode: call "
                "spikingjelly.activation_based.functional.set_step_mode(model, 's') first, or "
                "convert with trace=None to train with BPTT"
            )
    links = TraceLinks()
    for name, src in synaptic:
        new = _convert_synaptic(name, src, "full" if name in keep else "binary", init)
        new.trace_links = links
        model.set_submodule(name, new)
    for name, src in neurons:
        new = ConvertedLIFNode.from_spikingjelly(src)
        new.bso_name, new.trace_links = name, links
        model.set_submodule(name, new)
    if neurons:
        configure_neurons(model, detach_state=trace is not None, trace_rule=trace)
    backends.apply(model, backend)  # before the hooks: fused replaces the average pools
    if trace is not None:
        for module in model.modules():
            if isinstance(module, TRACE_TRANSPARENT):
                module.register_forward_hook(links.carry)
            elif not isinstance(module, ConvertedLIFNode) and next(module.children(), None) is None:
                module.register_forward_hook(links.value)
        model.register_forward_pre_hook(links.begin)
        model.register_forward_hook(links.clear)
    return model


def binary_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, weight) of every stored +-1 weight of ``model``, the parameters BSO / T-BSO take."""
    from bso.layers import named_binary_parameters

    return named_binary_parameters(model)


def _find_convertible(model: nn.Module):
    synaptic, neurons = [], []
    for name, module in model.named_modules():
        label = f"{name or '<root>'} ({type(module).__name__})"
        if isinstance(module, SYNAPTIC_LAYERS):
            raise ValueError(
                f"{label} is already a bso synaptic layer: bso.convert is for plain PyTorch / "
                "spikingjelly models (bso's model zoo is binary already)"
            )
        if isinstance(module, nn.Conv2d | nn.Linear):
            if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
                raise TypeError(
                    f"cannot convert {label}: padding_mode={module.padding_mode!r}; bso supports "
                    "zero padding only"
                )
            synaptic.append((name, module))
        elif isinstance(module, nn.modules.conv._ConvNd | nn.Bilinear):
            raise TypeError(f"cannot convert {label}: bso.convert supports {_SUPPORTED}")
        elif isinstance(module, nn.RNNBase | nn.MultiheadAttention):
            raise TypeError(
                f"cannot convert {label}: its weights would stay full precision and its state "
                f"outside the presynaptic trace; bso.convert supports {_SUPPORTED}"
            )
        elif isinstance(module, LIFNode):
            raise ValueError(f"{label} is already a bso neuron")
        elif isinstance(module, sj_neuron.LIFNode) and type(module) is sj_neuron.LIFNode:
            neurons.append((name, module))
        elif _is_spiking_neuron(module):
            raise TypeError(
                f"cannot convert {label}: bso keeps the presynaptic trace of spikingjelly's LIFNode "
                f"only (bso.convert supports {_SUPPORTED})"
            )
    return synaptic, neurons


def _is_spiking_neuron(module: nn.Module) -> bool:
    bases = tuple(
        getattr(sj_neuron, n) for n in ("BaseNode", "SimpleBaseNode") if hasattr(sj_neuron, n)
    )
    return bool(bases) and isinstance(module, bases)


def _resolve_full_precision(names: Iterable[str], order: list[str]) -> set[str]:
    if isinstance(names, str):
        names = [names]
    keep = set()
    for name in names:
        if name == "first":
            keep.add(order[0])
        elif name == "last":
            keep.add(order[-1])
        elif name in order:
            keep.add(name)
        else:
            raise ValueError(
                f"full_precision names {name!r}, which is not a conv/linear layer of the model; "
                f"its conv/linear layers are {order} (or use 'first' / 'last')"
            )
    return keep


def _padding(name: str, src: nn.Conv2d):
    if src.padding == "valid":
        return 0
    if src.padding == "same":
        if any(k % 2 == 0 for k in src.kernel_size) or src.stride not in (1, (1, 1)):
            raise TypeError(
                f"cannot convert {name} (Conv2d): padding='same' with an even kernel or a stride; "
                "give the padding as numbers"
            )
        return tuple(d * (k - 1) // 2 for d, k in zip(src.dilation, src.kernel_size, strict=True))
    return src.padding


@torch.no_grad()
def _convert_synaptic(name: str, src: nn.Module, weights: str, init: str) -> nn.Module:
    factory = dict(device=src.weight.device, dtype=src.weight.dtype)
    if isinstance(src, nn.Conv2d):
        new = ConvertedConv2d(
            src.in_channels,
            src.out_channels,
            src.kernel_size,
            stride=src.stride,
            padding=_padding(name, src),
            dilation=src.dilation,
            groups=src.groups,
            bias=src.bias is not None and weights == "full",
            weights=weights,
            **factory,
        )
        if src.bias is not None and weights == "binary":  # a full-precision bias beside +-1 weights
            new.bias = nn.Parameter(src.bias.detach().clone())
    else:
        new = ConvertedLinear(
            src.in_features, src.out_features, bias=src.bias is not None, weights=weights, **factory
        )
    new.bso_name = name
    new.step_mode = getattr(src, "step_mode", "s")
    if weights == "full" or init == "sign":
        new.weight.copy_(src.weight)
    else:
        nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
    if weights == "binary":
        binarize_(new.weight)
    if src.bias is not None:
        new.bias.copy_(src.bias)
    new.train(src.training)
    return new
