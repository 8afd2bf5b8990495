"""Power-law fits of several same-length ESDs at once (the layers of one eigen-solver stack).

:func:`fit_powerlaw_many` returns exactly what :func:`~nndiag.spectral.powerlaw.fit_powerlaw`
returns for each ESD (same alpha, xmin, D, bit for bit: every number comes from the same
element-wise operations, laid out one row per ESD), with the NumPy calls shared by the
group, which also makes pruning pay from 64 values (one at a time, ESDs under 256 values get
the full O(n²) search). ResNet56's 19 ESDs of 144 values: 9.7 → 2.8 ms, one thread. ``analyze``
uses it only with one thread: beside its solver worker the long NumPy calls held the GIL the
worker needed (two threads: 81.5 vs 72.5 ms for ResNet56).

Candidates are pruned as in :func:`~nndiag.spectral.powerlaw.ks_distances_pruned` (a lower
bound from eight points of each candidate's own tail, the exact D of the
:data:`~nndiag.spectral.powerlaw._EXACT_TOP` most promising as the bar) and the survivors'
D computed exactly; the argmin is that of the full computation. Options the batched path does
not cover (``fix_fingers``, ``xmin_range``, ``clip_top``, the small-sample rule, non-finite
or too few values) fall back to :func:`~nndiag.spectral.powerlaw.fit_powerlaw` per ESD.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import numpy as np

from nndiag.spectral.powerlaw import (
    _EXACT_TOP,
    _TAIL_POINTS,
    EVALS_THRESH,
    PowerLawFit,
    _failed,
    _with,
    fit_powerlaw,
)

#: Elements of one block of the exact-D computation (bounds the temporaries to ~16 MiB).
_BLOCK = 1 << 21
#: Fewest values for which candidates are pruned (lower than the single-ESD
#: :data:`~nndiag.spectral.powerlaw.PRUNE_MIN`: here the pruning's NumPy calls are shared).
PRUNE_MIN_MANY = 64
#: An ESD with more survivors than ``max(_LOOSE, _LOOSE_FRACTION·n)`` after the first pruning
#: pass is fitted on its own (the single-ESD search refines its bounds on finer grids).
_LOOSE = 256
_LOOSE_FRACTION = 0.25


def _exact_d(logx: np.ndarray, alphas: np.ndarray, off: np.ndarray, rows: np.ndarray,
             cand: np.ndarray) -> np.ndarray:
    """Exact KS distances of candidates ``cand`` of ESDs ``rows`` (pairs, ``α > 1``), with the
    element-wise operations of :func:`~nndiag.spectral.powerlaw.ks_distances` on each ESD's
    own indices (``off`` values of a row are below the threshold: index ``k`` there is
    ``k − off``)."""
    n = logx.shape[1]
    out = np.empty(cand.size)
    # pairs ordered by candidate index, in eight blocks or more, so that each block starts near
    # its own xmin and the masked (k < i) part stays small
    order = np.argsort(cand, kind="stable")
    step = max(1, min(_BLOCK // n, max(64, cand.size // 8)))
    for b0 in range(0, cand.size, step):
        u = order[b0 : b0 + step]
        r, i = rows[u], cand[u]
        o = off[r].astype(np.float64)
        lo = int(i[0])
        k = np.arange(lo, n, dtype=np.float64)
        # (rows taken whole, then sliced: indexing with an array and a slice at once was 7× slower)
        work = np.take(logx, r, axis=0)[:, lo:]
        work -= logx[r, i][:, None]
        work *= (1.0 - alphas[r, i])[:, None]
        np.minimum(work, 0.0, out=work)
        np.exp(work, out=work)
        inv = 1.0 / (n - i).astype(np.float64)
        work += (k[None, :] - o[:, None]) * inv[:, None]
        np.subtract((1.0 + (i - o) * inv)[:, None], work, out=work)
        np.abs(work, out=work)
        np.copyto(work, 0.0, where=k[None, :] < i[:, None])
        out[u] = work.max(axis=1)
    return out


def _tail_bounds(logx: np.ndarray, alphas: np.ndarray) -> np.ndarray:
    """Lower bounds of every candidate's D from eight points of its own tail, ``(L, n−1)``, as
    :func:`~nndiag.spectral.powerlaw._tail_bounds` (meaningful where a candidate is admissible)."""
    L, n = logx.shape
    cand = np.arange(n - 1)
    ni = (n - cand).astype(np.float64)
    frac = np.arange(1, _TAIL_POINTS + 1, dtype=np.float64)[:, None] / _TAIL_POINTS
    k = cand[None, :] + np.floor(frac * (ni[None, :] - 1.0)).astype(np.int64)  # (points, candidates)
    rel = logx[:, k] - logx[:, None, :-1]  # (L, points, candidates)
    rel *= (1.0 - alphas)[:, None, :]
    F = np.expm1(rel, out=rel)
    F += ((k - cand[None, :]) / ni[None, :])[None]
    np.abs(F, out=F)
    return F.max(axis=1)


def _fit_group(ev: np.ndarray, off: np.ndarray, min_tail: int) -> list[PowerLawFit | None]:
    """Fits of the ``(L, n)`` sorted rows of ``ev`` whose first ``off`` values (per row) are at
    or below the threshold; None for a row left to :func:`~nndiag.spectral.powerlaw.fit_powerlaw`.

    Row ``r``'s fit is that of ``ev[r, off[r]:]``: candidate ``i`` here is its candidate
    ``i − off[r]``, with the same tail (``n − i`` values) and the same sums.
    """
    L, n = ev.shape
    idx = np.arange(n)
    below = idx[None, :] < off[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        logx = np.log(np.where(below, 1.0, ev))  # (values below the threshold never enter)
        suffix = np.cumsum(logx[:, ::-1], axis=1)[:, ::-1]  # Σ_{k≥i} ln x_k, row by row
        tail = (n - idx).astype(np.float64)
        s = suffix[:, :-1] - tail[:-1] * logx[:, :-1]
        alphas = 1.0 + tail[:-1] / s
    ok = ~below[:, :-1]
    if min_tail > 1:
        ok &= tail[:-1] >= min_tail
    D = np.full((L, n - 1), np.inf)
    good = ok & np.isfinite(alphas) & (alphas > 1.0)
    D[ok & (alphas <= 1.0)] = 1.0  # as ks_distances marks them
    loose = np.zeros(L, dtype=bool)
    if n >= PRUNE_MIN_MANY:
        with np.errstate(over="ignore", invalid="ignore"):
            lb = np.where(good, _tail_bounds(logx, alphas), np.inf)
        m = min(_EXACT_TOP, n - 1)
        top = np.argpartition(lb, m - 1, axis=1)[:, :m]
        rows = np.repeat(np.arange(L), m)
        cand = top.reshape(-1)
        keep = np.isfinite(lb[rows, cand])
        rows, cand = rows[keep], cand[keep]
        d_top = _exact_d(logx, alphas, off, rows, cand)
        best = np.full(L, np.inf)
        np.minimum.at(best, rows, d_top)
        D[rows, cand] = d_top
        survive = good & (lb <= (best * (1 + 1e-9) + 1e-15)[:, None])
        survive[rows, cand] = False  # computed already
        # an ESD whose tail bounds left many candidates goes through the single-ESD search (its
        # finer fixed-grid bounds prune those)
        loose = survive.sum(axis=1) > max(_LOOSE, _LOOSE_FRACTION * n)
        survive[loose] = False
    else:
        survive = good
    rows, cand = np.nonzero(survive)
    D[rows, cand] = _exact_d(logx, alphas, off, rows, cand)
    fits: list[PowerLawFit | None] = []
    for r in range(L):
        row = np.where(ok[r], D[r], np.inf)
        n_fit = int(n - off[r])
        if loose[r]:
            fits.append(None)
        elif not np.isfinite(row).any():
            fits.append(_failed("no candidate gave a finite fit (all tail values equal?)", n_fit))
        else:
            i = int(np.argmin(row))
            a = float(alphas[r, i])
            if not math.isfinite(a) or a <= 1.0:
                fits.append(_failed(f"fitted exponent {a:.3g} is not > 1", n_fit))
                continue
            fits.append(PowerLawFit(alpha=a, xmin=float(ev[r, i]), xmax=float(ev[r, -1]), D=float(D[r, i]),
                                    sigma=float((a - 1.0) / math.sqrt(n - i)), num_pl_spikes=0, n_fit=n_fit))
    return fits


def fit_powerlaw_many(evals: list[np.ndarray], **kw: Any) -> list[PowerLawFit]:
    """:func:`~nndiag.spectral.powerlaw.fit_powerlaw` of each ESD, same-length ones together.

    Parameters
    ----------
    evals : list of ndarray
        Eigenvalues of each layer (any order).
    **kw
        :func:`~nndiag.spectral.powerlaw.fit_powerlaw`'s options.

    Returns
    -------
    list of PowerLawFit
        One per ESD, equal to ``fit_powerlaw(ev, **kw)``.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> evs = [(1 - rng.random(800)) ** (-1 / a) for a in (1.5, 2.0, 3.0)]  # density exponents 2.5, 3, 4
    >>> [round(f.alpha, 1) for f in fit_powerlaw_many(evs)]
    [2.4, 3.0, 3.9]
    """
    thresh = kw.get("thresh", EVALS_THRESH)
    plain = (kw.get("fix_fingers") is None and kw.get("xmin_range") is None and not kw.get("clip_top")
             and not kw.get("keep_candidates"))
    out: list[PowerLawFit | None] = [None] * len(evals)
    groups: dict[int, list[tuple[int, np.ndarray, int]]] = defaultdict(list)
    for j, ev in enumerate(evals):
        ev = np.sort(np.asarray(ev, dtype=np.float64).ravel())
        off = int(np.searchsorted(ev, thresh, side="right"))  # values ≤ thresh are left out
        small = kw.get("small_n") == "ww" and ev.size - off < 20
        if not plain or small or ev.size - off < 2 or not np.isfinite(ev).all():
            out[j] = fit_powerlaw(ev, **kw)
        else:
            groups[ev.size].append((j, ev, off))
    for items in groups.values():
        if len(items) == 1:
            j, ev, _ = items[0]
            out[j] = fit_powerlaw(ev, **kw)
            continue
        fits = _fit_group(np.stack([ev for _, ev, _ in items]), np.array([o for _, _, o in items]),
                          int(kw.get("min_tail", 1)))
        for (j, ev, _), f in zip(items, fits, strict=True):
            if f is None:
                f = fit_powerlaw(ev, **kw)
            elif f.ok:
                f = _with(f, num_pl_spikes=int(np.count_nonzero(ev >= f.xmin)))
            out[j] = f
    return [f for f in out if f is not None]
