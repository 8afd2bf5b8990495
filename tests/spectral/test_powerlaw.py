"""The vectorised CSN fit against a plain-Python reference, on Pareto and MP samples."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nndiag.errors import InputError
from nndiag.spectral.powerlaw import candidate_alphas, fit_powerlaw, ks_distances, ks_distances_pruned


def csn_reference(values, min_tail=1, small_n=False):
    """Clauset–Shalizi–Newman as a plain loop: MLE alpha and KS distance for every xmin."""
    x = np.sort(np.asarray([v for v in values if v > 1e-5], dtype=np.float64))
    n = len(x)
    best = None
    for i in range(n - 1):  # one candidate xmin at a time, the textbook way
        tail = x[i:]
        nt = len(tail)
        if nt < min_tail:
            continue
        s = float(np.sum(np.log(tail / x[i])))
        if s <= 0:
            continue
        alpha = 1 + (nt - 1 if small_n else nt) / s
        if alpha <= 1:
            d = 1.0
        else:
            d = float(np.max(np.abs(1 - (tail / x[i]) ** (1 - alpha) - np.arange(nt) / nt)))
        if best is None or d < best[1]:
            best = (alpha, d, x[i], (alpha - 1) / math.sqrt(nt))
    return best


def pareto(alpha, n, seed, xmin=1.0):
    u = np.random.default_rng(seed).random(n)
    return xmin * (1 - u) ** (-1 / (alpha - 1))


@pytest.mark.parametrize("alpha", [1.5, 2.0, 3.0, 4.0])
def test_fit_matches_plain_python_csn_on_pareto(alpha):
    x = pareto(alpha, 2000, seed=int(alpha * 10))
    ref_alpha, ref_d, ref_xmin, ref_sigma = csn_reference(x)
    fit = fit_powerlaw(x)
    assert fit.ok
    assert abs(fit.alpha - ref_alpha) < 0.01
    assert fit.xmin == pytest.approx(ref_xmin, rel=1e-12)
    assert fit.D == pytest.approx(ref_d, rel=1e-9)
    assert fit.sigma == pytest.approx(ref_sigma, rel=1e-9)
    # and the estimate is near the truth (sampling error ~ (alpha-1)/sqrt(n))
    assert abs(fit.alpha - alpha) < 5 * (alpha - 1) / math.sqrt(fit.num_pl_spikes) + 0.05


def test_min_tail_matches_reference():
    x = pareto(2.5, 600, seed=3)
    ref = csn_reference(x, min_tail=200)
    fit = fit_powerlaw(x, min_tail=200)
    assert fit.alpha == pytest.approx(ref[0], rel=1e-10)
    assert fit.num_pl_spikes >= 200


def test_small_n_rule_matches_reference():
    x = pareto(3.0, 15, seed=4)
    ref = csn_reference(x, min_tail=8, small_n=True)
    fit = fit_powerlaw(x, small_n="ww")
    assert fit.alpha == pytest.approx(ref[0], rel=1e-10)
    assert fit.num_pl_spikes >= 8


@pytest.mark.parametrize("n", [300, 600, 3000, 4800])
def test_pruned_ks_equals_full(n):
    rng = np.random.default_rng(n)
    x = np.sort(np.r_[rng.chisquare(4, n - 50), pareto(2.2, 50, seed=1, xmin=8)])
    a, _ = candidate_alphas(x)
    cand = np.arange(n - 1)
    full = ks_distances(x, a, cand)
    pruned = ks_distances_pruned(x, a, cand)
    i = int(np.argmin(full))
    assert int(np.argmin(pruned)) == i
    assert pruned[i] == full[i]
    finite = np.isfinite(pruned)
    np.testing.assert_array_equal(pruned[finite], full[finite])


@pytest.mark.parametrize("kind", ["mp", "pareto1.5", "pareto4", "pooled"])
def test_pruned_ks_argmin_equals_full_on_varied_spectra(kind):
    # the pruning bar uses exact D of the most promising candidates: the argmin must not move
    rng = np.random.default_rng(7)
    if kind == "mp":
        w = rng.standard_normal((1200, 500))
        x = np.linalg.eigvalsh(w.T @ w / 1200)
    elif kind.startswith("pareto"):
        x = pareto(float(kind[6:]), 2000, seed=3)
    else:  # nine pooled slices of different scales, like a 3x3 conv in WeightWatcher's mode
        x = np.concatenate([np.linalg.svd(rng.standard_normal((256, 128)) * s, compute_uv=False) ** 2
                            for s in np.linspace(0.5, 2.0, 9)])
    x = np.sort(x)
    a, _ = candidate_alphas(x)
    cand = np.arange(x.size - 1)
    full = ks_distances(x, a, cand)
    pruned = ks_distances_pruned(x, a, cand)
    assert int(np.argmin(pruned)) == int(np.argmin(full))
    assert pruned.min() == full.min()
    assert np.isinf(pruned).sum() > x.size // 2  # the pruning did skip most candidates


@pytest.mark.parametrize("kind", ["pareto2", "mp", "random-conv"])
def test_tail_bounds_are_lower_bounds_and_keep_the_argmin(kind):
    # the first pruning pass samples each candidate's own tail: never above the exact D
    from nndiag.spectral.powerlaw import _tail_bounds

    rng = np.random.default_rng(11)
    if kind == "pareto2":
        x = pareto(2.0, 3000, seed=5)
    elif kind == "mp":
        w = rng.standard_normal((1500, 600))
        x = np.linalg.eigvalsh(w.T @ w / 1500)
    else:  # nine 256×256 slices of a random-init 3×3 convolution: the best xmin near the top
        w = rng.uniform(-1, 1, (9, 256, 256)) / math.sqrt(256 * 9)
        x = np.concatenate([np.linalg.eigvalsh(s.T @ s) for s in w])
    x = np.sort(x)
    a, _ = candidate_alphas(x)
    cand = np.flatnonzero(np.isfinite(a[:-1]) & (a[:-1] > 1.0))
    full = ks_distances(x, a, cand)
    lb = _tail_bounds(x, a, cand)
    assert np.all(lb <= full[cand] * (1 + 1e-12) + 1e-15)
    assert lb.max() > 0.5 * full[cand].max()  # not vacuous
    pruned = ks_distances_pruned(x, a, cand)
    i = int(np.argmin(full))
    assert int(np.argmin(pruned)) == i and pruned[i] == full[i]


@pytest.mark.parametrize("shape", [(1000, 250), (2000, 400)])
def test_marchenko_pastur_matrices_report_no_heavy_tail(shape):
    n, m = shape
    W = np.random.default_rng(0).normal(size=shape) / math.sqrt(n)
    ev = np.linalg.svd(W, compute_uv=False) ** 2
    fit = fit_powerlaw(ev)
    assert fit.ok and fit.alpha > 6  # WeightWatcher's "under-trained" (random-like) regime


def test_failures_are_statuses_not_exceptions():
    assert fit_powerlaw(np.array([1.0])).status == "failed"
    assert fit_powerlaw(np.zeros(50)).status == "failed"
    assert fit_powerlaw(np.array([1.0, np.nan, 2.0])).reason == "non-finite eigenvalues"
    f = fit_powerlaw(np.full(30, 2.0))
    assert not f.ok and math.isnan(f.alpha)
    with pytest.raises(InputError):
        fit_powerlaw(np.ones(5), fix_fingers="bogus")


def test_clip_xmax_removes_a_finger():
    # an MP bulk plus one outlier: the raw fit picks a short, steep "finger" tail
    W = np.random.default_rng(2).normal(size=(1000, 250)) / math.sqrt(1000)
    x = np.r_[np.linalg.svd(W, compute_uv=False) ** 2, 3.0]
    raw = fit_powerlaw(x)
    fixed = fit_powerlaw(x, fix_fingers="clip_xmax")
    assert fixed.raw_alpha == pytest.approx(raw.alpha)
    assert fixed.num_fingers >= 1
    assert fixed.alpha + 1.0 < raw.alpha
    clipped = fit_powerlaw(np.sort(x)[: -fixed.num_fingers])
    assert fixed.alpha == pytest.approx(clipped.alpha)
    # clip_top drops exactly the largest values
    assert fit_powerlaw(x, clip_top=1).xmax < 3.0


def test_xmin_peak_restricts_xmin_to_linear_bounds():
    rng = np.random.default_rng(8)
    x = np.r_[rng.lognormal(0, 0.3, 3000), pareto(2.5, 300, seed=9, xmin=3)]
    fit = fit_powerlaw(x, fix_fingers="xmin_peak")
    h, edges = np.histogram(np.log10(x[x > 1e-5]), bins=100)
    peak = 10 ** edges[np.argmax(h)]
    assert fit.ok and 0.95 * peak <= fit.xmin <= 1.5 * peak
    fit2 = fit_powerlaw(x, fix_fingers="xmin_peak", xmin_max=10 * peak)
    assert 0.95 * peak <= fit2.xmin <= 10 * peak


def test_truncated_power_law_recovers_cutoff():
    from scipy import stats

    from nndiag.spectral.tpl import fit_truncated_powerlaw

    # p(x) ∝ x^{-1.5} e^{-x/20} on x ≥ 1: sample by rejection from a Pareto(α=1.5)
    rng = np.random.default_rng(10)
    x = (1 - rng.random(200_000)) ** (-1 / 0.5)
    x = x[rng.random(x.size) < np.exp(-(x - 1) / 20)][:5000]
    f = fit_truncated_powerlaw(x, 1.0)
    assert f.status == "success"
    assert abs(f.alpha - 1.5) < 0.1
    assert 1 / 30 < f.Lambda < 1 / 14
    assert stats is not None


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), scale=st.floats(1e-2, 1e3), n=st.integers(20, 300))
def test_property_fit_is_scale_invariant(seed, scale, n):
    x = pareto(2.5, n, seed=seed, xmin=1.0)
    a, b = fit_powerlaw(x), fit_powerlaw(x * scale)
    assert a.alpha == pytest.approx(b.alpha, rel=1e-9)
    assert b.xmin == pytest.approx(a.xmin * scale, rel=1e-12)
    assert a.D == pytest.approx(b.D, rel=1e-6, abs=1e-12)


@pytest.mark.parametrize("stride", [2, 16, 61])
def test_sampled_lower_bounds_never_exceed_the_exact_distance(stride):
    from nndiag.spectral.powerlaw import _lower_bounds

    rng = np.random.default_rng(stride)
    x = np.sort(np.r_[rng.chisquare(3, 1500), pareto(1.8, 200, seed=2, xmin=6)])
    a, _ = candidate_alphas(x)
    cand = np.flatnonzero(np.isfinite(a[:-1]) & (a[:-1] > 1.0))
    exact = ks_distances(x, a, cand)[cand]
    lb = _lower_bounds(x, a, cand, stride)
    assert np.all(lb <= exact + 1e-12)
    assert np.median(lb / exact) > 0.5  # and they are not vacuous
