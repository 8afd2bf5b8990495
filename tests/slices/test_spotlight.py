"""The Spotlight: objective and gradient against direct numpy computations, and behaviour
on synthetic data with a known high-loss blob."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nndiag.errors import InputError
from nndiag.slices import spotlight
from nndiag.slices.spotlight import (
    Projector,
    _scale_for_weight,
    fit_spotlight,
    kernel_weights,
    spotlight_objective,
)


def _np_objective(x, loss, mu, log_tau, size, margin, barrier, eps, kernel):
    """Direct numpy transcription of the paper's penalised objective."""
    tau = np.exp(log_tau)
    d2 = ((x - mu) ** 2 * tau).sum(1) if np.ndim(tau) else tau * ((x - mu) ** 2).sum(1)
    k = np.exp(-d2 / 2) if kernel == "gaussian" else np.maximum(1 - d2, 0)
    w = k.sum()
    val = (k * loss).sum() / (w + eps)
    if w < size + margin:
        val -= barrier * ((w - (size + margin)) / margin) ** 2
    return val


@pytest.mark.parametrize("kernel", ["quadratic", "gaussian"])
@pytest.mark.parametrize("diag", [False, True])
def test_objective_and_gradient_match_numpy(kernel, diag):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(60, 3))
    loss = rng.exponential(size=60)
    mu = np.array([0.3, -0.2, 0.1])
    log_tau = np.log(np.array([0.4, 0.7, 0.5])) if diag else np.log(0.5)
    size, margin, barrier, eps = 40.0, 15.0, 2.0, 1e-6
    mu_t = torch.tensor(mu[None], requires_grad=True)
    lt_t = torch.tensor(np.atleast_1d(log_tau)[None], requires_grad=True)
    obj, mean_loss, w = spotlight_objective(torch.tensor(x), torch.tensor(loss), mu_t, lt_t, size, margin,
                                            barrier, eps, kernel)
    ref = _np_objective(x, loss, mu, log_tau, size, margin, barrier, eps, kernel)
    assert obj.item() == pytest.approx(ref, rel=1e-12)
    assert w.item() < size + margin  # the barrier term is active in this configuration
    g_mu, g_lt = torch.autograd.grad(obj.sum(), (mu_t, lt_t))
    h = 1e-6
    for j in range(3):
        e = np.zeros(3)
        e[j] = h
        fd = (_np_objective(x, loss, mu + e, log_tau, size, margin, barrier, eps, kernel)
              - _np_objective(x, loss, mu - e, log_tau, size, margin, barrier, eps, kernel)) / (2 * h)
        assert g_mu[0, j].item() == pytest.approx(fd, rel=1e-5, abs=1e-7)
    lt = np.atleast_1d(log_tau)
    for j in range(len(lt)):
        e = np.zeros(len(lt))
        e[j] = h
        up, dn = lt + e, lt - e
        fd = (_np_objective(x, loss, mu, up if diag else up[0], size, margin, barrier, eps, kernel)
              - _np_objective(x, loss, mu, dn if diag else dn[0], size, margin, barrier, eps, kernel)) / (2 * h)
        assert g_lt[0, j].item() == pytest.approx(fd, rel=1e-5, abs=1e-7)


def test_kernel_weights_by_hand():
    x = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
    np.testing.assert_allclose(kernel_weights(x, np.zeros(2), 0.25), [1.0, 0.75, 0.0, 0.0])
    np.testing.assert_allclose(kernel_weights(x, np.zeros(2), np.array([0.25, 0.0625])), [1.0, 0.75, 0.75, 0.0])
    np.testing.assert_allclose(kernel_weights(x, np.zeros(2), 1.0, "gaussian"), np.exp([0, -0.5, -2, -4.5]))


@pytest.mark.parametrize("kernel", ["quadratic", "gaussian"])
def test_scale_solver_hits_target_weight(kernel):
    rng = np.random.default_rng(3)
    d2 = torch.tensor(rng.exponential(size=(3, 200)))
    target = torch.tensor([5.0, 40.0, 150.0])
    s = _scale_for_weight(d2, target, kernel)
    t = s.exp()[:, None] * d2
    w = (torch.exp(-0.5 * t) if kernel == "gaussian" else torch.clamp(1 - t, min=0)).sum(1)
    np.testing.assert_allclose(w.numpy(), target.numpy(), rtol=1e-6)


