"""Lazy package attributes (PEP 562): names resolve to their module only on first use."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(
    package: str, namespace: dict[str, Any], table: Mapping[str, str], names: list[str] | None = None
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """Module-level ``__getattr__`` and ``__dir__`` for a package's lazy names.

    Parameters
    ----------
    package : str
        The package's ``__name__`` (for error messages).
    namespace : dict
        The package's ``globals()``; a resolved value is cached there.
    table : mapping
        Public name → ``"module"`` (attribute of the same name), ``"module:attr"``, or
        ``"module:"`` (the module itself).
    names : list of str, optional
        What ``dir()`` lists (default: the table's names).

    Returns
    -------
    (__getattr__, __dir__)

    Examples
    --------
    >>> g = {}
    >>> getattr_, dir_ = lazy_exports("pkg", g, {"sqrt": "math", "pi": "math:pi", "m": "math:"})
    >>> getattr_("sqrt")(4.0), getattr_("pi") > 3, getattr_("m").__name__
    (2.0, True, 'math')
    """
    listed = sorted(names if names is not None else table)

    def __getattr__(name: str) -> Any:
        target = table.get(name)
        if target is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        mod_name, sep, attr = target.partition(":")
        module = importlib.import_module(mod_name)
        value = module if sep and not attr else getattr(module, attr or name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return listed

    return __getattr__, __dir__
