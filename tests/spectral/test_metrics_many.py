"""layer_metrics_many: each ESD's row equals layer_metrics of it alone, and the direct formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest

from nndiag.spectral.metrics import layer_metrics
from nndiag.spectral.metrics_many import layer_metrics_many
from nndiag.spectral.powerlaw import fit_powerlaw


def _spectra() -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Same-length groups of real ESDs (squared singular values of heavy- and light-tailed
    matrices, rank-deficient ones included) and odd ones; with the matrices where there are."""
    rng = np.random.default_rng(3)
    mats = [rng.standard_t(df, size=(120, 60)) / 10 for df in (2.5, 3, 5, 40)]
    low = rng.normal(size=(120, 8)) @ rng.normal(size=(8, 60))  # rank 8
    mats.append(low)
    evs = [np.sort(np.linalg.svd(w, compute_uv=False) ** 2) for w in mats]
    odd = [np.ones(60), np.r_[np.zeros(59), 2.0], rng.pareto(1.5, 60)[::-1] + 1.0,  # unsorted
           np.r_[np.zeros(3), np.sort(rng.random(57))], np.array([0.5, 4.0]), np.array([3.0])]
    return evs + odd, mats


def test_each_row_equals_the_one_at_a_time_metrics():
    evs, _ = _spectra()
    fits = [fit_powerlaw(ev) for ev in evs]
    N = [120] * len(evs)
    M = [60] * (len(evs) - 2) + [2, 1]
    rf = [9] * len(evs)
    many = layer_metrics_many(evs, fits, N, M, rf)
    assert len(many) == len(evs)
    for ev, fit, n, m, r, row in zip(evs, fits, N, M, rf, many, strict=True):
        one = layer_metrics(ev, fit, n, m, r)
        assert row.keys() == one.keys()
        for key, want in one.items():
            got = row[key]
            if isinstance(want, str) or (isinstance(want, int) and not isinstance(want, bool)):
                assert got == want and type(got) is type(want), key
            elif math.isnan(want):
                assert math.isnan(got), key
            else:
                assert got == pytest.approx(want, rel=1e-13, abs=0.0), key


def test_rows_match_direct_formulas_on_svds():
    evs, mats = _spectra()
    evs = evs[: len(mats)]
    fits = [fit_powerlaw(ev) for ev in evs]
    rows = layer_metrics_many(evs, fits, [120] * len(evs), [60] * len(evs), [1] * len(evs))
    for w, ev, fit, row in zip(mats, evs, fits, rows, strict=True):
        sv = np.linalg.svd(w, compute_uv=False)
        assert row["lambda_max"] == pytest.approx(sv.max() ** 2, rel=1e-12)
        assert row["norm"] == pytest.approx((w**2).sum(), rel=1e-12)
        assert row["stable_rank"] == pytest.approx((w**2).sum() / sv.max() ** 2, rel=1e-12)
        assert row["matrix_rank"] == np.linalg.matrix_rank(w)
        assert row["weak_rank_loss"] == int((ev < 1e-6).sum())
        if fit.ok:
            assert row["log_alpha_norm"] == pytest.approx(math.log10(np.sum(ev[ev > 0] ** fit.alpha)), rel=1e-10)
        rank = row["matrix_rank"]
        p = ev / ev.sum()
        p = p[p > 0]
        assert row["entropy"] == pytest.approx(-(p * np.log(p)).sum() / math.log(rank), rel=1e-6)
        # det X: the smallest top set whose product, after scaling Σλ to n, falls below 1
        scaled = ev[::-1] * ev.size / ev.sum()
        num = next(j + 1 for j in range(ev.size - 1) if np.prod(scaled[: j + 1]) < 1)
        assert row["detX_num"] == num
        assert row["detX_val"] == ev[ev.size - num]
