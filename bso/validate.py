"""Config checks made before a run does any work: types, ranges, and keys that nothing reads.

Two mechanisms, neither a hand-kept list of every key:

* **Types** come from a typed schema (:class:`Schema`, OmegaConf structured config) that names only
  the values whose type changes what is trained: time steps, epochs, batch sizes and seeds are
  integers (``engine.T=2.5`` is refused instead of training T=2), learning rates, gamma and the
  neuron constants are floats (``optimizer.binary.gamma=1e-6x`` is refused with its key). OmegaConf
  converts what it safely can (``'3'`` -> 3) and refuses the rest. A key that is absent from the
  composed config is not checked (not every optimizer has a gamma). :data:`RANGES` adds the bounds
  that no bso constructor checks; the binary optimizer's own (gamma, betas, T) are its constructor's,
  asked here by building it on one +-1 weight (:func:`check_binary_optimizer`), and engine.T is the
  engine's, built before any work by the run.
* **Unknown keys**: Hydra already refuses ``key=value`` for a key that is not in the config; the
  ``+key=value`` form it suggests for that case adds any key. Such a key is accepted only if some
  config file under ``configs/`` defines it (e.g. a key of another dataset's file) or if it is an
  argument of a ``_target_`` (instantiation checks those); otherwise the run is refused with the
  closest known keys (``+dataset.batchsize=8`` -> ``dataset.batch_size``). The known keys are read
  from the config files themselves, so a key added to a config file is known at once.
"""

from __future__ import annotations

import copy
import difflib
import inspect
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from bso.backend import BACKENDS


class ConfigError(ValueError):
    """A config value or key that the run refuses before any work."""


# --- types --------------------------------------------------------------------------------------


@dataclass
class _Engine:
    T: Optional[int] = None  # noqa: UP045 - OmegaConf's structured configs read typing.Optional
    mse_weight: Optional[float] = None  # noqa: UP045


@dataclass
class _Dataset:
    epochs: Optional[int] = None  # noqa: UP045
    batch_size: Optional[int] = None  # noqa: UP045
    num_workers: Optional[int] = None  # noqa: UP045
    in_channels: Optional[int] = None  # noqa: UP045
    num_classes: Optional[int] = None  # noqa: UP045
    image_size: Optional[int] = None  # noqa: UP045


@dataclass
class _Neuron:
    tau: Optional[float] = None  # noqa: UP045
    v_threshold: Optional[float] = None  # noqa: UP045
    surrogate_alpha: Optional[float] = None  # noqa: UP045


@dataclass
class _Model:
    neuron: _Neuron = field(default_factory=_Neuron)


@dataclass
class _Binary:
    gamma: Optional[float] = None  # noqa: UP045
    beta: Optional[float] = None  # noqa: UP045
    beta1: Optional[float] = None  # noqa: UP045
    beta2: Optional[float] = None  # noqa: UP045


@dataclass
class _FullPrecision:
    lr: Optional[float] = None  # noqa: UP045
    momentum: Optional[float] = None  # noqa: UP045
    weight_decay: Optional[float] = None  # noqa: UP045


@dataclass
class _Decay:
    every_epochs: Optional[int] = None  # noqa: UP045
    factor: Optional[float] = None  # noqa: UP045


@dataclass
class _Optimizer:
    binary: _Binary = field(default_factory=_Binary)
    full_precision: _FullPrecision = field(default_factory=_FullPrecision)
    hparam_decay: _Decay = field(default_factory=_Decay)


@dataclass
class _Divergence:
    stop: Optional[bool] = None  # noqa: UP045
    check_every: Optional[int] = None  # noqa: UP045


@dataclass
class Schema:
    """The typed values of configs/train.yaml, configs/eval.yaml and their groups (see the module
    docstring)."""

    seed: Optional[int] = None  # noqa: UP045
    backend: Optional[str] = None  # noqa: UP045
    save_checkpoint: Optional[bool] = None  # noqa: UP045
    overwrite: Optional[bool] = None  # noqa: UP045
    engine: _Engine = field(default_factory=_Engine)
    dataset: _Dataset = field(default_factory=_Dataset)
    model: _Model = field(default_factory=_Model)
    optimizer: _Optimizer = field(default_factory=_Optimizer)
    divergence: _Divergence = field(default_factory=_Divergence)