def _blob_data(seed, n=600, d=6, blob=30, rest=1.0):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, d))
    z[:, 2:] *= rest
    centre = np.zeros(d)
    centre[:2] = [1.6, -1.0]
    dist = np.linalg.norm(z - centre, axis=1)
    inblob = dist <= np.sort(dist)[blob - 1]
    loss = rng.exponential(0.3, size=n) + 3.0 * inblob
    loss[:3] += 25.0  # isolated outliers with huge loss: the reference collapses onto them
    return z, loss, inblob, centre


@pytest.mark.parametrize("seed", [0, 1])
def test_spotlight_lands_in_high_loss_blob(seed):
    z, loss, inblob, centre = _blob_data(seed)
    s = spotlight(z, loss, size=0.03, n=1, steps=400, seed=seed)
    assert not s.failed[0]
    w, sup = s.weights[0], s.support[0]
    assert w.sum() >= 0.9 * 0.03 * len(z)
    # the centre lies in the blob: closer to the blob centre than the blob radius
    mu = s.info[0]["mu"] * Projector.fit(z).scale + z.mean(0)
    radius = np.linalg.norm(z[inblob] - centre, axis=1).max()
    assert np.linalg.norm(mu - centre) < radius
    assert sup[inblob].mean() >= 0.8  # most of the blob is inside
    assert inblob[sup].mean() >= 0.3  # and it is not everything
    top = np.argsort(-w)[:10]
    assert inblob[top].mean() >= 0.9


def test_second_spotlight_avoids_the_first_and_flip_finds_low_loss():
    z, loss, inblob, _ = _blob_data(2)
    s = spotlight(z, loss, size=0.03, n=2, steps=300)
    overlap = (s.support[0] & s.support[1]).sum() / max(1, s.support[1].sum())
    assert overlap < 0.5
    rng = np.random.default_rng(0)
    low = loss.copy()
    low[inblob] = 0.0  # the blob is now the region of lowest loss
    low[~inblob] = 1.0 + rng.exponential(0.3, size=(~inblob).sum())
    f = spotlight(z, low, size=0.03, n=1, steps=300, flip=True)
    assert inblob[np.argsort(-f.weights[0])[:10]].mean() >= 0.9


def test_gaussian_kernel_with_diagonal_precision_finds_blob():
    z, loss, inblob, _ = _blob_data(4)
    # no isolated outliers here: the Gaussian's tails make a wide spotlight over a few
    # far-apart outliers a genuine optimum of the objective (the quadratic kernel's is not)
    loss[:3] -= 25.0
    s = spotlight(z, loss, size=0.03, n=1, steps=300, kernel="gaussian", precision="diagonal")
    assert not s.failed[0]
    assert np.shape(s.info[0]["tau"]) == (6,)
    assert inblob[np.argsort(-s.weights[0])[:10]].mean() >= 0.8
    w_new, _ = s.score(z[:50])
    np.testing.assert_allclose(w_new[0], s.weights[0][:50])


def test_pca_option_keeps_the_informative_plane():
    z, loss, inblob, _ = _blob_data(7, rest=0.2)  # the blob lives in the leading plane
    s = spotlight(z, loss, size=0.03, n=1, steps=300, pca=2)
    assert s.info[0]["mu"].shape == (2,)
    assert inblob[np.argsort(-s.weights[0])[:10]].mean() >= 0.8


def test_unrobust_barrier_collapse_is_reported_as_failed():
    # the paper's barrier with a negligible weight lets the spotlight shrink onto outliers;
    # nndiag must report that spotlight as failed rather than as a slice
    z, loss, _, _ = _blob_data(5)
    fit = fit_spotlight(Projector.fit(z)(z), loss, 18.0, solver="barrier", barrier=1e-9, steps=300, restarts=1)
    assert fit["weight"] < 0.9 * 18.0
    assert fit["failed"]


def test_barrier_solver_keeps_its_size_with_scaled_barrier():
    z, loss, inblob, _ = _blob_data(6)
    fit = fit_spotlight(Projector.fit(z)(z), loss, 18.0, solver="barrier", steps=400)
    assert not fit["failed"] and fit["weight"] >= 0.9 * 18.0


def test_bad_inputs_raise_clear_errors():
    z, loss, _, _ = _blob_data(0, n=100)
    bad = z.copy()
    bad[3, 1] = np.nan
    with pytest.raises(InputError, match="NaN"):
        spotlight(bad, loss)
    with pytest.raises(InputError, match="more than the 100 examples"):
        spotlight(z, loss, size=150)
    with pytest.raises(InputError, match="constant"):
        spotlight(z, np.full(100, 2.0))
    with pytest.raises(InputError, match="losses"):
        spotlight(z, loss[:50])
    with pytest.raises(InputError, match="kernel"):
        spotlight(z, loss, kernel="box")
