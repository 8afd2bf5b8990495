"""Per-layer spectral metrics from an ESD (names as WeightWatcher uses them).

All functions take the eigenvalues of ``WᵀW`` (squared singular values, not divided
by N), sorted or not.
"""

from __future__ import annotations

import math

import numpy as np

from nndiag.spectral.powerlaw import PowerLawFit

#: WeightWatcher's thresholds on alpha.
OVER_TRAINED_ALPHA = 2.0
UNDER_TRAINED_ALPHA = 6.0
#: Eigenvalues below this count towards ``weak_rank_loss``.
WEAK_RANK_TOL = 1e-6
_EPS = 1e-10


def matrix_rank(evals: np.ndarray, N: int) -> int:
    """Numerical rank: eigenvalues above ``λmax · N · 16 eps`` (float64 eps).

    ``numpy.linalg.matrix_rank`` thresholds singular values at ``σmax·N·eps``, which
    eigenvalues computed from a Gram matrix cannot resolve (their absolute error is
    about ``eps·λmax``, i.e. ``√eps·σmax`` on singular values); this threshold sits
    just above that error, so exactly rank-deficient matrices are counted right.
    """
    ev = np.clip(np.asarray(evals, dtype=np.float64), 0, None)
    if ev.size == 0:
        return 0
    tol = ev.max() * max(N, 1) * 16 * np.finfo(np.float64).eps
    return int(np.count_nonzero(ev > tol))


def matrix_entropy(evals: np.ndarray, N: int, rank: int | None = None) -> float:
    """Rank-normalised spectral entropy ``−Σ p ln p / ln rank``, ``p = λ/Σλ`` (WeightWatcher's).

    ``rank`` is :func:`matrix_rank` of the same values when the caller has it already.
    """
    ev = np.asarray(evals, dtype=np.float64)
    total = ev.sum()
    if ev.size == 0 or total <= 0:
        return math.nan
    if rank is None:
        rank = matrix_rank(ev, N)
    if rank <= 1:  # one direction: zero entropy (WeightWatcher's formula divides by ln(1 + 1e-10))
        return 0.0
    p = ev / total
    p += _EPS
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(-np.dot(p, np.log(p)) / math.log(rank + _EPS))


def detx(evals: np.ndarray, presorted: bool = False) -> tuple[int, float]:
    """The det X = 1 condition: ``(detX_num, detX_val)``.

    After rescaling so that ``Σλ`` equals the number of eigenvalues, ``detX_num`` is the
    size of the smallest top set of eigenvalues whose product falls below 1, and
    ``detX_val`` the smallest of them (in the original units). ``presorted``: ``evals`` is
    float64 and ascending already.
    """
    ev = evals if presorted else np.sort(np.asarray(evals, dtype=np.float64))
    n = ev.size
    if n < 2 or not ev[0] < ev[-1]:
        return 0, math.nan
    scale = n / ev.sum()
    with np.errstate(divide="ignore"):
        logs = np.log(ev[::-1] * scale)
    top = np.cumsum(logs)  # top[j] = log prod of the j+1 largest
    below = np.flatnonzero(top[:-1] < 0)  # WeightWatcher stops at idx >= 1
    num = int(below[0]) + 1 if below.size else n
    idx = n - num
    return num, float(ev[idx])


def warning_for(alpha: float) -> str:
    """``over-trained`` (α < 2), ``under-trained`` (α > 6) or ``""``."""
    if not math.isfinite(alpha):
        return ""
    if alpha < OVER_TRAINED_ALPHA:
        return "over-trained"
    if alpha > UNDER_TRAINED_ALPHA:
        return "under-trained"
    return ""


def layer_metrics(evals: np.ndarray, fit: PowerLawFit, N: int, M: int, rf: int) -> dict[str, float]:
    """Every per-layer metric of one ESD and its power-law fit.

    Parameters
    ----------
    evals : ndarray
        Eigenvalues of the layer (pooled over kernel positions).
    fit : PowerLawFit
        The tail fit (alpha-based metrics are NaN when it failed).
    N, M, rf : int
        Matrix sides and receptive field.

    Returns
    -------
    dict
        ``N, M, Q, rf, num_evals, lambda_max, spectral_norm, log_spectral_norm, norm,
        log_norm, stable_rank, alpha, alpha_weighted, log_alpha_norm, xmin, xmax, D,
        sigma, num_pl_spikes, sv_max, sv_min, matrix_rank, rank_loss, weak_rank_loss,
        entropy, detX_num, detX_val, warning, status``.
    """
    ev = np.asarray(evals, dtype=np.float64)
    if ev.size > 1 and not (ev[1:] >= ev[:-1]).all():
        ev = np.sort(ev)
    lmax = float(ev[-1]) if ev.size else math.nan
    total = float(ev.sum())
    alpha = fit.alpha if fit.ok else math.nan
    with np.errstate(divide="ignore", invalid="ignore"):
        log_lmax = math.log10(lmax) if lmax > 0 else -math.inf
        log_norm = math.log10(total) if total > 0 else -math.inf
        if fit.ok:
            # Σ λ^α in log space (λ^α overflows for large alpha)
            pos = ev[ev > 0]
            la = alpha * np.log(pos)
            m = la.max()
            log_alpha_norm = float((m + np.log(np.exp(la - m).sum())) / np.log(10))
        else:
            log_alpha_norm = math.nan
    rank = matrix_rank(ev, N)
    num, val = detx(ev, presorted=True)
    return {
        "N": int(N),
        "M": int(M),
        "Q": float(N) / float(M) if M else math.nan,
        "rf": int(rf),
        "num_evals": int(ev.size),
        "lambda_max": lmax,
        "spectral_norm": lmax,
        "log_spectral_norm": log_lmax,
        "norm": total,
        "log_norm": log_norm,
        "stable_rank": total / lmax if lmax > 0 else math.nan,
        "alpha": alpha,
        "alpha_weighted": alpha * log_lmax if fit.ok else math.nan,
        "log_alpha_norm": log_alpha_norm,
        "xmin": fit.xmin,
        "xmax": fit.xmax,
        "D": fit.D,
        "sigma": fit.sigma,
        "num_pl_spikes": int(fit.num_pl_spikes),
        "sv_max": math.sqrt(lmax) if lmax >= 0 else math.nan,
        "sv_min": math.sqrt(max(float(ev[0]), 0.0)) if ev.size else math.nan,
        "matrix_rank": rank,
        "rank_loss": int(ev.size - rank),
        "weak_rank_loss": int(np.count_nonzero(ev < WEAK_RANK_TOL)),
        "entropy": matrix_entropy(ev, N, rank),
        "detX_num": num,
        "detX_val": val,
        "warning": warning_for(alpha),
        "status": fit.status,
    }
