"""LLA's criteria across training on a digits MLP move the way LLA reports.

LLA (Gabdullin 2024) reads ``re`` and ``Kh`` near 1 as a random-init-like symmetric
spectrum and near 0 as a well-trained minimum; λmax alone need not be monotone.
"""

from __future__ import annotations

import copy

import pytest

from nndiag._utils.seeding import fork_rng
from nndiag._utils.training import train_classifier
from nndiag.io.data import load_data
from nndiag.landscape import hessian_spectrum
from nndiag.models import build_model


def test_criteria_fall_from_random_init_to_trained():
    train = load_data("digits?split=train")
    probe = train.subset(384, seed=1)
    with fork_rng(0):
        model = build_model("digits-mlp")
    stages = {}
    done = 0
    for steps in (0, 30, 300):
        if steps > done:
            train_classifier(model, train, epochs=100, max_steps=steps - done, lr=0.05, batch_size=64,
                             seed=steps, progress=False)
            done = steps
        r = hessian_spectrum(copy.deepcopy(model), probe, top_k=1, density=True, slq_runs=2, slq_steps=40)
        stages[steps] = r
    re = [stages[s].criteria["re"] for s in (0, 30, 300)]
    kh = [stages[s].criteria["Kh"] for s in (0, 30, 300)]
    assert re[0] > 0.5 and re[2] < 0.1, re  # random-init-like → well trained
    assert re[0] > re[1] > re[2], re
    assert kh[0] > kh[1] > kh[2], kh
    assert kh[0] == pytest.approx(1.0, abs=0.25)
    codes = {s: {f.code for f in stages[s].findings()} for s in stages}
    assert "HESS-RANDOM-LIKE" in codes[0] and "HESS-MAINLY-POSITIVE" in codes[300]
