"""Krylov methods within a bounded number of stored vectors: restarted Lanczos, windowed SLQ."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from nndiag._utils.memory import available_bytes, vectors_that_fit
from nndiag.errors import InputError
from nndiag.landscape import eigsh, hessian_spectrum, slq
from nndiag.landscape.lanczos import lanczos_tridiag

F64 = torch.float64


def _sym(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64)).Q
    ev = torch.cat([torch.linspace(-3, 5, n - 4, dtype=F64), torch.tensor([9.0, 9.5, 12.0, 20.0], dtype=F64)])
    return (Q * ev) @ Q.T


@settings(max_examples=15, deadline=None)
@given(n=st.integers(30, 120), k=st.integers(1, 3), b=st.integers(0, 2), basis=st.integers(10, 24),
       seed=st.integers(0, 10_000))
def test_restarted_lanczos_matches_eigvalsh(n, k, b, basis, seed):
    A = _sym(n, seed)
    ev = torch.linalg.eigvalsh(A).numpy()
    r = eigsh(lambda v: A @ v, n, top_k=k, bottom_k=b, tol=1e-10, max_iter=n, dtype=F64, max_basis=basis,
              generator=torch.Generator().manual_seed(seed))
    assert r.tridiag is None and r.converged
    np.testing.assert_allclose(r.eigenvalues, ev[::-1][:k], atol=1e-8 * 20)
    np.testing.assert_allclose(r.bottom_eigenvalues, ev[:b], atol=1e-8 * 20)
    # the reported residuals are the true ones: ‖A y − θ y‖ of the returned unit vectors
    y = r.eigenvectors
    true = torch.linalg.vector_norm(y @ A - torch.as_tensor(r.eigenvalues)[:, None] * y, dim=1).numpy()
    np.testing.assert_allclose(true, r.residuals, atol=1e-9 * 20)


def test_restarted_lanczos_on_an_exhausted_krylov_space_and_too_small_a_basis():
    n = 30
    u = torch.zeros(n, dtype=F64)
    u[0] = 1
    A = torch.eye(n, dtype=F64) + 4 * torch.outer(u, u)
    r = eigsh(lambda v: A @ v, n, top_k=3, bottom_k=1, tol=1e-10, dtype=F64, max_basis=9)
    np.testing.assert_allclose(r.eigenvalues, [5, 1, 1], atol=1e-9)
    np.testing.assert_allclose(r.bottom_eigenvalues, [1], atol=1e-9)
    with pytest.raises(InputError, match="too few to restart"):
        eigsh(lambda v: A @ v, n, top_k=3, bottom_k=1, dtype=F64, max_basis=5)


def test_windowed_lanczos_in_a_ring_equals_the_stored_basis_run():
    A = _sym(80, 3)
    v0 = torch.randn(80, dtype=F64, generator=torch.Generator().manual_seed(1))
    stored = lanczos_tridiag(lambda v: A @ v, v0, 40, reorth=6, keep_basis=True)  # all 40 rows kept
    ring = lanczos_tridiag(lambda v: A @ v, v0, 40, reorth=6)  # only the last 6 held
    # the same projections in another row order: equal to rounding until the lost orthogonality
    # of a windowed run (either way) amplifies it, past ~20 steps here
    np.testing.assert_allclose(ring.alpha[:20], stored.alpha[:20], rtol=1e-8)
    np.testing.assert_allclose(ring.beta[:19], stored.beta[:19], rtol=1e-8)
    assert ring.eig()[0][-1] == pytest.approx(stored.eig()[0][-1], rel=1e-10)  # the top Ritz value
    assert ring.eig()[0][-1] == pytest.approx(20.0, rel=1e-10)


def test_slq_limits_full_reorthogonalisation_to_what_fits():
    A = _sym(100, 5)
    full = slq(lambda v: A @ v, 100, n_runs=2, steps=40, dtype=F64, seed=0)
    small = slq(lambda v: A @ v, 100, n_runs=2, steps=40, dtype=F64, seed=0, max_basis=12)
    assert full.settings["reorth"] == "full" and "reorth_limited_by" not in full.settings
    assert small.settings["reorth"] == 11 and small.settings["reorth_limited_by"] == "memory"
    # the same start vectors; the extreme nodes (converged first) agree, the mass per window too
    ev = torch.linalg.eigvalsh(A).numpy()
    for d in (full, small):
        assert d.nodes[:, -1] == pytest.approx([ev[-1]] * 2, rel=1e-8)
        assert np.nansum(d.weights, axis=1) == pytest.approx([1.0, 1.0], rel=1e-10)


def test_hessian_spectrum_within_a_small_basis(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 4)).double()
    x, y = torch.randn(64, 6, dtype=F64), torch.randint(0, 4, (64,))
    kw = dict(top_k=3, bottom_k=1, density=True, slq_steps=30, trace=True, trace_method="auto", dtype=F64,
              tol=1e-8)
    ref = hessian_spectrum(model, (x, y), **kw)
    monkeypatch.setenv("NNDIAG_MAX_BASIS", "12")
    assert vectors_that_fit(10**9, torch.float32) == 12
    small = hessian_spectrum(model, (x, y), **kw)
    np.testing.assert_allclose(small.eigenvalues, ref.eigenvalues, rtol=1e-7)
    np.testing.assert_allclose(small.bottom_eigenvalues, ref.bottom_eigenvalues, rtol=1e-7, atol=1e-10)
    assert small.density.settings["first_run_shared"] is False  # a restarted run is no SLQ run
    assert small.density.settings["reorth_limited_by"] == "memory"
    assert small.criteria["lambda_max"] == pytest.approx(ref.criteria["lambda_max"], rel=1e-6)
    assert small.params["trace_method"] == "split"  # (stores no parameter-sized vectors)
    # where the split trace does not apply (train mode), auto means Hutch++ unless its sketch
    # does not fit: then Hutchinson, in blocks of what fits
    exact = hessian_spectrum(model, (x, y), top_k=1, trace=True, trace_method="exact", dtype=F64).trace
    tr = hessian_spectrum(model, (x, y), top_k=1, trace=True, mode="train", dtype=F64, trace_probes=400)
    assert tr.params["trace_method"] == "hutchinson"
    assert abs(tr.trace - exact) < 4 * tr.trace_stderr
    monkeypatch.delenv("NNDIAG_MAX_BASIS")
    assert hessian_spectrum(model, (x, y), top_k=1, trace=True, mode="train", dtype=F64).params["trace_method"] \
        == "hutchpp"


def test_available_memory_is_read():
    assert available_bytes("cpu") > 1 << 20
