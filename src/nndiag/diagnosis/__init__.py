"""Failure-mode diagnosis with MD tree (Zhou et al., ICML 2024).

Public entry points (imported lazily):

* :func:`diagnose_failure` — features of a model and its second seed → failure mode,
  recommended change and confidence;
* :class:`MDTree`, :data:`TREES` — the fixed trees, threshold fitting (paper / exact);
* :func:`run_benchmark` — the paper's five cases from its released tables;
* :func:`compute_features`, :func:`linear_cka`, :func:`connect` — the features;
* :func:`build_zoo`, :func:`zoo_frame`, :class:`ZooConfig` — model zoos;
* :func:`fit_threshold_set`, :func:`load_thresholds`, :func:`evaluate_transfer`.
"""

from __future__ import annotations

from nndiag._utils.lazy import lazy_exports

_LAZY: dict[str, str] = {
    "diagnose_failure": "nndiag.diagnosis.api",
    "MDTree": "nndiag.diagnosis.mdtree",
    "TREES": "nndiag.diagnosis.mdtree",
    "run_benchmark": "nndiag.diagnosis.benchmark",
    "compute_features": "nndiag.diagnosis.features",
    "linear_cka": "nndiag.diagnosis.features",
    "connect": "nndiag.diagnosis.curves",
    "build_zoo": "nndiag.diagnosis.zoo",
    "zoo_frame": "nndiag.diagnosis.zoo",
    "ZooConfig": "nndiag.diagnosis.zoo",
    "fit_threshold_set": "nndiag.diagnosis.shipped",
    "load_thresholds": "nndiag.diagnosis.shipped",
    "evaluate_transfer": "nndiag.diagnosis.shipped",
}

__all__ = sorted(_LAZY)

__getattr__, __dir__ = lazy_exports(__name__, globals(), _LAZY, __all__)
