"""Eigenvalues against dense numpy SVD references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nndiag.errors import InputError
from nndiag.spectral.esd import eigvals_batched, esd


def _ref(W: np.ndarray) -> np.ndarray:
    return np.sort(np.linalg.svd(W, compute_uv=False) ** 2)


@pytest.mark.parametrize("shape", [(50, 20), (20, 50), (64, 64), (300, 37), (1, 40)])
def test_esd_equals_squared_singular_values_float64(shape):
    W = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    ev = esd(W, precision="float64")
    np.testing.assert_allclose(ev, _ref(W.astype(np.float64)), rtol=1e-6, atol=1e-12 * _ref(W)[-1])


def test_auto_precision_is_accurate_on_well_and_ill_conditioned_matrices():
    rng = np.random.default_rng(1)
    well = (rng.normal(size=(400, 100)) / 20).astype(np.float32)
    u, _, vt = np.linalg.svd(rng.normal(size=(120, 60)), full_matrices=False)
    ill = (u * np.geomspace(1, 1e-3, 60)) @ vt  # condition number 1e3 (1e6 for λ)
    for W in (well, ill.astype(np.float32)):
        ref = _ref(W.astype(np.float64))
        got = esd(W, precision="auto")
        np.testing.assert_allclose(got, ref, rtol=1e-5)


def test_float32_is_close_but_not_exact():
    W = np.random.default_rng(2).normal(size=(200, 80)).astype(np.float32)
    np.testing.assert_allclose(esd(W, precision="float32"), _ref(W.astype(np.float64)), rtol=1e-3)


def test_conv_ww_mode_pools_kernel_positions():
    rng = np.random.default_rng(3)
    K = rng.normal(size=(16, 8, 3, 3))
    ref = np.sort(np.concatenate([_ref(K[:, :, i, j]) for i in range(3) for j in range(3)]))
    got = esd(K, conv_mode="ww")
    assert got.size == 8 * 9
    np.testing.assert_allclose(got, ref, rtol=1e-6)


def test_conv_unfold_mode_is_the_reshaped_matrix():
    K = np.random.default_rng(4).normal(size=(16, 8, 3, 3))
    got = esd(K, conv_mode="unfold")
    np.testing.assert_allclose(got, _ref(K.reshape(16, -1)), rtol=1e-6)
    assert got.size == 16


def test_conv1d_and_conv3d_kernels():
    rng = np.random.default_rng(5)
    k1 = rng.normal(size=(12, 6, 5))
    got = esd(k1)
    ref = np.sort(np.concatenate([_ref(k1[:, :, i]) for i in range(5)]))
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    k3 = rng.normal(size=(4, 6, 2, 2, 2))
    assert esd(k3).size == 4 * 8


def test_half_precision_inputs_are_upcast():
    W = torch.randn(40, 30)
    for dt in (torch.float16, torch.bfloat16):
        Wl = W.to(dt)
        np.testing.assert_allclose(esd(Wl), _ref(Wl.double().numpy()), rtol=1e-5)


def test_batched_equals_one_by_one():
    mats = torch.randn(7, 30, 12, dtype=torch.float64)
    ev = eigvals_batched(mats, "float64").numpy()
    for i in range(7):
        np.testing.assert_allclose(ev[i], _ref(mats[i].numpy()), rtol=1e-8)


def test_bad_arguments():
    with pytest.raises(InputError):
        esd(np.ones(5))
    with pytest.raises(InputError):
        esd(np.ones((3, 3)), precision="half")
    with pytest.raises(InputError):
        esd(np.ones((3, 3, 2)), conv_mode="fft")
    bad = np.ones((200, 150), dtype=np.float32)
    bad[3, 4] = np.nan
    with pytest.raises(InputError, match="NaN or Inf"):
        esd(bad)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 40), m=st.integers(1, 40), seed=st.integers(0, 10_000))
def test_property_sum_of_eigenvalues_is_frobenius_norm(n, m, seed):
    W = np.random.default_rng(seed).normal(size=(n, m))
    ev = esd(W, precision="float64")
    assert ev.size == min(n, m)
    assert np.all(ev >= 0)
    np.testing.assert_allclose(ev.sum(), (W**2).sum(), rtol=1e-9)


@pytest.mark.parametrize("backend", ["lapack", "torch"])
@pytest.mark.parametrize("precision", ["float64", "auto"])
def test_both_cpu_backends_match_svd(monkeypatch, backend, precision):
    # whichever CPU route the machine rule picks, the eigenvalues are the dense SVD's
    from nndiag.spectral import esd as esd_mod

    monkeypatch.setattr(esd_mod, "cpu_backend", lambda: backend)
    rng = np.random.default_rng(5)
    mats = rng.normal(size=(3, 600, 100)).astype(np.float32)  # above the LAPACK route's 96
    got = eigvals_batched(torch.from_numpy(mats), precision).numpy()
    for g, w in zip(got, mats, strict=True):
        np.testing.assert_allclose(g, _ref(w.astype(np.float64)), rtol=1e-10 if precision == "float64" else 1e-4)


def test_cpu_backend_rule():
    from nndiag.spectral.esd import cpu_backend

    # SciPy is a dependency, so the LAPACK route is taken on every processor (PyTorch's MKL
    # was slower on both an AMD and an Intel host)
    assert cpu_backend() == "lapack"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gil_free_syevd_matches_numpy_and_its_fallback(monkeypatch, dtype):
    from nndiag.spectral import _lapack

    assert _lapack.NOGIL, "SciPy's cython_lapack function table could not be used"
    x = np.random.default_rng(7).normal(size=(300, 130)).astype(dtype)
    g = x.T @ x
    ref = np.linalg.eigvalsh(g.astype(np.float64))
    got = _lapack.syevd_values(g.copy())
    assert got.dtype == dtype
    tol = 1e-12 if dtype == np.float64 else 2e-6
    np.testing.assert_allclose(got, ref, rtol=0, atol=tol * ref[-1])
    monkeypatch.setattr(_lapack, "NOGIL", False)  # scipy.linalg.eigh, same LAPACK driver
    np.testing.assert_allclose(_lapack.syevd_values(g.copy()), got, rtol=0, atol=tol * ref[-1])


def test_eigvals_stacks_same_values_with_one_or_two_threads(monkeypatch):
    from nndiag._utils.threads import limit_threads
    from nndiag.spectral import esd as esd_mod

    monkeypatch.setattr(esd_mod, "cpu_backend", lambda: "lapack")
    rng = np.random.default_rng(9)
    shapes = [(3, 200, 120), (1, 130, 300), (5, 40, 30), (2, 500, 100)]  # LAPACK and torch routes
    stacks = [torch.from_numpy(rng.normal(size=s).astype(np.float32)) for s in shapes]
    with limit_threads(1):
        one = esd_mod.eigvals_stacks(stacks, "auto")
    with limit_threads(2):
        two = esd_mod.eigvals_stacks(stacks, "auto")
    for s, a, b, x in zip(shapes, one, two, stacks, strict=True):
        assert a.shape == (s[0], min(s[1], s[2]))
        np.testing.assert_array_equal(a.numpy(), b.numpy())
        for ev, w in zip(a.numpy(), x.numpy(), strict=True):
            np.testing.assert_allclose(ev, _ref(w.astype(np.float64)), rtol=1e-4, atol=1e-6 * ev[-1])


def test_auto_solves_later_stacks_of_a_mostly_ill_conditioned_shape_in_float64(monkeypatch):
    from nndiag.spectral import esd as esd_mod

    monkeypatch.setattr(esd_mod, "AUTO_F64_MAX", 0)  # (32×32 Gram matrices: float64 at once otherwise)

    rng = np.random.default_rng(4)
    u, _, vt = np.linalg.svd(rng.normal(size=(40, 32)), full_matrices=False)
    ill = [((u * np.geomspace(1, 1e-3, 32) * s) @ vt).astype(np.float32) for s in (1.0, 2.0, 0.5)]
    well = [rng.normal(size=(40, 32)).astype(np.float32) for _ in range(3)]
    direct: dict = {}
    first = esd_mod._eig_gram_torch(torch.from_numpy(np.stack(ill[:2] + well[:1])), "auto", direct)
    assert direct == {(40, 32): True}  # 2 of 3 recomputed > AUTO_DIRECT
    calls = []
    real = torch.linalg.eigvalsh

    def spy(g):
        calls.append(g.dtype)
        return real(g)

    esd_mod.torch.linalg.eigvalsh = spy
    try:
        second = esd_mod._eig_gram_torch(torch.from_numpy(np.stack(ill[2:] + well[1:])), "auto", direct)
    finally:
        esd_mod.torch.linalg.eigvalsh = real
    assert calls == [torch.float64]  # one float64 solve, no float32 pass
    for ev, w in zip(np.r_[first.numpy(), second.numpy()], ill[:2] + well[:1] + ill[2:] + well[1:], strict=True):
        np.testing.assert_allclose(ev, _ref(w.astype(np.float64)), rtol=1e-5, atol=1e-9 * ev[-1])
    # a shape with few poorly resolved matrices keeps float32 first
    direct2: dict = {}
    esd_mod._eig_gram_torch(torch.from_numpy(np.stack(ill[:1] + well)), "auto", direct2)
    assert direct2 == {(40, 32): False}


def test_auto_lets_the_first_matrices_of_a_shape_decide_for_the_rest_of_its_first_stack(monkeypatch):
    # a first stack of mostly ill-conditioned matrices: AUTO_PROBE of them in float32 (the poorly
    # resolved ones again in float64), the rest straight in float64; a well-conditioned one: the
    # probe and the rest in float32; every eigenvalue as the SVD's either way
    from nndiag.spectral import esd as esd_mod

    monkeypatch.setattr(esd_mod, "AUTO_F64_MAX", 0)
    rng = np.random.default_rng(7)
    u, _, vt = np.linalg.svd(rng.normal(size=(40, 32)), full_matrices=False)
    k = esd_mod.AUTO_PROBE
    ill = [((u * np.geomspace(1, 1e-3, 32) * s) @ vt).astype(np.float32) for s in rng.uniform(0.5, 2, 3 * k)]
    well = [rng.normal(size=(40, 32)).astype(np.float32) for _ in range(3 * k)]
    calls = []
    real = torch.linalg.eigvalsh

    def spy(g):
        calls.append((g.shape[0], g.dtype))
        return real(g)

    monkeypatch.setattr(esd_mod.torch.linalg, "eigvalsh", spy)
    for mats, want in ((ill, [(k, torch.float32), (k, torch.float64), (2 * k, torch.float64)]),
                       (well, [(k, torch.float32), (2 * k, torch.float32)])):
        calls.clear()
        direct: dict = {}
        ev = esd_mod._eig_gram_torch(torch.from_numpy(np.stack(mats)), "auto", direct)
        assert calls == want
        assert direct == {(40, 32): mats is ill}
        for e, w in zip(ev.numpy(), mats, strict=True):
            ref = _ref(w.astype(np.float64))
            if mats is ill:
                np.testing.assert_allclose(e, ref, rtol=1e-5, atol=1e-9 * e[-1])
            else:
                np.testing.assert_allclose(e, ref, rtol=1e-3, atol=1e-5 * e[-1])


def test_float64_gram_in_row_blocks_matches_svd(monkeypatch):
    # tall matrices get their float64 Gram matrix block by block (bounded extra memory)
    from nndiag.spectral import esd as esd_mod

    monkeypatch.setattr(esd_mod, "cpu_backend", lambda: "lapack")
    monkeypatch.setattr(esd_mod, "GRAM64_ROWS", 128)
    w = np.random.default_rng(11).normal(size=(1000, 100)).astype(np.float32)
    w[:, :50] *= 1e-4  # half the spectrum below AUTO_COND·λmax: auto recomputes in float64
    ref = _ref(w.astype(np.float64))
    for precision in ("float64", "auto"):
        got = esd_mod.eigvals_batched(torch.from_numpy(w[None]), precision).numpy()[0]
        np.testing.assert_allclose(got, ref, rtol=1e-6)  # float32 would miss the small half by far


def test_auto_solves_small_gram_matrices_in_float64_at_once(monkeypatch):
    # up to AUTO_F64_MAX (64×64) one float64 solve, the float64 route's numbers bit for bit; above
    # it float32 first
    from nndiag.spectral import esd as esd_mod

    calls = []
    real = torch.linalg.eigvalsh

    def spy(g):
        calls.append((tuple(g.shape[1:]), g.dtype))
        return real(g)

    monkeypatch.setattr(esd_mod.torch.linalg, "eigvalsh", spy)
    rng = np.random.default_rng(3)
    for m, want in ((64, torch.float64), (16, torch.float64), (80, torch.float32)):
        mats = torch.from_numpy(rng.normal(size=(12, 90, m)).astype(np.float32))
        calls.clear()
        ev = esd_mod._eig_gram_torch(mats, "auto", {})
        assert calls[0] == ((m, m), want)
        if want == torch.float64:
            assert len(calls) == 1
            np.testing.assert_array_equal(ev.numpy(), esd_mod._eig_gram_torch(mats, "float64", {}).numpy())