def _schema_keys(node: Any, prefix: str = "") -> list[str]:
    out = []
    for key, value in OmegaConf.to_container(node).items():
        path = f"{prefix}{key}"
        out += (
            _schema_keys(OmegaConf.select(node, key), path + ".")
            if isinstance(value, dict)
            else [path]
        )
    return out


_SCHEMA = OmegaConf.structured(Schema)
TYPED_KEYS = tuple(_schema_keys(_SCHEMA))

# (key, test, what it must be): the bounds no bso constructor checks. Those a constructor checks
# are its own: engine.T (bso.engine.Engine, built with the model before any work), the binary
# optimizer's gamma, betas and T (bso.optim.BinaryOptimizer: check_binary_optimizer).
RANGES = (
    ("backend", lambda v: v in BACKENDS, f"one of {' | '.join(BACKENDS)} (bso/backend.py)"),
    ("dataset.epochs", lambda v: v >= 0, ">= 0"),
    ("dataset.batch_size", lambda v: v >= 1, ">= 1"),
    ("dataset.num_workers", lambda v: v >= 0, ">= 0"),
    ("engine.mse_weight", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("model.neuron.tau", lambda v: v > 0, "> 0 (the membrane time constant; lambda = 1 - 1/tau)"),
    ("model.neuron.v_threshold", lambda v: v > 0, "> 0"),
    ("optimizer.full_precision.lr", lambda v: v >= 0, ">= 0"),  # torch's optimizers: no key named
    ("optimizer.hparam_decay.every_epochs", lambda v: v >= 0, ">= 0 (0 disables)"),
    ("divergence.check_every", lambda v: v >= 1, ">= 1"),
)


def check_types(cfg: DictConfig) -> DictConfig:
    """``cfg`` with the schema's values converted to their types; a value that cannot be converted
    (or is out of range) raises :class:`ConfigError` naming the key."""
    present = {}
    for key in TYPED_KEYS:
        value = OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
        if value is not None:
            present[key] = value
    typed = OmegaConf.structured(Schema)
    for key, value in present.items():
        try:
            OmegaConf.update(typed, key, value, merge=False)
        except OmegaConfBaseException as err:
            raise ConfigError(
                f"{key}={value!r}: expected {_type_name(key)} ({str(err).splitlines()[0]})"
            ) from None
    cfg = copy.deepcopy(cfg)
    for key in present:
        value = OmegaConf.select(typed, key)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}={value}: expected a finite number")
        OmegaConf.update(cfg, key, value, merge=False)
    for key, test, expected in RANGES:
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None and not test(value):
            raise ConfigError(f"{key}={value}: must be {expected}")
    check_binary_optimizer(cfg)
    return cfg


def check_binary_optimizer(cfg: DictConfig) -> None:
    """``optimizer.binary`` built on one +-1 weight (no model, no data): what its constructor refuses
    (gamma < 0, a beta outside [0, 1), an unknown option) raises :class:`ConfigError` naming it."""
    binary = OmegaConf.select(cfg, "optimizer.binary", default=None)
    if binary is None:
        return
    import torch
    from hydra.utils import instantiate

    try:
        instantiate(binary)([torch.ones(1)])
    except (InstantiationException, ValueError, TypeError) as err:
        raise constructor_error("optimizer.binary", binary, err) from None


def constructor_error(key: str, node: DictConfig, err: Exception) -> ConfigError:
    """A :class:`ConfigError` naming config ``key``, its ``_target_`` and what the constructor
    said: ``err`` itself, or the error inside Hydra's InstantiationException (which wraps it in
    several lines); a refusal other than ValueError keeps its type's name."""
    cause = (err.__cause__ or err) if isinstance(err, InstantiationException) else err
    text = str(cause) if isinstance(cause, ValueError) else f"{type(cause).__name__}: {cause}"
    return ConfigError(f"{key} ({node.get('_target_')}): {text}")


