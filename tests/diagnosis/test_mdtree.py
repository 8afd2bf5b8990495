"""MD tree: tree shapes, threshold fitting, confidence, serialisation, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from nndiag.diagnosis.mdtree import TREES, MDTree, fit_thresholds_brent, get_spec
from nndiag.errors import InputError


def _manual_temp(x: np.ndarray, t: list[float]) -> str:
    # the published Q1 tree, written out as plain if/else
    if x[0] <= t[0]:
        return "small"
    if x[1] <= t[1]:
        return "large" if x[2] <= t[2] else "small"
    return "large"


def _manual_data(x: np.ndarray, t: list[float]) -> str:
    if x[0] <= t[0]:
        if x[1] <= t[1]:
            return "data" if x[4] <= t[4] else "batch"
        return "data" if x[2] <= t[2] else "batch"
    if x[3] <= t[3]:
        return "batch"
    return "data" if x[5] <= t[5] else "batch"


def _random_features(n: int, spec_name: str, rng: np.random.Generator) -> np.ndarray:
    spec = get_spec(spec_name)
    cols = [rng.uniform(lo - 1, hi + 1, n) for lo, hi in spec.bounds]
    return np.column_stack(cols)


@pytest.mark.parametrize(("name", "manual"), [("temp", _manual_temp), ("data", _manual_data)])
def test_vectorised_tree_matches_plain_if_else(name, manual):
    rng = np.random.default_rng(0)
    spec = TREES[name]
    X = _random_features(300, name, rng)
    t = list(spec.init)
    expected = [manual(x, t) for x in X]
    assert spec.predict(X, t).tolist() == expected


def test_cka_tree_swaps_leaves_under_connectivity_split():
    X = np.array([[5.0, -20.0, 0.3], [5.0, -20.0, 0.7]])
    assert TREES["temp"].predict(X[:, :3], [0.5, -10, 0.5]).tolist() == ["large", "small"]
    assert TREES["temp_cka"].predict(X, [0.5, -10, 0.5]).tolist() == ["small", "large"]


def test_brent_fit_matches_scipy_run_by_hand():
    from scipy.optimize import minimize_scalar

    rng = np.random.default_rng(1)
    X = _random_features(200, "temp", rng)
    y = np.where(X[:, 1] + rng.normal(0, 5, 200) < -12, "small", "large")
    t = [0.5, -10.0, 7.0]
    for i, b in enumerate([(0, 1), (-30, 0), (4, 9)]):
        def f(v, i=i):
            t[i] = v
            return -np.mean(np.array([_manual_temp(x, t) for x in X]) == y)
        t[i] = minimize_scalar(f, bounds=b, method="bounded").x
    got = fit_thresholds_brent(TREES["temp"], X, y)
    np.testing.assert_allclose(got, t)


def test_exact_fit_beats_random_and_brent_thresholds():
    rng = np.random.default_rng(2)
    X = _random_features(250, "width", rng)
    y = np.where((X[:, 0] > 0.3) ^ (X[:, 2] < -15), "width", "batch")
    flip = rng.random(250) < 0.1
    y[flip] = np.where(y[flip] == "width", "batch", "width")
    exact = MDTree.fit(X, y, "width", method="exact")
    paper = MDTree.fit(X, y, "width", method="paper")
    spec = TREES["width"]
    best_random = max(
        np.mean(spec.predict(X, [rng.uniform(lo, hi) for lo, hi in spec.bounds]) == y) for _ in range(2000)
    )
    assert exact.train_accuracy >= paper.train_accuracy
    assert exact.train_accuracy >= best_random
    for t, (lo, hi) in zip(exact.thresholds, spec.bounds, strict=True):
        assert lo <= t <= hi


def test_confidence_is_laplace_smoothed_leaf_accuracy():
    X = np.array([[0.1, -5, 5], [0.2, -5, 5], [0.3, -5, 5], [5, -1, 5], [5, -1, 5]], dtype=float)
    y = np.array(["small", "small", "large", "large", "large"])
    tree = MDTree.from_thresholds("temp", [0.5, -10, 7], X, y)
    proba = tree.predict_proba(X)
    np.testing.assert_allclose(proba[:3], (2 + 1) / (3 + 2))
    np.testing.assert_allclose(proba[3:], (2 + 1) / (2 + 2))
    again = MDTree.from_dict(tree.to_dict())
    assert again.thresholds == tree.thresholds
    np.testing.assert_allclose(again.predict_proba(X), proba)
    assert tree.train_accuracy == pytest.approx(0.8)


def test_bad_input_is_a_clear_error():
    with pytest.raises(InputError, match="unknown MD tree"):
        get_spec("nope")
    with pytest.raises(InputError, match="3 columns"):
        MDTree.fit(np.zeros((4, 2)), np.array(["small"] * 4), "temp")
    with pytest.raises(InputError, match="unknown label"):
        MDTree.fit(np.zeros((2, 3)), np.array(["small", "optimal"]), "temp")
    with pytest.raises(InputError, match="NaN"):
        MDTree.fit(np.full((2, 3), np.nan), np.array(["small", "large"]), "temp")
    with pytest.raises(InputError, match="method"):
        MDTree.fit(np.zeros((2, 3)), np.array(["small", "large"]), "temp", method="magic")
    with pytest.raises(InputError, match="thresholds"):
        MDTree.from_thresholds("temp", [1.0, 2.0])
