"""Pure kernels (Lanczos, traces, SLQ, criteria) against dense linear algebra."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nndiag.errors import InputError
from nndiag.landscape import eigsh, exact_trace, hutchinson, hutchpp, slq, spectrum_criteria, xtrace

F64 = torch.float64


def _sym(n: int, seed: int, low_rank: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g, dtype=F64)
    A = (A + A.T) / 2
    if low_rank:
        U = torch.linalg.qr(torch.randn(n, low_rank, generator=g, dtype=F64)).Q
        A = 0.05 * A + U @ torch.diag(torch.linspace(50, 100, low_rank, dtype=F64)) @ U.T
    return A


@settings(max_examples=25, deadline=None)
@given(n=st.integers(5, 60), k=st.integers(1, 4), b=st.integers(0, 2), seed=st.integers(0, 10_000))
def test_eigsh_matches_eigvalsh(n, k, b, seed):
    A = _sym(n, seed)
    ev = torch.linalg.eigvalsh(A).numpy()
    r = eigsh(lambda v: A @ v, n, top_k=k, bottom_k=b, tol=1e-10, max_iter=n, dtype=F64,
              generator=torch.Generator().manual_seed(seed))
    scale = abs(ev).max()
    np.testing.assert_allclose(r.eigenvalues, ev[::-1][:k], atol=1e-7 * scale)
    np.testing.assert_allclose(r.bottom_eigenvalues, ev[:b], atol=1e-7 * scale)
    assert np.all(np.diff(r.eigenvalues) <= 0)


def test_eigsh_handles_repeated_eigenvalues_and_exhausted_krylov_space():
    # identity-plus-rank-one: the Krylov space from any start has dimension 2
    n = 30
    u = torch.zeros(n, dtype=F64)
    u[0] = 1
    A = torch.eye(n, dtype=F64) + 4 * torch.outer(u, u)
    r = eigsh(lambda v: A @ v, n, top_k=3, bottom_k=1, tol=1e-10, dtype=F64)
    np.testing.assert_allclose(r.eigenvalues, [5, 1, 1], atol=1e-9)
    np.testing.assert_allclose(r.bottom_eigenvalues, [1], atol=1e-9)


def test_eigsh_rejects_bad_arguments():
    A = torch.eye(4, dtype=F64)
    with pytest.raises(InputError):
        eigsh(lambda v: A @ v, 4, top_k=5)
    with pytest.raises(InputError):
        eigsh(lambda v: A @ v, 4, top_k=0)
    with pytest.raises(InputError):
        eigsh(lambda v: A @ v, 4, tol=0)


def test_traces():
    A = _sym(80, 3, low_rank=5)
    exact = float(torch.trace(A))

    def mm(V):
        return V @ A
    assert exact_trace(mm, 80, dtype=F64).value == pytest.approx(exact, rel=1e-12)
    h = hutchinson(mm, 80, n_probes=60, dtype=F64)
    hp = hutchpp(mm, 80, sketch=10, n_probes=30, dtype=F64)
    assert abs(h.value - exact) <= 3 * h.stderr
    assert abs(hp.value - exact) <= 3 * hp.stderr
    # the low-rank part is captured exactly: Hutch++ is far more accurate per product
    assert hp.stderr < 0.2 * h.stderr and hp.n_matvec < h.n_matvec
    # adaptive stopping uses the absolute standard error, also for a negative trace
    neg = hutchinson(lambda V: -(V @ A), 80, n_probes=500, rtol=0.05, dtype=F64)
    assert neg.value < 0 and neg.stderr <= 0.05 * abs(neg.value) and len(neg.samples) < 500


def _decaying(n: int, seed: int, power: float, indefinite: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64)).Q
    lam = torch.arange(1, n + 1, dtype=F64) ** -power
    if indefinite:
        lam = lam * torch.where(torch.rand(n, generator=g, dtype=F64) < 0.3, -1.0, 1.0)
    return (U * lam) @ U.T


def test_xtrace_is_unbiased_and_beats_hutchpp_at_equal_products():
    # independent reference: the dense trace; 40 seeds of each estimator at 40 products
    for indefinite in (False, True):
        A = _decaying(300, 1, 1.5, indefinite)
        exact = float(torch.trace(A))

        def mm(V, A=A):
            return V @ A

        xe, he, vals = [], [], []
        for s in range(40):
            g1, g2 = torch.Generator().manual_seed(s), torch.Generator().manual_seed(s)
            x = xtrace(mm, 300, n_probes=20, block=20, generator=g1, dtype=F64)
            h = hutchpp(mm, 300, sketch=7, n_probes=26, min_probes=26, generator=g2, dtype=F64)
            assert x.n_matvec == 40 and h.n_matvec == 40
            xe.append(abs(x.value - exact))
            he.append(abs(h.value - exact))
            vals.append(x.value)
        se_of_mean = np.std(vals, ddof=1) / np.sqrt(len(vals))
        assert abs(np.mean(vals) - exact) <= 4 * se_of_mean  # unbiased
        assert np.mean(xe) < 0.8 * np.mean(he)  # measured: 1.5-3x smaller


def test_xtrace_exact_on_low_rank_and_adaptive_stop():
    g = torch.Generator().manual_seed(0)
    U = torch.linalg.qr(torch.randn(100, 5, generator=g, dtype=F64)).Q
    A = U @ torch.diag(torch.tensor([5.0, 4, 3, -2, 1], dtype=F64)) @ U.T
    r = xtrace(lambda V: V @ A, 100, n_probes=40, block=8, dtype=F64)
    assert r.value == pytest.approx(11.0, rel=1e-9) and r.stderr == 0.0 and r.n_matvec == 16
    B = _sym(80, 3, low_rank=5)
    a = xtrace(lambda V: V @ B, 80, n_probes=39, rtol=0.05, dtype=F64)
    assert a.stderr <= 0.05 * abs(a.value) and a.n_matvec == 2 * len(a.samples) < 78
    with pytest.raises(InputError):
        xtrace(lambda V: V @ B, 80, n_probes=1)


def test_slq_density_matches_dense_histogram():
    n = 120
    A = _sym(n, 5)
    ev = torch.linalg.eigvalsh(A).numpy()
    d = slq(lambda v: A @ v, n, n_runs=30, steps=40, dtype=F64, seed=1)
    np.testing.assert_allclose(np.nansum(d.weights, axis=1), 1.0, atol=1e-10)
    qs = np.quantile(ev, [0.1, 0.25, 0.5, 0.75, 0.9])
    est = d.cdf(qs)
    exact = np.array([(ev <= q).mean() for q in qs])
    assert np.max(np.abs(est - exact)) < 0.06, (est, exact)
    x, dens, sigma = d.grid(2000)
    assert np.trapezoid(dens, x) == pytest.approx(1.0, abs=1e-3)
    # extreme Ritz values converge to the extreme eigenvalues
    assert np.nanmax(d.nodes) == pytest.approx(ev[-1], rel=1e-6)


def test_criteria_on_known_spectra():
    lam = np.array([-2.0, -1.0, 1.0, 4.0])
    w = np.array([0.25, 0.25, 0.25, 0.25])
    c = spectrum_criteria(lam, w, n=0.5)
    assert c["re"] == pytest.approx(0.5)
    assert c["Ct"] == pytest.approx(-0.5)
    num = np.sqrt(2 * 0.25) + np.sqrt(1 * 0.25)
    den = np.sqrt(1 * 0.25) + np.sqrt(4 * 0.25)
    assert c["Kh"] == pytest.approx(num / den)
    pos = spectrum_criteria(np.array([1.0, 2.0]), np.array([0.5, 0.5]))
    assert pos["re"] == 0 and pos["Kh"] == 0 and pos["Ct"] == 0
    sym = spectrum_criteria(np.array([-3.0, -1.0, 1.0, 3.0]), np.full(4, 0.25))
    assert sym["re"] == pytest.approx(1) and sym["Kh"] == pytest.approx(1) and sym["Ct"] == pytest.approx(-1)
