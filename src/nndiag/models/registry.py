"""A registry of built-in architectures, by name.

Names may carry a parameter after a colon, e.g. ``"nb201:|nor_conv_3x3~0|+..."``:
the factory registered for the prefix receives the rest as its first argument.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from torch import nn

from nndiag.errors import InputError

# name -> "module:function"; modules import lazily so the registry stays cheap.
_REGISTRY: dict[str, str] = {
    "resnet20": "nndiag.models.resnet_cifar:resnet20",
    "resnet32": "nndiag.models.resnet_cifar:resnet32",
    "resnet44": "nndiag.models.resnet_cifar:resnet44",
    "resnet56": "nndiag.models.resnet_cifar:resnet56",
    "digits-cnn": "nndiag.models.small:digits_cnn",
    "digits-mlp": "nndiag.models.small:digits_mlp",
    "mlp": "nndiag.models.small:mlp",
}
# prefixes whose factory takes a string argument: "prefix:arg"
_PARAMETRIC: dict[str, str] = {
    "nb201": "nndiag.models.nb201:nb201",
}


def register_model(name: str, target: str | Callable[..., nn.Module], parametric: bool = False) -> None:
    """Register a factory under ``name`` (``"module:function"`` or a callable)."""
    table = _PARAMETRIC if parametric else _REGISTRY
    table[name] = target  # type: ignore[assignment]


def available_models() -> list[str]:
    """Names accepted by :func:`build_model` (parametric ones end with ``:...``)."""
    return sorted(_REGISTRY) + sorted(f"{p}:..." for p in _PARAMETRIC)


def _resolve(target: str | Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    if callable(target):
        return target
    mod, _, fn = target.partition(":")
    return getattr(importlib.import_module(mod), fn)


def is_builtin(name: str) -> bool:
    """Whether ``name`` names a registered architecture."""
    return name in _REGISTRY or name.split(":", 1)[0] in _PARAMETRIC


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered architecture with freshly initialised weights.

    Parameters
    ----------
    name : str
        A name from :func:`available_models`.
    **kwargs
        Passed to the factory (e.g. ``num_classes``, ``width``).

    Examples
    --------
    >>> m = build_model("resnet20")
    >>> sum(p.numel() for p in m.parameters())
    269722
    """
    if name in _REGISTRY:
        return _resolve(_REGISTRY[name])(**kwargs)
    prefix, sep, arg = name.partition(":")
    if sep and prefix in _PARAMETRIC:
        return _resolve(_PARAMETRIC[prefix])(arg, **kwargs)
    raise InputError(f"unknown architecture '{name}'; choose one of {', '.join(available_models())}")
