"""nndiag: diagnose neural networks.

``import nndiag`` is cheap: sub-packages and heavy dependencies load on first use.

Examples
--------
>>> import nndiag
>>> nndiag.__version__
'0.1.0'
"""

from __future__ import annotations

import logging

from nndiag._utils.lazy import lazy_exports

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

# public name -> "module:attribute" (attribute may be empty for a sub-package)
_LAZY: dict[str, str] = {
    "NNDiagError": "nndiag.errors:NNDiagError",
    "load_model": "nndiag.io.models:load_model",
    "load_data": "nndiag.io.data:load_data",
    "Finding": "nndiag.report.results:Finding",
    "Result": "nndiag.report.results:Result",
    "diagnose": "nndiag.report.diagnose:diagnose",
    "io": "nndiag.io:",
    "models": "nndiag.models:",
    "spectral": "nndiag.spectral:",
    "landscape": "nndiag.landscape:",
    "diagnosis": "nndiag.diagnosis:",
    "zerocost": "nndiag.zerocost:",
    "slices": "nndiag.slices:",
    "report": "nndiag.report:",
}

__all__ = ["__version__", *_LAZY]

__getattr__, __dir__ = lazy_exports(__name__, globals(), _LAZY, __all__)
