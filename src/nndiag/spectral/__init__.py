"""Data-free weight-spectrum diagnosis (Heavy-Tailed Self-Regularization).

``analyze(model)`` gives per-layer ESD metrics (WeightWatcher's names), a summary over
valid fits, a ``skipped`` table and findings; ``smooth(model, method)`` / ``sharpen(model)`` a
copy with each layer truncated to the components its spectrum selects. Pure functions underneath: :func:`esd`,
:func:`fit_powerlaw`, :func:`fit_mp`, :func:`fit_truncated_powerlaw`.

Examples
--------
>>> import torch
>>> from nndiag.spectral import analyze
>>> res = analyze(torch.nn.Linear(256, 64))
>>> res.layers.loc[0, "num_evals"]
64
"""

from __future__ import annotations

from nndiag._utils.lazy import lazy_exports

# Eager: the submodules ``analyze`` and ``compare`` share their function's name, and a
# lazy attribute would be shadowed by the submodule once it is imported.
from nndiag.spectral.analyze import SpectralResult as SpectralResult
from nndiag.spectral.analyze import analyze as analyze
from nndiag.spectral.analyze import summarize as summarize
from nndiag.spectral.compare import compare as compare
from nndiag.spectral.compare import correlation_flow as correlation_flow

_LAZY = {
    "esd": "nndiag.spectral.esd:esd",
    "eigvals_batched": "nndiag.spectral.esd:eigvals_batched",
    "fit_powerlaw": "nndiag.spectral.powerlaw:fit_powerlaw",
    "PowerLawFit": "nndiag.spectral.powerlaw:PowerLawFit",
    "fit_mp": "nndiag.spectral.mp:fit_mp",
    "fit_truncated_powerlaw": "nndiag.spectral.tpl:fit_truncated_powerlaw",
    "layer_metrics": "nndiag.spectral.metrics:layer_metrics",
    "plan_layers": "nndiag.spectral.matrices:plan_layers",
    "scale_collapse": "nndiag.spectral.findings:scale_collapse",
    "smooth": "nndiag.spectral.smoothing:smooth",
    "sharpen": "nndiag.spectral.smoothing:sharpen",
    "SmoothResult": "nndiag.spectral.smoothing:SmoothResult",
}

__all__ = sorted([*_LAZY, "SpectralResult", "analyze", "compare", "correlation_flow", "summarize"])

__getattr__, __dir__ = lazy_exports(__name__, globals(), _LAZY, __all__)
