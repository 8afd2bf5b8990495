"""Randomisation test: the ESD of a layer against that of its element-shuffled matrix.

Shuffling the entries of ``W`` destroys correlations but keeps the entry
distribution, so the shuffled ESD follows Marchenko–Pastur unless a few huge entries
dominate ("correlation traps"). WeightWatcher's ``rand_distance`` is a
Jensen–Shannon "distance" computed on the two *sorted eigenvalue vectors* as if they
were probability vectors; here it is the Jensen–Shannon distance (base 2, in [0, 1])
between the two *densities*: histograms of ``log10 λ`` on ``√n`` common bins.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from nndiag.spectral.esd import eigvals_batched
from nndiag.spectral.mp import fit_mp


def js_distance(a: np.ndarray, b: np.ndarray, bins: int | None = None, thresh: float = 1e-5) -> float:
    """Jensen–Shannon distance (base 2) between the log10 densities of two positive samples.

    Histograms on common bins (default ``√n`` of them, at least 5, so that sampling
    noise stays small for small layers).
    """
    la = np.log10(a[a > thresh])
    lb = np.log10(b[b > thresh])
    if la.size == 0 or lb.size == 0:
        return math.nan
    if bins is None:
        bins = max(5, int(math.sqrt(min(la.size, lb.size))))
    lo, hi = min(la.min(), lb.min()), max(la.max(), lb.max())
    if hi <= lo:
        return 0.0
    p, _ = np.histogram(la, bins=bins, range=(lo, hi))
    q, _ = np.histogram(lb, bins=bins, range=(lo, hi))
    p = p / p.sum()
    q = q / q.sum()
    m = (p + q) / 2

    def kl(x: np.ndarray) -> float:
        nz = x > 0
        return float(np.sum(x[nz] * np.log2(x[nz] / m[nz])))

    return math.sqrt(max(0.0, (kl(p) + kl(q)) / 2))


def shuffled_evals(mats: torch.Tensor, rng: np.random.Generator, precision: str = "auto") -> np.ndarray:
    """Eigenvalues of the matrices with their entries shuffled (each matrix on its own)."""
    b, n, m = mats.shape
    flat = mats.reshape(b, -1)
    perm = torch.as_tensor(np.argsort(rng.random((b, n * m)), axis=1))
    shuf = torch.gather(flat, 1, perm).reshape(b, n, m)
    return np.sort(eigvals_batched(shuf, precision).cpu().numpy().reshape(-1))


def randomized_metrics(mats: torch.Tensor, evals: np.ndarray, scale: float, N: int, M: int,
                       rng: np.random.Generator, precision: str = "auto") -> dict[str, float]:
    """``rand_distance``, ``num_traps``, ``rand_lambda_max``, ``ww_softrank`` for one layer."""
    rev = shuffled_evals(mats, rng, precision) * scale
    mp = fit_mp(rev, N / M, M)
    lmax = float(np.max(evals)) if evals.size else math.nan
    return {
        "rand_distance": js_distance(evals, rev),
        "num_traps": int(mp.num_spikes),
        "rand_lambda_max": float(rev[-1]),
        "ww_softrank": float(rev[-1]) / lmax if lmax > 0 else math.nan,
    }
