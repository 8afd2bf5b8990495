"""Per-layer metrics of several same-length ESDs at once (the layers of one eigen-solver stack).

:func:`layer_metrics_many` returns what :func:`~nndiag.spectral.metrics.layer_metrics` returns
for each ESD, computed one row per ESD on a ``(B, n)`` array: the ~20 small NumPy calls of a
layer become ~20 calls for the group (ResNet56's 56 layers, five lengths, one thread: 11.1 →
4.7 ms; most of what is left is building the rows' dictionaries). Values agree with the
one-at-a-time function to rounding (the row sums of a 2-D array may add in another order than
a 1-D sum); counts and ranks are equal.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import numpy as np

from nndiag.spectral.metrics import _EPS, WEAK_RANK_TOL, layer_metrics, warning_for
from nndiag.spectral.powerlaw import PowerLawFit


def _group_metrics(E: np.ndarray, fits: list[PowerLawFit], N: np.ndarray, M: np.ndarray,
                   rf: np.ndarray) -> list[dict[str, Any]]:
    """Metrics of the rows of ``E`` (``(B, n)``, float64, each row ascending, ``n ≥ 2``)."""
    B, n = E.shape
    lmax = E[:, -1]
    total = E.sum(axis=1)
    ok = np.array([f.ok for f in fits])
    alpha = np.array([f.alpha if f.ok else math.nan for f in fits])
    with np.errstate(divide="ignore", invalid="ignore"):
        log_lmax = np.where(lmax > 0, np.log10(np.where(lmax > 0, lmax, 1.0)), -np.inf)
        log_norm = np.where(total > 0, np.log10(np.where(total > 0, total, 1.0)), -np.inf)
        logE = np.log(np.where(E > 0, E, 1.0))
        # Σ λ^α in log space over λ > 0 (λ^α overflows for large alpha)
        la = np.where(E > 0, np.where(ok, alpha, 0.0)[:, None] * logE, -np.inf)
        mx = la.max(axis=1)
        lan = (mx + np.log(np.exp(la - mx[:, None]).sum(axis=1))) / np.log(10)
        log_alpha_norm = np.where(ok, lan, math.nan)
        # numerical rank: values above λmax · N · 16 eps (matrix_rank)
        tol = np.clip(lmax, 0, None) * np.maximum(N, 1) * 16 * np.finfo(np.float64).eps
        rank = np.count_nonzero(E > tol[:, None], axis=1)
        weak = np.count_nonzero(E < WEAK_RANK_TOL, axis=1)
        # matrix entropy, rank-normalised (matrix_entropy)
        p = E / total[:, None] + _EPS
        ent = -(p * np.log(p)).sum(axis=1) / np.log(rank + _EPS)
        ent = np.where(rank <= 1, 0.0, ent)
        ent = np.where(total > 0, ent, math.nan)
        # det X = 1 condition (detx): top-down log-products after rescaling Σλ to n
        logs = np.log(E[:, ::-1] * (n / total)[:, None])
        below = np.cumsum(logs, axis=1)[:, :-1] < 0
        first = np.where(below.any(axis=1), below.argmax(axis=1) + 1, n)
        valid = E[:, 0] < E[:, -1]
        detx_num = np.where(valid, first, 0)
        detx_val = np.where(valid, E[np.arange(B), np.clip(n - first, 0, n - 1)], math.nan)
    rows = []
    for b, f in enumerate(fits):
        lm, tot, a = float(lmax[b]), float(total[b]), float(alpha[b])
        rows.append({
            "N": int(N[b]), "M": int(M[b]), "Q": float(N[b]) / float(M[b]) if M[b] else math.nan,
            "rf": int(rf[b]), "num_evals": int(n), "lambda_max": lm, "spectral_norm": lm,
            "log_spectral_norm": float(log_lmax[b]), "norm": tot, "log_norm": float(log_norm[b]),
            "stable_rank": tot / lm if lm > 0 else math.nan, "alpha": a,
            "alpha_weighted": a * float(log_lmax[b]) if f.ok else math.nan,
            "log_alpha_norm": float(log_alpha_norm[b]), "xmin": f.xmin, "xmax": f.xmax, "D": f.D,
            "sigma": f.sigma, "num_pl_spikes": int(f.num_pl_spikes),
            "sv_max": math.sqrt(lm) if lm >= 0 else math.nan, "sv_min": math.sqrt(max(float(E[b, 0]), 0.0)),
            "matrix_rank": int(rank[b]), "rank_loss": int(n - rank[b]), "weak_rank_loss": int(weak[b]),
            "entropy": float(ent[b]), "detX_num": int(detx_num[b]), "detX_val": float(detx_val[b]),
            "warning": warning_for(a), "status": f.status,
        })
    return rows


def layer_metrics_many(evals: list[np.ndarray], fits: list[PowerLawFit], N: list[int], M: list[int],
                       rf: list[int]) -> list[dict[str, Any]]:
    """:func:`~nndiag.spectral.metrics.layer_metrics` of each ESD, same-length ones together.

    Parameters
    ----------
    evals : list of ndarray
        Eigenvalues of each layer (any order).
    fits : list of PowerLawFit
        Each layer's tail fit.
    N, M, rf : list of int
        Each layer's matrix sides and receptive field.

    Returns
    -------
    list of dict
        One per ESD, as ``layer_metrics(evals[i], fits[i], N[i], M[i], rf[i])``.

    Examples
    --------
    >>> from nndiag.spectral.powerlaw import fit_powerlaw
    >>> rng = np.random.default_rng(0)
    >>> evs = [np.sort(rng.pareto(2.0, 300) + 1) for _ in range(3)]
    >>> rows = layer_metrics_many(evs, [fit_powerlaw(e) for e in evs], [300] * 3, [300] * 3, [1] * 3)
    >>> rows[1]["lambda_max"] == float(evs[1][-1])
    True
    """
    out: list[dict[str, Any] | None] = [None] * len(evals)
    groups: dict[int, list[tuple[int, np.ndarray]]] = defaultdict(list)
    for j, ev in enumerate(evals):
        ev = np.asarray(ev, dtype=np.float64).ravel()
        if ev.size > 1 and not (ev[1:] >= ev[:-1]).all():
            ev = np.sort(ev)
        groups[ev.size].append((j, ev))
    for size, items in groups.items():
        idx = [j for j, _ in items]
        if size < 2 or len(items) == 1:
            for j, ev in items:
                out[j] = layer_metrics(ev, fits[j], N[j], M[j], rf[j])
            continue
        rows = _group_metrics(np.stack([ev for _, ev in items]), [fits[j] for j in idx],
                              np.array([N[j] for j in idx]), np.array([M[j] for j in idx]),
                              np.array([rf[j] for j in idx]))
        for j, row in zip(idx, rows, strict=True):
            out[j] = row
    return [r for r in out if r is not None]
