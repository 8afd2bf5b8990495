"""Results, findings, the diagnosis report and its renderings (JSON, HTML, terminal).

``from nndiag.report import Report`` loads lazily: importing the package imports
nothing heavy. The entry point is ``nndiag.diagnose``.
"""

from __future__ import annotations

from nndiag._utils.lazy import lazy_exports

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

__getattr__, __dir__ = lazy_exports(__name__, globals(), _LAZY, __all__)
