"""Baselines the MD tree is compared against: free decision trees on other features.

- **validation**: a depth-4 CART tree on ``train_error, train_loss, test_loss, test_error``;
- **hyperparameter**: the same tree on ``log_data_amount, log_para_amount`` (Q1) or
  ``log_data_amount`` (Q2a/Q2b), i.e. the knobs themselves.

Both are scikit-learn ``DecisionTreeClassifier(criterion="gini", max_depth=4,
random_state=seed)``, as in the MD tree paper.

Examples
--------
>>> import numpy as np
>>> X = np.array([[0.0], [1.0], [2.0], [3.0]]); y = np.array(["a", "a", "b", "b"])
>>> fit_tree_baseline(X, y, seed=0).predict([[0.5], [2.5]]).tolist()
['a', 'b']
"""

from __future__ import annotations

from typing import Any

import numpy as np

VALIDATION_FEATURES: tuple[str, ...] = ("train_error", "train_loss", "test_loss", "test_error")

#: Hyper-parameter baseline features per label column.
HYPERPARAMETER_FEATURES: dict[str, tuple[str, ...]] = {
    "bs_failure": ("log_data_amount", "log_para_amount"),
    "width_vs_batch": ("log_data_amount",),
    "data_vs_batch": ("log_para_amount",),
}


def fit_tree_baseline(X: np.ndarray, y: np.ndarray, *, seed: int = 0, depth: int = 4) -> Any:
    """A fitted ``sklearn.tree.DecisionTreeClassifier`` (gini, ``max_depth=depth``).

    Parameters
    ----------
    X : ndarray of shape (n, d)
    y : array of labels
    seed : int
        ``random_state`` of the tree (the paper uses the sampling seed).
    depth : int
        Maximum depth (4 in the paper).
    """
    from sklearn.tree import DecisionTreeClassifier

    return DecisionTreeClassifier(criterion="gini", max_depth=depth, random_state=seed).fit(
        np.asarray(X, dtype=float), np.asarray(y).astype(str))


def baseline_features(kind: str, label: str) -> tuple[str, ...]:
    """The feature columns of baseline ``kind`` (``validation`` or ``hyperparameter``)."""
    if kind == "validation":
        return VALIDATION_FEATURES
    if kind == "hyperparameter":
        return HYPERPARAMETER_FEATURES[label]
    from nndiag.errors import InputError

    raise InputError(f"unknown baseline '{kind}'; choose validation or hyperparameter")
