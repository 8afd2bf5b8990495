"""Spectral density by stochastic Lanczos quadrature (SLQ).

Each run starts Lanczos from a random unit vector ``v``; the Ritz values ``θ_j`` and
the squared first components ``τ_j`` of ``T``'s eigenvectors are a quadrature for
``vᵀ f(A) v``, i.e. a discrete spectral measure with total mass 1 whose expectation
over ``v`` is the eigenvalue distribution of ``A`` (each eigenvalue weight ``1/dim``).
The density is the average over runs, smoothed by a Gaussian of width ``sigma``.

Examples
--------
>>> import torch
>>> A = torch.diag(torch.linspace(-1, 1, 50, dtype=torch.float64))
>>> d = slq(lambda v: A @ v, 50, n_runs=2, steps=20, dtype=torch.float64)
>>> round(float(d.weights.sum()), 6)
2.0
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from nndiag.errors import InputError
from nndiag.landscape.lanczos import MatVec, Tridiag, _random_unit, lanczos_tridiag


@dataclass(frozen=True)
class Density:
    """SLQ nodes and weights, and the settings they came from.

    Attributes
    ----------
    nodes : ndarray, shape (n_runs, steps)
        Ritz values of each run (padded with NaN when a run stopped early).
    weights : ndarray, shape (n_runs, steps)
        Their quadrature weights (each run's weights sum to 1; NaN-padded).
    settings : dict
        ``n_runs``, ``steps``, ``reorth``, ``seed``.
    """

    nodes: np.ndarray
    weights: np.ndarray
    settings: dict[str, Any] = field(default_factory=dict)

    def pooled(self) -> tuple[np.ndarray, np.ndarray]:
        """All runs' nodes and weights, weights divided by the number of runs (total 1)."""
        ok = np.isfinite(self.nodes)
        return self.nodes[ok], self.weights[ok] / self.nodes.shape[0]

    def grid(self, n: int = 1000, sigma: float | None = None, pad: float = 0.05
             ) -> tuple[np.ndarray, np.ndarray, float]:
        """The smoothed density on a regular grid: ``(x, density, sigma)``.

        ``sigma`` defaults to 1% of the spectral range (the grid spans it plus ``pad``).
        The density integrates to ~1.
        """
        x0, w0 = self.pooled()
        lo, hi = float(x0.min()), float(x0.max())
        span = max(hi - lo, 1e-12)
        sigma = float(sigma) if sigma is not None else 0.01 * span
        x = np.linspace(lo - pad * span - 3 * sigma, hi + pad * span + 3 * sigma, n)
        dens = np.zeros_like(x)
        for c in range(0, len(x0), 256):
            d = (x[:, None] - x0[None, c:c + 256]) / sigma
            dens += (np.exp(-0.5 * d * d) * w0[None, c:c + 256]).sum(1)
        return x, dens / (sigma * np.sqrt(2 * np.pi)), sigma

    def cdf(self, t: np.ndarray | float) -> np.ndarray:
        """The estimated fraction of eigenvalues ≤ ``t``."""
        x0, w0 = self.pooled()
        t = np.atleast_1d(np.asarray(t, dtype=float))
        return (w0[None, :] * (x0[None, :] <= t[:, None])).sum(1)

    def plot(self, ax: Any = None, log: bool = True) -> Any:
        """Plot the smoothed density (log scale by default); returns the Figure."""
        from nndiag.landscape.plots import plot_density

        x, d, _ = self.grid()
        return plot_density(x, d, ax=ax, log=log)


def slq(
    matvec: MatVec,
    dim: int,
    *,
    n_runs: int = 3,
    steps: int = 80,
    reorth: str | int = "full",
    generator: torch.Generator | None = None,
    seed: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    first: tuple[np.ndarray, np.ndarray] | None = None,
    max_basis: int | None = None,
) -> Density:
    """Stochastic Lanczos quadrature of a symmetric operator.

    Parameters
    ----------
    matvec : callable
        ``v -> A v``.
    dim : int
        Size of ``A``.
    n_runs : int
        Independent start vectors (Rademacher, normalised).
    steps : int
        Lanczos steps per run (capped at ``dim``).
    reorth : "full", "none" or int
        Reorthogonalisation (LLA uses the last 10 vectors; the default is full).
    generator : torch.Generator, optional
        Random source (else seeded by ``seed``).
    first : (ndarray, ndarray), optional
        A Lanczos run already made with this ``reorth`` from a normalised Rademacher start
        (the diagonal and off-diagonal of its ``T``, at least ``steps`` long, e.g. the
        eigenvalue run of :func:`~nndiag.landscape.lanczos.eigsh` with ``min_iter=steps``):
        it is used as the first run, truncated to ``steps`` (Lanczos is incremental, so its
        leading ``steps × steps`` block is exactly that run), and ``n_runs − 1`` new runs follow.
    max_basis : int, optional
        Most Lanczos vectors to store (default: as many as fit in
        :data:`~nndiag._utils.memory.BASIS_FRACTION` of the available memory). Full
        reorthogonalisation over more steps than that falls back to a window of that many
        vectors (recorded in ``settings["reorth"]``, with ``settings["reorth_limited_by"] =
        "memory"``).

    Returns
    -------
    Density
    """
    if n_runs < 1 or steps < 1:
        raise InputError(f"SLQ needs n_runs >= 1 and steps >= 1 (got {n_runs}, {steps})")
    gen = generator or torch.Generator().manual_seed(0 if seed is None else int(seed))
    device = torch.device(device)
    steps = min(steps, dim)
    if max_basis is None:
        from nndiag._utils.memory import vectors_that_fit

        max_basis = vectors_that_fit(dim, dtype, device)
    limited = reorth == "full" and steps > max_basis - 1
    if limited:
        reorth = max(2, max_basis - 1)  # the last vectors, in a ring (plus one of working space)
    nodes = np.full((n_runs, steps), np.nan)
    weights = np.full((n_runs, steps), np.nan)
    shared = first is not None and len(first[0]) >= steps
    for r in range(n_runs):
        if r == 0 and shared:
            assert first is not None
            tri = Tridiag(first[0][:steps], first[1][:steps - 1], 0.0, None, 0)
        else:
            v0 = _random_unit(dim, gen, dtype, device, rademacher=True)
            tri = lanczos_tridiag(matvec, v0, steps, reorth=reorth, generator=gen)
        theta, S = tri.eig()
        m = len(theta)
        nodes[r, :m] = theta
        weights[r, :m] = S[0, :] ** 2
    settings = {"n_runs": n_runs, "steps": steps, "reorth": reorth, "seed": seed,
                "first_run_shared": bool(shared)}
    if limited:
        settings["reorth_limited_by"] = "memory"
    return Density(nodes, weights, settings)
