"""Truncated power-law (TPL) fit of an ESD tail: ``p(x) ∝ x^{−α} e^{−Λx}`` for ``x ≥ xmin``.

Maximum likelihood for ``(α, Λ)`` at a fixed ``xmin`` (usually the power-law fit's),
with the normaliser ``∫_{xmin}^∞ x^{−α} e^{−Λx} dx`` computed by adaptive quadrature
(scipy) after the substitution ``x = xmin·e^t``. WeightWatcher 0.7.7 delegates this to the
``powerlaw`` package, and with ``powerlaw`` 2.0.0 every such fit fails (α = −1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TPLFit:
    """``alpha``, ``Lambda`` (in 1/units of x), ``xmin``, ``loglik`` and ``status``."""

    alpha: float
    Lambda: float
    xmin: float
    loglik: float
    status: str


def _log_norm(alpha: float, lam: float, xmin: float) -> float:
    from scipy.integrate import quad

    # substitute x = xmin·e^t: ∫ xmin^{1−α} e^{(1−α)t − Λ xmin e^t} dt over t ≥ 0
    def f(t: float) -> float:
        return math.exp((1 - alpha) * t - lam * xmin * (math.exp(t) - 1))

    upper = 50.0 if lam > 0 else 400.0
    val, _ = quad(f, 0, upper, limit=200)
    return (1 - alpha) * math.log(xmin) - lam * xmin + math.log(max(val, 1e-300))


def fit_truncated_powerlaw(evals: np.ndarray, xmin: float) -> TPLFit:
    """Fit ``(α, Λ)`` of a truncated power law to the values ``≥ xmin``.

    Examples
    --------
    >>> rng = np.random.default_rng(1)
    >>> x = (1 - rng.random(4000)) ** (-1 / 1.5)      # pure power law, alpha = 2.5
    >>> f = fit_truncated_powerlaw(x, 1.0)
    >>> round(f.alpha, 1), f.Lambda < 1e-3
    (2.5, True)
    """
    from scipy.optimize import minimize

    x = np.asarray(evals, dtype=np.float64)
    x = x[x >= xmin]
    n = x.size
    if n < 3 or not math.isfinite(xmin) or xmin <= 0:
        return TPLFit(math.nan, math.nan, xmin, math.nan, "failed")
    slog = float(np.log(x).sum())
    sx = float(x.sum())
    scale = 1.0 / float(x.mean())

    def nll(p: np.ndarray) -> float:
        alpha, lam = float(p[0]), float(math.exp(p[1])) * scale
        if alpha <= 1.0 + 1e-9 and lam < 1e-12:
            return 1e300
        return alpha * slog + lam * sx + n * _log_norm(alpha, lam, xmin)

    best = None
    for a0 in (1.5, 3.0):
        for l0 in (-6.0,):
            r = minimize(nll, np.array([a0, l0]), method="Nelder-Mead",
                         options={"xatol": 1e-6, "fatol": 1e-9, "maxiter": 2000})
            if best is None or r.fun < best.fun:
                best = r
    assert best is not None
    alpha, lam = float(best.x[0]), float(math.exp(best.x[1])) * scale
    return TPLFit(alpha, lam, float(xmin), -float(best.fun), "success" if best.success else "failed")
