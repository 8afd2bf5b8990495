"""Restarted Lanczos for extreme eigenpairs within a bounded number of stored vectors.

Full reorthogonalisation keeps every Lanczos vector: 100 steps on a 124M-parameter model
(GPT-2 small, float32) would hold 50 GB. When the memory allows only ``m`` vectors,
:func:`restarted_eigsh` runs the thick-restart scheme of Wu & Simon (2000), in the
Krylov–Schur form of Stewart (2001) for symmetric operators:

* the basis ``Q`` (at most ``m`` orthonormal rows) grows by one vector per product, each
  orthogonalised twice against all of ``Q`` (classical Gram–Schmidt), and the projected
  matrix ``H = QᵀAQ`` is kept explicitly (its new column is the vector of coefficients);
* ``A Q = Q H + r e_lastᵀ`` holds throughout, so a Ritz pair ``(θ, Q s)`` of ``H`` has
  residual ``‖r‖·|s_last|`` with no further product;
* when ``Q`` is full, the wanted Ritz vectors (and some next to them) replace it,
  ``H`` becomes the diagonal of their Ritz values, and the residual direction ``r/‖r‖`` is
  the next vector: its coefficients against the kept vectors (``‖r‖·s_last``) arrive
  with the next product.

The result is the same kind as :func:`~nndiag.landscape.lanczos.eigsh`'s (it is called
from there when the unrestarted run would not fit), at the cost of more products.
"""

from __future__ import annotations

import numpy as np
import torch

from nndiag.errors import InputError
from nndiag.landscape.lanczos import EigResult, MatVec


def _wanted(theta: np.ndarray, top_k: int, bottom_k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (into ascending ``theta``) of the top (descending) and bottom (ascending) pairs."""
    m = len(theta)
    return np.arange(m - 1, m - 1 - min(top_k, m), -1), np.arange(min(bottom_k, m))


def _kept(n: int, top_k: int, bottom_k: int, keep: int) -> np.ndarray:
    """The ``keep`` Ritz indices kept at a restart: the wanted ends, shared in proportion."""
    need = top_k + bottom_k
    extra = keep - need
    top_extra = extra * top_k // need if need else 0
    bot_extra = extra - top_extra if bottom_k else 0
    top_extra = extra - bot_extra
    top = list(range(n - 1, n - 1 - (top_k + top_extra), -1)) if top_k else []
    bottom = list(range(bottom_k + bot_extra)) if bottom_k else []
    return np.array(sorted(set(top) | set(bottom)), dtype=np.int64)


def restarted_eigsh(
    matvec: MatVec,
    dim: int,
    start: torch.Tensor,
    *,
    top_k: int,
    bottom_k: int,
    tol: float,
    max_iter: int,
    max_basis: int,
    generator: torch.Generator,
    vectors: bool = True,
) -> EigResult:
    """Extreme eigenpairs with at most ``max_basis`` stored vectors (see the module docstring).

    Parameters
    ----------
    matvec : callable
        ``v -> A v`` for a symmetric ``A``.
    dim : int
        Size of ``A``.
    start : torch.Tensor
        Start vector (its dtype and device are the basis's).
    top_k, bottom_k, tol
        As :func:`~nndiag.landscape.lanczos.eigsh`.
    max_iter : int
        Most products.
    max_basis : int
        Most stored vectors (at least ``top_k + bottom_k + 2``).
    generator : torch.Generator
        For a fresh direction when the Krylov space is exhausted.
    vectors : bool
        Return Ritz vectors.

    Returns
    -------
    EigResult
        ``iterations`` counts products; ``tridiag`` is None (a restarted run is no SLQ run).
    """
    from scipy.linalg import eigh

    from nndiag.landscape.lanczos import _random_unit

    need = top_k + bottom_k
    m = int(min(max_basis, dim))
    if m < min(need + 2, dim):
        raise InputError(f"the memory holds {max_basis} vectors of {dim:,} values, too few to restart Lanczos for "
                         f"{need} eigenpairs (it needs {need + 2}); ask for fewer, or free memory")
    keep = min(m - 2, max(need + 1, (m + need) // 2))  # Ritz vectors carried over a restart
    dtype, device = start.dtype, start.device
    Q = torch.empty((m, dim), dtype=dtype, device=device)
    H = np.zeros((m, m))
    q = start / torch.linalg.vector_norm(start)
    n = products = restarts = 0
    b, theta, S = 0.0, np.zeros(0), np.zeros((0, 0))
    converged = False
    while True:
        Q[n] = q
        w = matvec(q)
        products += 1
        block = Q[:n + 1]
        h = block @ w
        w = w - block.T @ h
        h2 = block @ w  # second pass: orthogonal to working precision
        w = w - block.T @ h2
        h = (h + h2).double().cpu().numpy()
        H[:n + 1, n] = h
        H[n, :n + 1] = h
        n += 1
        b = float(torch.linalg.vector_norm(w))
        theta, S = eigh(H[:n, :n])
        res = b * np.abs(S[-1, :])
        scale = max(float(np.max(np.abs(theta))), 1e-30)
        top, bottom = _wanted(theta, top_k, bottom_k)
        idx = np.concatenate([top, bottom])
        if n >= min(need, dim) and np.all(res[idx] <= tol * scale):
            converged = True
            break
        if products >= max_iter or n >= dim:
            break
        if b <= 1e-10 * scale:  # an invariant subspace: continue with a fresh orthogonal direction
            restarts += 1
            w = _random_unit(dim, generator, dtype, device)
            for _ in range(2):
                w = w - Q[:n].T @ (Q[:n] @ w)
            b = float(torch.linalg.vector_norm(w))
        if n == m:  # thick restart: keep the wanted Ritz vectors and their neighbours
            kidx = _kept(n, top_k, bottom_k, keep)
            Sk = torch.as_tensor(S[:, kidx].T.copy(), dtype=dtype, device=device)
            Q[:len(kidx)] = Sk @ Q[:n]  # (a keep × m product into fresh memory, then copied)
            H[:] = 0.0
            H[np.arange(len(kidx)), np.arange(len(kidx))] = theta[kidx]
            n = len(kidx)
        q = w / b
    top, bottom = _wanted(theta, top_k, bottom_k)
    res = b * np.abs(S[-1, :])

    def vecs(sel: np.ndarray) -> torch.Tensor | None:
        if not vectors or len(sel) == 0:
            return None
        Y = torch.as_tensor(S[:, sel].T.copy(), dtype=dtype, device=device) @ Q[:n]
        return Y / torch.linalg.vector_norm(Y, dim=1, keepdim=True)

    return EigResult(
        eigenvalues=theta[top].copy(), eigenvectors=vecs(top), residuals=res[top].copy(),
        bottom_eigenvalues=theta[bottom].copy(), bottom_eigenvectors=vecs(bottom),
        bottom_residuals=res[bottom].copy(), iterations=products, converged=converged, tridiag=None,
    )