def _type_name(key: str) -> str:
    node = _SCHEMA
    *parents, leaf = key.split(".")
    for part in parents:
        node = node[part]
    ref = node._get_node(leaf)
    name = type(ref).__name__.replace("Node", "").lower()
    return {"integer": "an integer", "float": "a number", "boolean": "true or false"}.get(
        name, name
    )


# --- unknown keys -------------------------------------------------------------------------------


def config_dirs() -> list[Path]:
    """The directories Hydra composed from (its search path), or the package's configs/."""
    dirs = []
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            for source in HydraConfig.get().runtime.config_sources:
                if source.schema == "file":
                    dirs.append(Path(source.path))
    except Exception:  # noqa: BLE001 - outside a Hydra run
        pass
    default = Path(__file__).resolve().parents[1] / "configs"
    if default.is_dir() and default not in dirs:
        dirs.append(default)
    return dirs


def _flatten(node: Any, prefix: str, out: set[str]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "defaults" and not prefix:
                continue
            path = f"{prefix}{key}"
            out.add(path)
            _flatten(value, path + ".", out)


def known_keys(dirs: list[Path] | None = None) -> set[str]:
    """Every key some config file defines, with its package (group path, or ``_global_``)."""
    keys: set[str] = set()
    for root in config_dirs() if dirs is None else dirs:
        for path in root.rglob("*.yaml"):
            group = path.relative_to(root).parent.as_posix()
            group = "" if group == "." else group  # train.yaml, eval.yaml: the root package
            text = path.read_text()
            package = group.replace("/", ".")
            for line in text.splitlines()[:5]:
                if line.startswith("# @package"):
                    package = line.split()[-1]
            if package == "_global_":
                package = ""
            elif package == "_group_":
                package = group.replace("/", ".")
            try:
                content = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
            except Exception:  # noqa: BLE001 - a file that is not plain YAML config
                continue
            _flatten(content, f"{package}." if package else "", keys)
    return keys


def check_added_keys(cfg: DictConfig, overrides: list[str]) -> None:
    """Refuse ``+key=value`` / ``++key=value`` for a key that no config file defines and that is
    not an argument of a ``_target_``."""
    dirs = config_dirs()
    known = None
    for item in overrides:
        if not item.startswith("+") or "=" not in item:
            continue
        key = item.split("=", 1)[0].lstrip("+")
        if key.startswith("hydra.") or any((d / key.replace(".", "/")).is_dir() for d in dirs):
            continue  # Hydra's own settings; `+group=option` (e.g. +sweep=table3)
        parent = key.rpartition(".")[0]
        parent_node = OmegaConf.select(cfg, parent) if parent else None
        if isinstance(parent_node, DictConfig) and "_target_" in parent_node:
            _check_argument(item, parent_node._target_, key.rpartition(".")[2])
            continue  # a constructor argument it takes
        known = known_keys(dirs) if known is None else known
        if key in known:
            continue
        close = difflib.get_close_matches(key, sorted(known), n=3, cutoff=0.6)
        raise ConfigError(
            f"{item}: no config file defines {key}, so nothing reads it"
            + (
                f"; did you mean {' or '.join(close)}? (set an existing key without '+', e.g. "
                f"{close[0]}={item.split('=', 1)[1]})"
                if close
                else ""
            )
        )


def _check_argument(item: str, target: str, name: str) -> None:
    """``+<node>.<name>=...`` on a node that builds ``target``: refused unless ``target`` takes an
    argument ``name`` (or any keyword)."""
    from hydra.utils import get_object

    try:
        params = inspect.signature(get_object(target)).parameters
    except (ImportError, AttributeError, TypeError, ValueError):
        return  # not inspectable: instantiation decides
    if name in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    names = [p for p in params if p not in ("self", "args", "kwargs")]
    close = difflib.get_close_matches(name, names, n=2, cutoff=0.5)
    raise ConfigError(
        f"{item}: {target} takes no argument {name}"
        + (f" (did you mean {' or '.join(close)}?)" if close else "")
        + f"; its arguments: {', '.join(names)} (set one without '+')"
    )


def validate(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """Every check; returns ``cfg`` with typed values."""
    check_added_keys(cfg, overrides)
    return check_types(cfg)
