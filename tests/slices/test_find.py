"""find_slices end to end on a trained digits model with a planted error; the report,
JSON round trip, figures from JSON only, and the probe contract."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from nndiag._utils.model_state import same_snapshot, snapshot
from nndiag._utils.seeding import fork_rng
from nndiag._utils.threads import limit_threads
from nndiag._utils.training import train_classifier
from nndiag.io.data import load_data
from nndiag.io.models import load_model
from nndiag.models import build_model
from nndiag.report.results import Result
from nndiag.slices import find_slices, probe


@pytest.fixture(scope="module")
def trained():
    """A digits MLP trained with every '3' relabelled as '8': the 3s are a failing slice."""
    data = load_data("digits")
    train, test = data.split(0.3, seed=0)
    y = train.y.clone()
    y[y == 3] = 8
    with fork_rng(0):
        model = build_model("digits-mlp")
    with limit_threads(1):
        train_classifier(model, replace(train, y=y), epochs=15, batch_size=32, lr=0.05, seed=0,
                         progress=False)
    return model, test


def test_find_slices_reports_the_planted_slice(trained):
    model, test = trained
    before = snapshot(model)
    r = find_slices(model, test, size=0.05, n=2, steps=300, seed=0)
    assert same_snapshot(before, snapshot(model))
    t = r.tables["slices"]
    assert list(t.columns[:3]) == ["name", "method", "size"]
    top = t.iloc[0]
    assert not top["failed"]
    assert next(iter(top["class_counts"])) == "3"
    assert top["accuracy"] < 0.3 < top["accuracy_out"]
    assert top["size"] >= 0.9 * 0.05 * len(test)
    # independent check of the reported numbers from the raw labels
    idx = np.asarray(top["top_indices"])
    assert (test.y.numpy()[idx] == 3).mean() >= 0.9
    codes = [f.code for f in r.findings]
    assert "SLICE-SYSTEMATIC" in codes
    assert {"slices", "points", "gallery"} <= set(r.tables)
    assert len(r.tables["gallery"]) <= 2 * 8


@pytest.mark.parametrize("method", ["loss_rank", "gmm", "domino"])
def test_baseline_methods_through_find_slices(trained, method):
    model, test = trained
    r = find_slices(model, test, method=method, size=0.05, n=2, seed=0)
    assert r.summary["method"] == method
    assert len(r.tables["slices"]) >= 1


def test_json_round_trip_and_figures_from_json(trained):
    model, test = trained
    r = probe.run(load_model(model), test, seed=0, size=0.05, n=2, steps=200)
    doc = json.loads(r.to_json())
    back = Result.from_dict(doc)
    assert back.kind == probe.NAME == "slices" and probe.NEEDS_DATA
    assert back.tables["slices"].iloc[0]["top_indices"] == r.tables["slices"].iloc[0]["top_indices"]
    figs = probe.figures(back)
    assert set(figs) == {"pca", "gallery"}
    gal_axes = [ax for ax in figs["gallery"].axes if ax.images]
    assert len(gal_axes) == len(r.tables["gallery"])
    thumb = np.asarray(r.tables["gallery"].iloc[0]["thumb"])
    assert thumb.shape == (8, 8) and thumb.dtype.kind in "iu"


def test_slice_table_and_findings_by_hand():
    from nndiag.slices.base import Slices
    from nndiag.slices.embeddings import Embeddings
    from nndiag.slices.report import slice_findings, slice_table

    labels = np.array([0, 0, 1, 1, 2, 2, 0, 1])
    preds = np.array([1, 1, 1, 1, 2, 2, 0, 1])  # examples 0 and 1 are wrong
    loss = np.array([3.0, 2.0, 0.1, 0.2, 0.1, 0.3, 0.2, 0.1])
    emb = Embeddings(z=np.zeros((8, 2)), losses=loss, labels=labels, preds=preds)
    w = np.array([[1.0, 0.5, 0.25, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0.1, 0, 0, 0]])
    sl = Slices("spotlight", w, w > 0, (False, True), lambda e: (w, w > 0))
    t = slice_table(sl, emb)
    row = t.iloc[0]
    assert row["members"] == 3 and row["size"] == 1.75
    assert row["mean_loss"] == (3.0 + 2.0 + 0.1) / 3
    assert row["weighted_mean_loss"] == (3.0 + 1.0 + 0.025) / 1.75
    assert row["accuracy"] == 1 / 3 and row["accuracy_out"] == 1.0
    assert row["class_counts"] == {"0": 2, "1": 1}
    assert row["top_indices"] == [0, 1, 2]
    # 3 members, 1 correct at 75 % overall: P(X ≤ 1) = 0.25³ + 3·0.75·0.25² = 0.156, too few to tell
    codes = {f.code: f for f in slice_findings(t, emb)}
    assert codes["SLICE-FAILED"].evidence["failed"] == ["slice-2"]
    assert "SLICE-SYSTEMATIC" not in codes and codes["SLICE-NONE"].evidence["unclear"] == ["slice-1"]
    assert "p = 0.16" in codes["SLICE-NONE"].message
    codes = {f.code: f for f in slice_findings(t, emb, alpha=1.0)}  # the accuracy gap alone
    assert codes["SLICE-SYSTEMATIC"].evidence["slice"] == "slice-1"
    assert codes["SLICE-SYSTEMATIC"].evidence["p_value"] == pytest.approx(0.25 ** 3 + 3 * 0.75 * 0.25 ** 2)
    assert "SLICE-NONE" not in codes


def test_a_slice_is_systematic_only_with_the_evidence_for_it():
    """40 examples at 0.40 against 0.78 overall are evidence (binomial p ~ 2e-7); 3 examples
    all wrong are what chance gives often enough (p = 0.22³ = 0.011, above 0.01 / 2 slices)."""
    from math import comb

    from nndiag.slices.base import Slices
    from nndiag.slices.embeddings import Embeddings
    from nndiag.slices.report import slice_findings, slice_table

    n = 200
    correct = np.ones(n, dtype=bool)
    correct[:24] = False  # slice A: examples 0..39, 16 correct
    correct[40:43] = False  # slice B: examples 40..42, none correct
    correct[43:60] = False  # elsewhere: overall 0.78
    labels = np.zeros(n, dtype=int)
    preds = np.where(correct, 0, 1)
    emb = Embeddings(z=np.zeros((n, 2)), losses=np.where(correct, 0.1, 2.0), labels=labels, preds=preds)
    w = np.zeros((2, n))
    w[0, :40], w[1, 40:43] = 1.0, 1.0
    sl = Slices("spotlight", w, w > 0, (False, False), lambda e: (w, w > 0))
    t = slice_table(sl, emb)
    overall = correct.mean()
    p_a = sum(comb(40, j) * overall ** j * (1 - overall) ** (40 - j) for j in range(17))
    p_b = (1 - overall) ** 3
    assert p_a < 1e-4 and 0.01 / 2 < p_b
    found = [f for f in slice_findings(t, emb) if f.code == "SLICE-SYSTEMATIC"]
    assert [f.evidence["slice"] for f in found] == ["slice-1"]
    assert found[0].evidence["p_value"] == pytest.approx(p_a, rel=1e-9)
    assert found[0].evidence["alpha"] == pytest.approx(0.01 / 2)


def test_findings_and_gallery_name_classes_where_the_data_has_names():
    from nndiag.slices.base import Slices
    from nndiag.slices.embeddings import Embeddings
    from nndiag.slices.report import gallery_table, slice_findings, slice_table

    labels = np.array([0, 0, 1, 1, 2, 2, 0, 1])
    preds = np.array([1, 1, 1, 1, 2, 2, 0, 1])
    loss = np.array([3.0, 2.0, 0.1, 0.2, 0.1, 0.3, 0.2, 0.1])
    w = np.array([[1.0, 0.5, 0.25, 0, 0, 0, 0, 0]])
    sl = Slices("spotlight", w, w > 0, (False,), lambda e: (w, w > 0))
    x = np.zeros((8, 3, 4, 4), dtype=np.float32)
    for classes, text, label_name in ((["cat", "dog", "frog"], "67% are class 0 (cat)", "cat"),
                                      (["0", "1", "2"], "67% are class 0", None),  # digits: names add nothing
                                      ([], "67% are class 0", None)):
        emb = Embeddings(z=np.zeros((8, 2)), losses=loss, labels=labels, preds=preds, meta={"classes": classes})
        msg = next(f.message for f in slice_findings(slice_table(sl, emb), emb, alpha=1.0)
                   if f.code == "SLICE-SYSTEMATIC")
        assert msg.endswith(text)
        g = gallery_table(sl, emb, x)
        assert g.iloc[0]["label_name"] == label_name and g.iloc[0]["label"] == 0
