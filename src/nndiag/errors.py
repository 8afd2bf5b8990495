"""Exceptions raised by nndiag.

Every error nndiag raises on purpose derives from :class:`NNDiagError`; the CLI prints
its message as one line and exits with code 2.
"""

from __future__ import annotations


class NNDiagError(Exception):
    """Base class of every nndiag error."""


class InputError(NNDiagError, ValueError):
    """An argument, option or specification is invalid."""


class ModelLoadError(NNDiagError):
    """A model file or specification cannot be loaded."""


class DataError(NNDiagError):
    """A data specification cannot be loaded or does not fit."""


class AnalysisError(NNDiagError):
    """An analysis cannot run on the given model or data."""


class MissingDependencyError(NNDiagError, ImportError):
    """An optional dependency is not installed."""

    def __init__(self, package: str, extra: str, purpose: str = "") -> None:
        why = f" for {purpose}" if purpose else ""
        super().__init__(
            f"the optional package '{package}' is needed{why}: pip install 'nndiag[{extra}]'"
        )
        self.package = package
        self.extra = extra


def require(module: str, extra: str, purpose: str = "") -> object:
    """Import an optional dependency or raise :class:`MissingDependencyError`.

    Parameters
    ----------
    module : str
        Importable module name, e.g. ``"matplotlib.pyplot"``.
    extra : str
        The nndiag extra that installs it.
    purpose : str
        What it is needed for, used in the message.

    Returns
    -------
    module
        The imported module.
    """
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingDependencyError(module.split(".")[0], extra, purpose) from exc
