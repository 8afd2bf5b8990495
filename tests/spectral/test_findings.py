"""SPEC-UNDERTRAINED / SPEC-OVERTRAINED judge small layers only on significant alphas."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch import nn

from nndiag.spectral import analyze
from nndiag.spectral.findings import JUDGED_EVALS, SIGNIFICANT_SE, spectral_findings


def _table(rows: list[tuple[str, int, float, int]]) -> pd.DataFrame:
    """Layer rows ``(name, num_evals, alpha, tail)`` with the CSN standard error (α − 1)/√tail."""
    return pd.DataFrame([{"name": n, "kind": "linear", "num_evals": e, "alpha": a,
                          "sigma": (a - 1) / np.sqrt(t), "num_pl_spikes": t, "status": "success",
                          "dtype": "float32", "matrix_rank": e, "log_spectral_norm": 0.0}
                         for n, e, a, t in rows])


def _by_code(findings):
    return {f.code: f for f in findings}


def test_small_layers_count_only_when_outside_by_two_standard_errors():
    df = _table([
        ("big_high", 512, 6.5, 40),      # large ESD: judged by alpha alone (WeightWatcher's rule)
        ("big_low", 64, 1.95, 60),
        ("tiny_vague", 9, 8.6, 5),       # 8.6 − 2·3.4 < 6: not significant
        ("tiny_clear", 9, 30.0, 9),      # 30 − 2·9.7 > 6
        ("tiny_low", 16, 1.5, 16),       # 1.5 + 2·0.125 = 1.75 < 2
        ("tiny_low_vague", 16, 1.9, 4),  # 1.9 + 2·0.45 > 2
        ("fine", 300, 3.0, 50),
    ])
    got = _by_code(spectral_findings(df, pd.DataFrame(columns=["reason"]), {"alpha": 7.0}))
    assert got["SPEC-UNDERTRAINED"].evidence["layers"] == ["big_high", "tiny_clear"]
    assert got["SPEC-OVERTRAINED"].evidence["layers"] == ["big_low", "tiny_low"]
    vague = got["SPEC-ALPHA-UNCERTAIN"]
    assert vague.severity == "pass" and vague.evidence["layers"] == ["tiny_vague", "tiny_low_vague"]
    assert vague.evidence["tail"] == [5, 4]
    # the rule's arithmetic, independently: |alpha − bound| against SIGNIFICANT_SE · sigma
    for name, a, t, bound in [("tiny_vague", 8.6, 5, 6.0), ("tiny_low_vague", 1.9, 4, 2.0)]:
        assert abs(a - bound) < SIGNIFICANT_SE * (a - 1) / np.sqrt(t), name
    assert "SPEC-OK" not in got  # some layers are flagged


def test_only_uncertain_layers_leave_the_model_ok():
    df = _table([("tiny", 9, 8.6, 5), ("fine", 300, 3.0, 50)])
    got = _by_code(spectral_findings(df, pd.DataFrame(columns=["reason"]), {"alpha": 5.8}))
    assert set(got) == {"SPEC-ALPHA-UNCERTAIN", "SPEC-OK"}
    assert got["SPEC-OK"].message.startswith("Every other fitted layer")


def test_a_first_convolution_of_nine_eigenvalues_is_not_called_under_trained():
    """Conv2d(1, 16, 3): nine 16×1 kernel-position matrices, nine eigenvalues pooled. Randomly
    initialised (seeds 1–7) WeightWatcher's rule calls it under-trained six times in seven, on
    alphas of 7–17 with standard errors of 2–8; a layer of 256 eigenvalues stays judged by alpha."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(1, 16, 3), nn.Flatten(), nn.Linear(16 * 36, 256))
    res = analyze(model)
    layers = res.layers.set_index("name")
    a, s = layers.loc["0", "alpha"], layers.loc["0", "sigma"]
    assert layers.loc["0", "num_evals"] == 9 < JUDGED_EVALS
    assert layers.loc["0", "warning"] == "under-trained"  # the per-layer column keeps WW's rule
    assert a > 6 and a - SIGNIFICANT_SE * s < 6
    got = _by_code(res.findings)
    assert got["SPEC-ALPHA-UNCERTAIN"].evidence["layers"] == ["0"]
    assert layers.loc["2", "alpha"] > 6  # a random 576→256 layer: 256 eigenvalues, alpha ~10
    assert got["SPEC-UNDERTRAINED"].evidence["layers"] == ["2"]


def test_large_layers_flagged_on_short_tails_are_named_as_weak_evidence():
    # pretrained ResNet20's layer3.0.conv1: 576 eigenvalues, alpha 9.23 on a tail of 6 (σ ≈ 3.4)
    df = _table([("short_tail", 576, 9.23, 6), ("long_tail", 576, 9.0, 400), ("low", 576, 1.9, 9),
                 ("fine", 300, 3.0, 50)])
    got = _by_code(spectral_findings(df, pd.DataFrame(columns=["reason"]), {"alpha": 5.0}))
    under, over = got["SPEC-UNDERTRAINED"], got["SPEC-OVERTRAINED"]
    assert under.evidence["layers"] == ["short_tail", "long_tail"]  # still counted (WW's rule)
    assert under.evidence["weak"] == ["short_tail"]  # 9.23 − 2·(8.23/√6) = 2.5 < 6; 9 − 2·0.4 > 6
    assert "1 of them lies within 2 standard errors of 6, on power-law tails of 6 eigenvalues" in under.message
    assert over.evidence["weak"] == ["low"] and "(it lies within 2 standard errors of 2" in over.message
    df = _table([("long_tail", 576, 9.0, 400)])
    under = _by_code(spectral_findings(df, pd.DataFrame(columns=["reason"]), {"alpha": 9.0}))["SPEC-UNDERTRAINED"]
    assert under.evidence["weak"] == [] and "weak" not in under.message
