"""Systematic-error discovery: slices of similar inputs on which a model fails together.

``nndiag.slices.spotlight(embeddings, losses, size=0.02, n=5)`` — the Spotlight (robust);
``nndiag.slices.find_slices(model, data, method=...)`` — representations → slices → Result;
``nndiag.slices.extract_embeddings`` / ``load_embeddings`` — the inputs;
``nndiag.slices.loss_rank`` / ``gmm_slices`` / ``domino`` — baselines;
``nndiag.slices.benchmark.run_benchmark`` — the planted-slice benchmark.
Submodules load lazily.
"""

from __future__ import annotations

from nndiag._utils.lazy import lazy_exports

# The function shadows its submodule's name on the package (imported eagerly so that a
# later ``import nndiag.slices.spotlight`` cannot rebind ``nndiag.slices.spotlight``).
from nndiag.slices.spotlight import spotlight  # noqa: E402, F401

_LAZY = {
    "kernel_weights": "nndiag.slices.spotlight:kernel_weights",
    "find_slices": "nndiag.slices.find:find_slices",
    "fit_method": "nndiag.slices.find:fit_method",
    "extract_embeddings": "nndiag.slices.embeddings:extract_embeddings",
    "load_embeddings": "nndiag.slices.embeddings:load_embeddings",
    "Embeddings": "nndiag.slices.embeddings:Embeddings",
    "Slices": "nndiag.slices.base:Slices",
    "loss_rank": "nndiag.slices.baselines:loss_rank",
    "gmm_slices": "nndiag.slices.baselines:gmm_slices",
    "domino": "nndiag.slices.baselines:domino",
}
__all__ = sorted([*_LAZY, "spotlight"])

__getattr__, __dir__ = lazy_exports(__name__, globals(), _LAZY, __all__)
