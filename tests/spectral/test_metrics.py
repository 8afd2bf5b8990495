"""Per-layer metrics and the MP fit against direct computations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from nndiag.spectral.metrics import detx, layer_metrics, matrix_entropy, matrix_rank
from nndiag.spectral.mp import fit_mp, mp_pdf
from nndiag.spectral.powerlaw import fit_powerlaw


def test_layer_metrics_match_direct_formulas():
    rng = np.random.default_rng(0)
    W = rng.standard_t(3, size=(300, 120)) / 10
    sv = np.linalg.svd(W, compute_uv=False)
    ev = np.sort(sv**2)
    fit = fit_powerlaw(ev)
    m = layer_metrics(ev, fit, 300, 120, 1)
    assert m["lambda_max"] == pytest.approx(sv.max() ** 2)
    assert m["norm"] == pytest.approx((W**2).sum())
    assert m["log_norm"] == pytest.approx(math.log10((W**2).sum()))
    assert m["stable_rank"] == pytest.approx((W**2).sum() / sv.max() ** 2)
    assert m["log_spectral_norm"] == pytest.approx(2 * math.log10(np.linalg.norm(W, 2)))
    assert m["alpha_weighted"] == pytest.approx(fit.alpha * math.log10(sv.max() ** 2))
    assert m["log_alpha_norm"] == pytest.approx(math.log10(np.sum(ev**fit.alpha)))
    assert m["matrix_rank"] == np.linalg.matrix_rank(W)
    assert m["sv_min"] == pytest.approx(sv.min())
    assert m["Q"] == pytest.approx(2.5)
    p = ev / ev.sum()
    assert m["entropy"] == pytest.approx(-(p * np.log(p)).sum() / math.log(120), rel=1e-6)
    assert m["num_pl_spikes"] == int((ev >= fit.xmin).sum())
    assert m["warning"] in ("", "over-trained", "under-trained")


def test_entropy_extremes_and_rank():
    assert matrix_entropy(np.ones(50), 50) == pytest.approx(1.0, abs=1e-6)
    spike = np.r_[np.zeros(49), 1.0]
    assert matrix_rank(spike, 50) == 1
    assert matrix_entropy(np.r_[np.full(49, 1e-30), 1.0], 50) == 0.0
    assert matrix_entropy(np.r_[np.full(48, 1e-30), 1.0, 1.0], 50) == pytest.approx(1.0, abs=1e-6)


def test_detx_matches_a_loop():
    ev = np.sort(np.random.default_rng(1).chisquare(2, 200))
    num, val = detx(ev)
    r = ev * ev.size / ev.sum()
    ref = ev.size
    for idx in range(ev.size - 1, 0, -1):
        if np.prod(r[idx:]) < 1.0:
            ref = ev.size - idx
            break
    assert num == ref
    assert val == ev[ev.size - ref]


def test_warning_thresholds():
    from nndiag.spectral.metrics import warning_for

    assert warning_for(1.5) == "over-trained"
    assert warning_for(7.0) == "under-trained"
    assert warning_for(3.0) == ""
    assert warning_for(float("nan")) == ""


def test_mp_pdf_integrates_to_one():
    xs = np.linspace(0, 5, 200_001)
    for q in (1.0, 2.0, 4.0):
        area = np.trapezoid(mp_pdf(xs, q, 1.0), xs)
        assert area == pytest.approx(1.0, abs=0.01)


def test_mp_fit_on_random_matrix_and_planted_spikes():
    rng = np.random.default_rng(0)
    N, M = 2000, 500
    W = rng.normal(size=(N, M))
    ev = np.linalg.svd(W, compute_uv=False) ** 2
    f = fit_mp(ev, N / M, M)
    assert abs(f.sigma_mp - 1) < 0.1
    assert f.num_spikes == 0
    # bulk edge in original units ≈ N·(1 + 1/√Q)² for unit-variance entries
    assert f.bulk_max == pytest.approx(N * (1 + math.sqrt(M / N)) ** 2, rel=0.15)
    u, s, vt = np.linalg.svd(W, full_matrices=False)
    s[:3] *= 4  # three strong spikes
    f2 = fit_mp(s**2, N / M, M)
    assert f2.num_spikes == 3
    assert f2.mp_softrank < 0.2
