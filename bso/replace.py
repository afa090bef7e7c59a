"""Modules put in place of others: how the lean mode (:mod:`bso.lean`) and the fused backend
(:func:`bso.compiled.fuse_pools`) change what a model runs, explicitly, so that ``type(module)``
always says what runs. :func:`take_over` makes the new module, :func:`replace_module` sets it
wherever the model held the old one."""

from __future__ import annotations

from torch import nn


def take_over(cls: type, module: nn.Module, by: str) -> nn.Module:
    """A new module of class ``cls`` holding everything ``module`` held: the same parameters,
    buffers, submodules, hooks (their handles still remove them) and attributes, none copied.
    ``module`` is left an empty module whose forward raises (naming ``by``, what replaced it), so
    that a reference to it kept somewhere cannot run the replaced module."""
    new = cls.__new__(cls)
    new.__dict__ = module.__dict__
    module.__dict__ = {}
    nn.Module.__init__(module)
    module.forward = _replaced(type(module).__name__, cls.__name__, by)
    return new


def _replaced(old: str, new: str, by: str):
    def forward(*args, **kwargs):
        raise RuntimeError(
            f"this {old} was replaced by a {new} in its model ({by}): run the model's module, not "
            "a reference kept from before"
        )

    return forward


def replace_module(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` wherever ``model`` holds ``old`` (every name it has, e.g. an alias; not the
    root, which has no parent to hold another module)."""
    names = [name for name, m in model.named_modules(remove_duplicate=False) if m is old]
    if not names or "" in names:
        raise ValueError(
            f"this {type(old).__name__} is not a submodule of the model (the root cannot be replaced)"
        )
    for name in names:
        model.set_submodule(name, new)
