"""Quality signal on real models: trained vs untrained digits CNN, the four CIFAR-10 ResNets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nndiag.spectral import analyze
from tests.conftest import shared_asset

#: Test accuracies (%) stored in the checkpoints (``best_prec1``), see ../shared/ASSETS.md.
RESNET_ACC = {"resnet20": 91.78, "resnet32": 92.78, "resnet44": 93.14, "resnet56": 93.62}


def test_training_lowers_mean_alpha_on_digits_cnn():
    from nndiag._utils.training import accuracy, train_classifier
    from nndiag.io.data import load_data
    from nndiag.models.registry import build_model

    torch.manual_seed(0)
    data = load_data("digits")
    m = build_model("digits-cnn")
    before = analyze(m)
    train_classifier(m, data, epochs=5, max_steps=150, lr=0.05, seed=0, progress=False)
    after = analyze(m)
    assert accuracy(m, data) > 0.9
    assert after.summary["alpha"] < before.summary["alpha"] - 1.0
    # at initialisation the layers look random (alpha well above the heavy-tailed range)
    assert before.summary["alpha"] > 5


def test_resnet_series_ranking_by_summary_metrics():
    from scipy.stats import spearmanr

    from nndiag.io.checkpoint import read_checkpoint
    from nndiag.models.registry import build_model

    rows = {}
    for name in RESNET_ACC:
        m = build_model(name)
        m.load_state_dict(read_checkpoint(shared_asset("models", f"cifar10_{name}.th")))
        rows[name] = analyze(m, conventions="ww").summary
    acc = [RESNET_ACC[n] for n in RESNET_ACC]
    rho = {k: spearmanr(acc, [rows[n][k] for n in RESNET_ACC])[0]
           for k in ("alpha", "alpha_weighted", "log_norm", "log_spectral_norm", "log_alpha_norm")}
    # lower log_norm / log_spectral_norm / alpha_weighted = more accurate (REFERENCES.md: perfect ranking)
    assert rho["log_norm"] == pytest.approx(-1.0)
    assert rho["log_spectral_norm"] == pytest.approx(-1.0)
    assert rho["alpha_weighted"] == pytest.approx(-1.0)
    assert np.isfinite(rho["alpha"])
