"""Baselines for slice discovery, in the same interface as the spotlight.

- :func:`loss_rank`: the examples of highest loss (one slice; scores are the losses).
- :func:`gmm_slices`: a Gaussian mixture (diagonal) over the (PCA-reduced) embeddings;
  slices are the components of highest mean loss, members by responsibility.
- :func:`domino`: an error-aware mixture in the spirit of Domino (Eyuboglu et al., ICLR
  2022): each component has a diagonal Gaussian over the embeddings and categorical
  distributions over the label and the (soft) prediction, fitted by EM on
  ``Σ log Σ_s P(s) P(z|s) P(y|s)^γ P(ŷ|s)^γ̂``; components are ranked by the gap
  between their mean predicted-class probability and mean true-class probability.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from nndiag.errors import InputError
from nndiag.slices.base import Slices, check_losses, resolve_size
from nndiag.slices.embeddings import Embeddings, validate
from nndiag.slices.spotlight import Projector


def _as_embeddings(embeddings: Any, losses: Any) -> Embeddings:
    if isinstance(embeddings, Embeddings):
        return embeddings
    if losses is None:
        raise InputError("per-example losses are needed (losses=...)")
    z, loss = validate(embeddings, losses)
    return Embeddings(z=z, losses=loss)


def loss_rank(embeddings: Any, losses: Any = None, size: float = 0.02, **_: Any) -> Slices:
    """One slice: the ``size`` examples of highest loss.

    Weights are the losses scaled to [0, 1] (so they rank examples); support is the top
    ``size``. On new data it ranks that data's own losses: it needs the new losses and
    does not generalise to unlabelled data.
    """
    emb = _as_embeddings(embeddings, losses)
    s = resolve_size(size, len(emb))
    check_losses(emb.losses)

    def score(e: Any) -> tuple[np.ndarray, np.ndarray]:
        loss = e.losses if isinstance(e, Embeddings) else np.asarray(e, dtype=np.float64)
        lo, hi = float(loss.min()), float(loss.max())
        w = (loss - lo) / (hi - lo) if hi > lo else np.zeros_like(loss)
        k = int(round(resolve_size(size, len(loss)))) if size < 1 else int(round(s))
        sup = np.zeros(len(loss), dtype=bool)
        sup[np.argsort(-loss, kind="stable")[:k]] = True
        return w[None], sup[None]

    w, sup = score(emb)
    return Slices("loss_rank", w, sup, (False,), score, {"size": size, "size_count": s},
                  [{"weight": float(sup.sum()), "mean_loss": float(emb.losses[sup[0]].mean())}])


def _reduce(z: np.ndarray, pca: int | None) -> Projector:
    return Projector.fit(z, pca if pca is not None and pca < z.shape[1] else None)


def gmm_slices(embeddings: Any, losses: Any = None, size: float = 0.02, n: int = 5, *,
               components: int = 25, pca: int | None = 32, seed: int = 0, **_: Any) -> Slices:
    """The ``n`` mixture components of highest mean loss among those of at least ``size``.

    A diagonal Gaussian mixture (scikit-learn) with ``components`` components over the
    embeddings reduced to ``pca`` principal components. Weights are responsibilities;
    support is the examples assigned to the component.
    """
    from sklearn.mixture import GaussianMixture

    emb = _as_embeddings(embeddings, losses)
    s = resolve_size(size, len(emb))
    check_losses(emb.losses)
    proj = _reduce(emb.z, pca)
    x = proj(emb.z)
    k = int(max(2, min(components, len(x) // 2)))
    gm = GaussianMixture(k, covariance_type="diag", random_state=seed, reg_covar=1e-4, max_iter=200)
    gm.fit(x)
    resp = gm.predict_proba(x)
    mass = resp.sum(0)
    mean_loss = (resp.T @ emb.losses) / np.maximum(mass, 1e-12)
    eligible = np.where(mass >= s * 0.5)[0]
    if len(eligible) == 0:
        eligible = np.arange(k)
    order = eligible[np.argsort(-mean_loss[eligible])][:n]

    def score(e: Any) -> tuple[np.ndarray, np.ndarray]:
        zz = e.z if isinstance(e, Embeddings) else np.asarray(e, dtype=np.float64)
        r = gm.predict_proba(proj(zz))
        hard = r.argmax(1)
        return r[:, order].T, np.stack([hard == c for c in order])

    w, sup = score(emb)
    failed = tuple(bool(mass[c] < 0.9 * s) for c in order)
    info = [{"component": int(c), "weight": float(mass[c]), "mean_loss": float(mean_loss[c])} for c in order]
    return Slices("gmm", w, sup, failed, score,
                  {"size": size, "size_count": s, "n": n, "components": k, "pca": pca}, info)


def _onehot(y: np.ndarray, c: int) -> np.ndarray:
    out = np.zeros((len(y), c))
    out[np.arange(len(y)), y] = 1.0
    return out


def domino(embeddings: Embeddings, losses: Any = None, size: float = 0.02, n: int = 5, *,
           components: int = 25, pca: int | None = 32, gamma: float = 1.0, gamma_hat: float = 1.0,
           iters: int = 100, seed: int = 0, **_: Any) -> Slices:
    """An error-aware mixture (Domino-style): slices of embeddings, labels and predictions.

    Needs :class:`~nndiag.slices.embeddings.Embeddings` with ``labels`` and ``probs``.
    Components are ranked by ``mean P(ŷ) − mean P(y)`` (mean predicted probability of
    the predicted class minus that of the true class), among those of at least half
    the ``size``.
    """
    if not isinstance(embeddings, Embeddings) or embeddings.labels is None or embeddings.probs is None:
        raise InputError("domino needs embeddings with labels and predicted probabilities "
                         "(use extract_embeddings, or an .npz with 'labels' and 'probs')")
    emb = embeddings
    s = resolve_size(size, len(emb))
    proj = _reduce(emb.z, pca)
    x = proj(emb.z)
    n_pts, d = x.shape
    ncls = emb.probs.shape[1]
    if int(emb.labels.max()) >= ncls:
        raise InputError(f"labels reach {int(emb.labels.max())} but probs have {ncls} classes")
    k = int(max(2, min(components, n_pts // 2)))
    rng = np.random.default_rng(seed)
    yoh = _onehot(emb.labels, ncls)
    # initialise responsibilities from k-means++-like seeds on the embeddings
    centres = x[rng.choice(n_pts, size=k, replace=False)]
    r = np.exp(-0.5 * ((x[:, None] - centres[None]) ** 2).sum(-1))
    r = r / np.maximum(r.sum(1, keepdims=True), 1e-300)
    var_floor = 1e-3 * x.var(0).mean() + 1e-12

    def m_step(r: np.ndarray) -> tuple[np.ndarray, ...]:
        nk = r.sum(0) + 1e-10
        pi = nk / nk.sum()
        mu = (r.T @ x) / nk[:, None]
        var = (r.T @ x**2) / nk[:, None] - mu**2 + var_floor
        py = (r.T @ yoh + 1e-3) / (nk[:, None] + 1e-3 * ncls)
        pyh = (r.T @ emb.probs + 1e-3) / (nk[:, None] + 1e-3 * ncls)
        return pi, mu, np.maximum(var, var_floor), py, pyh

    def loglik(xx: np.ndarray, yy: np.ndarray | None, pp: np.ndarray | None, params: tuple) -> np.ndarray:
        pi, mu, var, py, pyh = params
        ll = (-0.5 * (((xx[:, None] - mu[None]) ** 2) / var[None] + np.log(2 * np.pi * var[None])).sum(-1)
              + np.log(pi)[None])
        if yy is not None:
            ll = ll + gamma * (yy @ np.log(py).T)
        if pp is not None:
            ll = ll + gamma_hat * (pp @ np.log(pyh).T)
        return ll

    params = m_step(r)
    prev = -np.inf
    for _ in range(iters):
        ll = loglik(x, yoh, emb.probs, params)
        mx = ll.max(1, keepdims=True)
        total = float((mx[:, 0] + np.log(np.exp(ll - mx).sum(1))).sum())
        r = np.exp(ll - mx)
        r /= r.sum(1, keepdims=True)
        params = m_step(r)
        if abs(total - prev) < 1e-6 * abs(total):
            break
        prev = total
    mass = r.sum(0)
    p_pred = emb.probs.max(1)
    p_true = emb.probs[np.arange(n_pts), emb.labels]
    gap = (r.T @ (p_pred - p_true)) / np.maximum(mass, 1e-12)
    eligible = np.where(mass >= 0.5 * s)[0]
    if len(eligible) == 0:
        eligible = np.arange(k)
    order = eligible[np.argsort(-gap[eligible])][:n]
    final = params

    def score(e: Any) -> tuple[np.ndarray, np.ndarray]:
        if not isinstance(e, Embeddings) or e.labels is None or e.probs is None:
            raise InputError("domino scores need embeddings with labels and probs")
        ll = loglik(proj(e.z), _onehot(e.labels, ncls), e.probs, final)
        rr = np.exp(ll - ll.max(1, keepdims=True))
        rr /= rr.sum(1, keepdims=True)
        hard = rr.argmax(1)
        return rr[:, order].T, np.stack([hard == c for c in order])

    w, sup = score(emb)
    mean_loss = (r.T @ emb.losses) / np.maximum(mass, 1e-12)
    info = [{"component": int(c), "weight": float(mass[c]), "gap": float(gap[c]),
             "mean_loss": float(mean_loss[c])} for c in order]
    failed = tuple(bool(mass[c] < 0.9 * s) for c in order)
    return Slices("domino", w, sup, failed, score,
                  {"size": size, "size_count": s, "n": n, "components": k, "pca": pca,
                   "gamma": gamma, "gamma_hat": gamma_hat}, info)
