"""Generalisation criteria from the Hessian spectrum (LLA, Gabdullin 2024).

From SLQ Ritz values ``λ_j`` and weights ``w_j``:

* ``re = |λ_min / λ_max|`` — how deep the most negative curvature is, relative to
  the sharpest positive one;
* ``Kh_n = |Σ_{λ<0} |λ w|^n / Σ_{λ>0} (λ w)^n|`` (n = 0.5 by default) — the weighted
  mass of negative against positive curvature;
* ``Ct = min(λ<0) / max(λ>0)`` (0 when no eigenvalue is negative); the follow-up
  work reads ``Ct > −0.6`` as a "mainly positive" spectrum.

Reading: near 0 the spectrum is essentially positive (a well-trained minimum); near 1
(``re``, ``Kh``) or ``Ct`` near −1 it is symmetric, as at random initialisation. The
values depend on the SLQ settings (steps, runs, reorthogonalisation), which are
recorded with them.

Examples
--------
>>> import numpy as np
>>> c = spectrum_criteria(np.array([-1.0, 2.0, 4.0]), np.array([0.2, 0.4, 0.4]))
>>> round(c["re"], 3), round(c["Ct"], 3)
(0.25, -0.25)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from nndiag.errors import InputError


def spectrum_criteria(nodes: np.ndarray, weights: np.ndarray, n: float = 0.5) -> dict[str, Any]:
    """``re``, ``Kh`` (with exponent ``n``) and ``Ct`` from quadrature nodes and weights.

    Parameters
    ----------
    nodes, weights : ndarray
        Ritz values and their (non-negative) weights; NaNs are ignored.
    n : float
        The exponent of ``Kh_n``.

    Returns
    -------
    dict
        ``re``, ``Kh``, ``Kh_n``, ``Ct``, ``lambda_min``, ``lambda_max``. Values are NaN
        when the spectrum has no positive eigenvalue.
    """
    nodes = np.asarray(nodes, dtype=float).ravel()
    weights = np.asarray(weights, dtype=float).ravel()
    if nodes.shape != weights.shape:
        raise InputError(f"nodes and weights differ in shape: {nodes.shape} vs {weights.shape}")
    ok = np.isfinite(nodes) & np.isfinite(weights)
    lam, w = nodes[ok], np.abs(weights[ok])
    if lam.size == 0:
        raise InputError("no finite eigenvalues to compute the criteria from")
    lmin, lmax = float(lam.min()), float(lam.max())
    pos, neg = lam > 0, lam < 0
    nan = float("nan")
    if not pos.any() or lmax <= 0:
        return {"re": nan, "Kh": nan, "Kh_n": n, "Ct": nan, "lambda_min": lmin, "lambda_max": lmax}
    re = abs(lmin / lmax) if neg.any() else 0.0
    num = float(np.sum(np.abs(lam[neg] * w[neg]) ** n))
    den = float(np.sum((lam[pos] * w[pos]) ** n))
    kh = abs(num / den) if den > 0 else nan
    ct = float(lam[neg].min() / lam[pos].max()) if neg.any() else 0.0
    return {"re": float(re), "Kh": float(kh), "Kh_n": n, "Ct": ct, "lambda_min": lmin, "lambda_max": lmax}
