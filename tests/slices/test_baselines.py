"""Baselines: loss ranking against argsort, mixture slices on a planted error cluster."""

from __future__ import annotations

import numpy as np
import pytest

from nndiag.errors import InputError
from nndiag.slices.baselines import domino, gmm_slices, loss_rank
from nndiag.slices.embeddings import Embeddings


def _clusters(seed=0, n_per=60, k=6, d=5):
    """k well-separated clusters; cluster 0 is mislabelled by the 'model'."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=6.0, size=(k, d))
    cl = np.repeat(np.arange(k), n_per)
    z = centres[cl] + rng.normal(size=(k * n_per, d))
    labels = cl % 3
    probs = np.full((len(z), 3), 0.05)
    preds = labels.copy()
    preds[cl == 0] = (labels[cl == 0] + 1) % 3
    probs[np.arange(len(z)), preds] = 0.9
    loss = -np.log(probs[np.arange(len(z)), labels])
    return Embeddings(z=z, losses=loss, labels=labels, preds=preds, probs=probs), cl == 0


def test_loss_rank_is_the_top_losses():
    rng = np.random.default_rng(0)
    loss = rng.random(200)
    s = loss_rank(rng.normal(size=(200, 3)), loss, size=0.05)
    top = np.argsort(-loss)[:10]
    assert set(np.flatnonzero(s.support[0])) == set(top)
    assert np.argmax(s.weights[0]) == np.argmax(loss)


@pytest.mark.parametrize("method", [gmm_slices, domino])
def test_mixture_baselines_find_the_error_cluster(method):
    emb, truth = _clusters()
    s = method(emb, size=0.05, n=2, components=6, pca=None)
    assert s.support[0][truth].mean() > 0.9
    assert truth[s.support[0]].mean() > 0.9
    w, sup = s.score(emb)
    np.testing.assert_allclose(w, s.weights)


def test_domino_needs_labels_and_probs():
    with pytest.raises(InputError, match="labels and predicted probabilities"):
        domino(Embeddings(z=np.zeros((10, 2)), losses=np.arange(10.0)))
