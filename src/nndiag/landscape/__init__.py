"""Loss-landscape and Hessian analysis (see docs/ARCHITECTURE.md).

Public entry points (imported lazily):

* :func:`hessian_spectrum` — top/bottom eigenvalues, trace, SLQ density, LLA criteria;
* :class:`HessianOperator` — Hessian-vector products of a model's loss;
* :func:`surface` — 1-D / 2-D loss landscapes around the weights;
* pure kernels: :func:`eigsh`, :func:`hutchinson`, :func:`hutchpp`, :func:`xtrace`, :func:`slq`,
  :func:`spectrum_criteria`;
* losses: :func:`lm_loss` (next-token cross-entropy of a causal language model; the data
  are ``(tokens, tokens)``), :func:`logits_of` (the logits in a Hugging Face output);
* the split trace: :class:`QuadraticForms` (``zᵀHz`` by second-order forward passes),
  :class:`GaussNewtonProbes` (output-space probes of the Gauss–Newton trace), :func:`split_trace`.
"""

from __future__ import annotations

from nndiag._utils.lazy import lazy_exports

_LAZY: dict[str, str] = {
    "hessian_spectrum": "nndiag.landscape.spectrum",
    "HessianResult": "nndiag.landscape.spectrum",
    "HessianOperator": "nndiag.landscape.hvp",
    "eigsh": "nndiag.landscape.lanczos",
    "lanczos_tridiag": "nndiag.landscape.lanczos",
    "hutchinson": "nndiag.landscape.trace",
    "hutchpp": "nndiag.landscape.trace",
    "xtrace": "nndiag.landscape.trace",
    "exact_trace": "nndiag.landscape.trace",
    "QuadraticForms": "nndiag.landscape.taylor",
    "GaussNewtonProbes": "nndiag.landscape.split_trace",
    "split_trace": "nndiag.landscape.split_trace",
    "slq": "nndiag.landscape.density",
    "Density": "nndiag.landscape.density",
    "spectrum_criteria": "nndiag.landscape.criteria",
    "surface": "nndiag.landscape.surface",
    "Surface": "nndiag.landscape.surface",
    "directions": "nndiag.landscape.directions:",
    "lm_loss": "nndiag.landscape._setup",
    "logits_of": "nndiag.landscape._setup",
}

__all__ = sorted(_LAZY)

__getattr__, __dir__ = lazy_exports(__name__, globals(), _LAZY, __all__)
