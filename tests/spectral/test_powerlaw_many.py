"""fit_powerlaw_many: the same fits as fit_powerlaw one ESD at a time, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nndiag.spectral import powerlaw_many
from nndiag.spectral.esd import esd
from nndiag.spectral.powerlaw import fit_powerlaw
from nndiag.spectral.powerlaw_many import fit_powerlaw_many

FIELDS = ("alpha", "xmin", "xmax", "D", "sigma", "num_pl_spikes", "n_fit", "status", "reason")


def _same(evs, **kw):
    got = fit_powerlaw_many(evs, **kw)
    assert len(got) == len(evs)
    for ev, g in zip(evs, got, strict=True):
        ref = fit_powerlaw(ev, **kw)
        a = tuple(getattr(ref, f) for f in FIELDS)
        b = tuple(getattr(g, f) for f in FIELDS)
        assert a == b or (ref.status == g.status == "failed" and ref.reason == g.reason), (a, b)
    return got


def _conv_esds(shape, count, seed, rank=None):
    torch.manual_seed(seed)
    out = []
    for _ in range(count):
        w = torch.randn(*shape, dtype=torch.float64) / shape[1]
        if rank is not None:  # rank-deficient slices: eigenvalues at (rounding) zero, below the threshold
            w[:, rank:] = 0.0
        out.append(esd(w))
    return out


@pytest.mark.parametrize("shape", [(16, 16, 3, 3), (32, 32, 3, 3), (64, 64, 3, 3), (64, 24, 1, 1)])
def test_pooled_conv_esds_equal_single_fits(shape):
    # 144, 288, 576 and 24 values per ESD (unpruned and pruned groups)
    _same(_conv_esds(shape, 6, seed=shape[0] + shape[1]))


def test_heavy_tailed_and_mp_samples_equal_single_fits():
    rng = np.random.default_rng(0)
    evs = [(1 - rng.random(n)) ** (-1 / a) for n in (300, 1000) for a in (0.8, 1.5, 2.0, 3.0)]
    x = rng.standard_normal((5, 400, 200))
    evs += [np.linalg.eigvalsh(m.T @ m / 400) for m in x]
    fits = _same(evs)
    assert fits[2].ok and abs(fits[2].alpha - 3.0) < 0.3  # survival x^-2 → density exponent 3


def test_values_below_the_threshold_and_min_tail():
    # rows of one length whose smallest values are cut by the threshold in different numbers
    evs = _conv_esds((32, 32, 3, 3), 3, seed=1) + _conv_esds((32, 32, 3, 3), 3, seed=2, rank=20)
    assert len({int((e <= 1e-5).sum()) for e in evs}) > 1
    _same(evs)
    _same(evs, min_tail=40)
    _same(evs, thresh=1e-3)


def test_fallbacks_give_the_single_fits(monkeypatch):
    rng = np.random.default_rng(3)
    evs = [(1 - rng.random(500)) ** (-1 / 1.5) for _ in range(4)]
    _same(evs, fix_fingers="clip_xmax")  # options the batched path leaves to fit_powerlaw
    _same(evs, fix_fingers="xmin_peak")
    _same([e[:15] for e in evs], small_n="ww")  # WeightWatcher's small-sample rule
    bad = [e.copy() for e in evs]
    bad[1][3] = np.nan
    assert _same(bad)[1].reason == "non-finite eigenvalues"
    _same([evs[0], evs[1][:300], np.array([1.0]), np.zeros(10)])  # lengths of one ESD each, too few values
    # an ESD whose first pruning pass leaves many candidates goes through the single search
    calls = []
    real = powerlaw_many.fit_powerlaw
    monkeypatch.setattr(powerlaw_many, "_LOOSE", 0)
    monkeypatch.setattr(powerlaw_many, "_LOOSE_FRACTION", 0.0)
    monkeypatch.setattr(powerlaw_many, "fit_powerlaw", lambda ev, **kw: calls.append(ev.size) or real(ev, **kw))
    _same(evs)
    assert calls == [500] * 4
