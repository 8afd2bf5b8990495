"""Data-free weight-spectrum diagnosis (Heavy-Tailed Self-Regularization).

``analyze(model)`` gives per-layer ESD metrics (WeightWatcher's names), a summary over
valid fits, a ``skipped`` table and findings. Pure functions underneath: :func:`esd`,
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

import importlib
from typing import Any

_LAZY = {
    "analyze": "nndiag.spectral.analyze:analyze",
    "SpectralResult": "nndiag.spectral.analyze:SpectralResult",
    "summarize": "nndiag.spectral.analyze:summarize",
    "esd": "nndiag.spectral.esd:esd",
    "eigvals_batched": "nndiag.spectral.esd:eigvals_batched",
    "fit_powerlaw": "nndiag.spectral.powerlaw:fit_powerlaw",
    "PowerLawFit": "nndiag.spectral.powerlaw:PowerLawFit",
    "fit_mp": "nndiag.spectral.mp:fit_mp",
    "fit_truncated_powerlaw": "nndiag.spectral.tpl:fit_truncated_powerlaw",
    "layer_metrics": "nndiag.spectral.metrics:layer_metrics",
    "plan_layers": "nndiag.spectral.matrices:plan_layers",
    "compare": "nndiag.spectral.compare:compare",
    "correlation_flow": "nndiag.spectral.compare:correlation_flow",
    "scale_collapse": "nndiag.spectral.findings:scale_collapse",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'nndiag.spectral' has no attribute {name!r}")
    mod, _, attr = target.partition(":")
    value = getattr(importlib.import_module(mod), attr)
    globals()[name] = value
    return value
