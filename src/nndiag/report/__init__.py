"""Results, findings, the diagnosis report and its renderings (JSON, HTML, terminal).

``from nndiag.report import Report`` loads lazily: importing the package imports
nothing heavy. The entry point is ``nndiag.diagnose``.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "Result": "nndiag.report.results",
    "Finding": "nndiag.report.results",
    "Report": "nndiag.report.report",
    "ModelReport": "nndiag.report.report",
    "ProbeRun": "nndiag.report.report",
    "render_html": "nndiag.report.html",
    "validate_report": "nndiag.report.schema",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'nndiag.report' has no attribute {name!r}")
    return getattr(importlib.import_module(mod), name)
