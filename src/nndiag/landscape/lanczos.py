"""Lanczos iteration for symmetric operators given only as matrix-vector products.

:func:`lanczos_tridiag` builds the tridiagonal matrix ``T`` (and the basis) with full
or partial reorthogonalisation; :func:`eigsh` runs it until the requested extreme
eigenpairs (largest, and optionally smallest) have small residuals
``‖A y − θ y‖ = |β_m s_{m,i}|`` and returns Ritz pairs, residuals and counts.

Examples
--------
>>> import torch
>>> A = torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64))
>>> r = eigsh(lambda v: A @ v, 10, top_k=2, dtype=torch.float64)
>>> [round(float(x), 6) for x in r.eigenvalues]
[10.0, 9.0]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from nndiag.errors import InputError

MatVec = Callable[[torch.Tensor], torch.Tensor]
#: A restarted run (:func:`eigsh` within a bounded basis) may take this many times ``max_iter`` products.
RESTART_PRODUCTS = 4


@dataclass(frozen=True)
class Tridiag:
    """The output of a Lanczos run.

    Attributes
    ----------
    alpha, beta : ndarray
        Diagonal (length m) and off-diagonal (length m − 1) of ``T``.
    beta_last : float
        The norm of the final residual vector (``β_m``), for residual bounds.
    basis : torch.Tensor or None
        The m Lanczos vectors as rows (kept when asked).
    restarts : int
        How many times the Krylov space was exhausted and restarted with a new
        random vector orthogonal to the basis.
    """

    alpha: np.ndarray
    beta: np.ndarray
    beta_last: float
    basis: torch.Tensor | None
    restarts: int

    def eig(self) -> tuple[np.ndarray, np.ndarray]:
        """Ritz values (ascending) and the eigenvectors of ``T`` (columns)."""
        from scipy.linalg import eigh_tridiagonal

        if len(self.alpha) == 1:
            return self.alpha.copy(), np.ones((1, 1))
        return eigh_tridiagonal(self.alpha, self.beta)


def _random_unit(dim: int, generator: torch.Generator, dtype: torch.dtype, device: torch.device,
                 rademacher: bool = False) -> torch.Tensor:
    if rademacher:
        v = torch.randint(0, 2, (dim,), generator=generator, dtype=torch.int64).to(dtype) * 2 - 1
    else:
        v = torch.randn(dim, generator=generator, dtype=torch.float64).to(dtype)
    v = v.to(device)
    return v / torch.linalg.vector_norm(v)


def lanczos_tridiag(
    matvec: MatVec,
    v0: torch.Tensor,
    steps: int,
    *,
    reorth: str | int = "full",
    keep_basis: bool = False,
    generator: torch.Generator | None = None,
    callback: Callable[[int, np.ndarray, np.ndarray, float], bool] | None = None,
) -> Tridiag:
    """Run up to ``steps`` Lanczos iterations from ``v0``.

    Parameters
    ----------
    matvec : callable
        ``v -> A v`` for a symmetric ``A``.
    v0 : torch.Tensor
        Start vector (normalised here).
    steps : int
        Maximum Krylov dimension m.
    reorth : "full", "none" or int
        Reorthogonalise each new vector against all previous ones (twice, classical
        Gram–Schmidt), none, or the last ``reorth`` ones (LLA's setting is 10).
    keep_basis : bool
        Return the basis (needed for eigenvectors).
    generator : torch.Generator, optional
        For restart vectors when the Krylov space is exhausted.
    callback : callable, optional
        ``callback(j, alpha, beta, beta_j) -> stop`` after each step.

    Returns
    -------
    Tridiag
    """
    dim = v0.numel()
    steps = int(min(steps, dim))
    if steps < 1:
        raise InputError(f"Lanczos needs at least one step, got {steps}")
    full = reorth == "full"
    window = None if full else (0 if reorth == "none" else int(reorth))
    store = full or keep_basis or bool(window)
    dtype, device = v0.dtype, v0.device
    # a window without the basis kept needs only its last ``window`` vectors: a ring buffer
    ring = bool(window) and not full and not keep_basis and window < steps
    Q = torch.empty((window if ring else steps, dim), dtype=dtype, device=device) if store else None
    gen = generator or torch.Generator().manual_seed(0)
    alpha: list[float] = []
    beta: list[float] = []
    v = v0 / torch.linalg.vector_norm(v0)
    v_prev = torch.zeros_like(v)
    b_prev = 0.0
    restarts = 0
    scale = 0.0
    b = 0.0
    for j in range(steps):
        if Q is not None:
            Q[j % len(Q) if ring else j] = v
        w = matvec(v)
        a = float(torch.dot(w, v))
        w = w - a * v - b_prev * v_prev
        if Q is not None and (full or window):
            # (in the ring the window's vectors are its rows in another order: same projection)
            block = Q[:min(j + 1, len(Q))] if ring else Q[(0 if full else max(0, j + 1 - window)):j + 1]
            for _ in range(2):
                w = w - block.T @ (block @ w)
        alpha.append(a)
        b = float(torch.linalg.vector_norm(w))
        scale = max(scale, abs(a), b)
        if callback is not None and callback(j, np.asarray(alpha), np.asarray(beta), b):
            break
        if j == steps - 1:
            break
        if b <= 1e-10 * max(scale, 1e-30):
            # invariant subspace: continue with a fresh direction orthogonal to the basis
            restarts += 1
            w = _random_unit(dim, gen, dtype, device)
            if Q is not None:
                held = Q[:min(j + 1, len(Q))]
                for _ in range(2):
                    w = w - held.T @ (held @ w)
            w = w / torch.linalg.vector_norm(w)
            beta.append(0.0)
            v_prev, v, b_prev = v, w, 0.0
            continue
        beta.append(b)
        v_prev, v, b_prev = v, w / b, b
    m = len(alpha)
    basis = Q[:m] if (keep_basis and Q is not None) else None
    return Tridiag(np.asarray(alpha), np.asarray(beta[: m - 1]), b, basis, restarts)


@dataclass(frozen=True)
class EigResult:
    """Extreme eigenpairs found by :func:`eigsh`.

    Attributes
    ----------
    eigenvalues : ndarray
        The ``top_k`` largest Ritz values, descending.
    eigenvectors : torch.Tensor or None
        Their unit Ritz vectors as rows ``(top_k, dim)``.
    residuals : ndarray
        ``‖A y − θ y‖`` for each (from the Lanczos relation).
    bottom_eigenvalues, bottom_eigenvectors, bottom_residuals
        The same for the ``bottom_k`` smallest, ascending.
    iterations : int
        Lanczos steps (= matrix-vector products).
    converged : bool
        Whether every requested residual met the tolerance.
    tridiag : (ndarray, ndarray) or None
        The run's ``T`` (diagonal, off-diagonal): with a random unit start vector it is
        also one stochastic Lanczos quadrature run (:func:`~nndiag.landscape.density.slq`).
    """

    eigenvalues: np.ndarray
    eigenvectors: torch.Tensor | None
    residuals: np.ndarray
    bottom_eigenvalues: np.ndarray
    bottom_eigenvectors: torch.Tensor | None
    bottom_residuals: np.ndarray
    iterations: int
    converged: bool
    tridiag: tuple[np.ndarray, np.ndarray] | None = None


def eigsh(
    matvec: MatVec,
    dim: int,
    *,
    top_k: int = 1,
    bottom_k: int = 0,
    tol: float = 1e-4,
    max_iter: int | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    vectors: bool = True,
    v0: torch.Tensor | None = None,
    min_iter: int = 0,
    max_basis: int | None = None,
) -> EigResult:
    """Extreme eigenpairs of a symmetric operator by Lanczos with full reorthogonalisation.

    Parameters
    ----------
    matvec : callable
        ``v -> A v``.
    dim : int
        Size of ``A``.
    top_k, bottom_k : int
        How many largest / smallest eigenpairs.
    tol : float
        Stop when every requested Ritz pair has ``‖A y − θ y‖ ≤ tol · |θ_max|``
        (|θ_max| the largest Ritz value in magnitude). The eigenvalue error is at most
        the residual and usually about residual² / gap.
    max_iter : int, optional
        Maximum Lanczos steps (default ``min(dim, max(100, 20·(top_k + bottom_k)))``).
    generator : torch.Generator, optional
        Seeds the start vector.
    dtype, device
        Of the Lanczos vectors.
    vectors : bool
        Return Ritz vectors.
    v0 : torch.Tensor, optional
        Start vector (random Gaussian otherwise).
    min_iter : int
        Take at least this many steps even once converged (so that the run can also serve
        as an SLQ run of that length, :attr:`EigResult.tridiag`).
    max_basis : int, optional
        Most vectors to store (default: as many as fit in
        :data:`~nndiag._utils.memory.BASIS_FRACTION` of the available memory). When the
        ``max_iter`` steps would not fit, the thick-restart scheme of
        :func:`~nndiag.landscape.restarted.restarted_eigsh` runs instead (more products,
        no :attr:`EigResult.tridiag`, ``min_iter`` ignored, at most
        :data:`RESTART_PRODUCTS` ``· max_iter`` products).

    Returns
    -------
    EigResult
    """
    if top_k < 0 or bottom_k < 0 or top_k + bottom_k < 1:
        raise InputError(f"ask for at least one eigenvalue (top_k={top_k}, bottom_k={bottom_k})")
    if top_k > dim or bottom_k > dim:
        raise InputError(f"top_k={top_k} / bottom_k={bottom_k} exceed the operator size {dim}")
    if tol <= 0:
        raise InputError(f"tol must be positive, got {tol}")
    device = torch.device(device)
    gen = generator or torch.Generator().manual_seed(0)
    max_iter = int(min(dim, max(max_iter or max(100, 20 * (top_k + bottom_k)), min_iter)))
    start = v0.to(device=device, dtype=dtype) if v0 is not None else _random_unit(dim, gen, dtype, device)
    need = top_k + bottom_k
    if max_basis is None:
        from nndiag._utils.memory import vectors_that_fit

        max_basis = vectors_that_fit(dim, dtype, device)
    if max_iter + 1 > max_basis:  # (the basis, plus a vector or two of working space)
        from nndiag.landscape.restarted import restarted_eigsh

        return restarted_eigsh(matvec, dim, start, top_k=top_k, bottom_k=bottom_k, tol=tol,
                               max_iter=RESTART_PRODUCTS * max_iter, max_basis=max_basis - 1, generator=gen,
                               vectors=vectors)

    def done(j: int, alpha: np.ndarray, beta: np.ndarray, b: float) -> bool:
        m = j + 1
        if (m < min(need + 1, dim) or m < min_iter) and m < dim:
            return False
        from scipy.linalg import eigh_tridiagonal

        theta, S = (alpha.copy(), np.ones((1, 1))) if m == 1 else eigh_tridiagonal(alpha, beta[: m - 1])
        res = np.abs(b * S[-1, :])
        scale = max(np.max(np.abs(theta)), 1e-30)
        idx = list(range(m - top_k, m)) + list(range(bottom_k))
        return bool(np.all(res[idx] <= tol * scale))

    tri = lanczos_tridiag(matvec, start, max_iter, reorth="full", keep_basis=vectors,
                          generator=gen, callback=done)
    theta, S = tri.eig()
    m = len(theta)
    res = np.abs(tri.beta_last * S[-1, :])
    scale = max(float(np.max(np.abs(theta))), 1e-30)
    top_idx = np.arange(m - 1, m - 1 - min(top_k, m), -1)
    bot_idx = np.arange(min(bottom_k, m))
    converged = bool(np.all(res[np.concatenate([top_idx, bot_idx])] <= tol * scale))

    def vecs(idx: np.ndarray) -> torch.Tensor | None:
        if not vectors or tri.basis is None or len(idx) == 0:
            return None
        Sk = torch.as_tensor(S[:, idx].T.copy(), dtype=tri.basis.dtype, device=tri.basis.device)
        Y = Sk @ tri.basis
        return Y / torch.linalg.vector_norm(Y, dim=1, keepdim=True)

    return EigResult(
        eigenvalues=theta[top_idx].copy(),
        eigenvectors=vecs(top_idx),
        residuals=res[top_idx].copy(),
        bottom_eigenvalues=theta[bot_idx].copy(),
        bottom_eigenvectors=vecs(bot_idx),
        bottom_residuals=res[bot_idx].copy(),
        iterations=m,
        converged=converged,
        tridiag=(tri.alpha.copy(), tri.beta.copy()),
    )
