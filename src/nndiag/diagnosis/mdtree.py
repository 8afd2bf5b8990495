"""MD tree: a hand-shaped decision tree over loss-landscape metrics (Zhou et al., ICML 2024).

The tree shapes are fixed; only the thresholds are learned. Each tree reads a
feature matrix whose column *i* is the feature tested by threshold slot *i*
(features may repeat, e.g. ``mode_connectivity_peak`` twice for Q2a).

Two ways to learn the thresholds:

``method="paper"``
    The published protocol: starting from fixed initial thresholds, each slot in
    turn (one pass, in order) is set to what bounded Brent minimisation
    (``scipy.optimize.minimize_scalar(method="bounded")``) returns for minus the
    training accuracy, the other slots held at their current values.
``method="exact"``
    nndiag's improved mode: coordinate search over *every* distinct split
    (midpoints of consecutive feature values), repeated until no slot changes;
    among tied best splits the one in the middle of the widest tied interval is
    taken (the largest margin), so the threshold does not sit on a training point.

Each fitted tree also keeps per-leaf class counts of its training data, from which
:meth:`MDTree.predict_proba` gives a Laplace-smoothed confidence.

Examples
--------
>>> import numpy as np
>>> X = np.array([[0.1, -5.0, 6.0], [3.0, -20.0, 5.0], [3.0, -20.0, 8.0], [3.0, -1.0, 8.0]])
>>> y = np.array(["small", "large", "small", "large"])
>>> tree = MDTree.fit(X, y, "temp")
>>> tree.predict(X).tolist()
['small', 'large', 'small', 'large']
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from nndiag.errors import InputError

# A node is ("leaf", label) or ("split", slot, left, right): left when x[slot] <= t[slot].
Node = tuple[Any, ...]


def _leaf(label: str) -> Node:
    return ("leaf", label)


def _split(slot: int, left: Node, right: Node) -> Node:
    return ("split", slot, left, right)


@dataclass(frozen=True)
class TreeSpec:
    """The fixed shape of one MD tree.

    Attributes
    ----------
    name : str
        Short name (``temp``, ``temp_cka``, ``width``, ``data``).
    label : str
        The label column it predicts (``bs_failure``, ``width_vs_batch``, ``data_vs_batch``).
    features : tuple of str
        Feature tested by each threshold slot.
    init : tuple of float
        Initial thresholds (paper protocol).
    bounds : tuple of (float, float)
        Bounds of each threshold for Brent's method.
    root : Node
        The tree.
    """

    name: str
    label: str
    features: tuple[str, ...]
    init: tuple[float, ...]
    bounds: tuple[tuple[float, float], ...]
    root: Node

    @property
    def n_slots(self) -> int:
        return len(self.init)

    def leaves(self) -> list[str]:
        """Leaf labels in depth-first (left to right) order; index = leaf id."""
        out: list[str] = []

        def walk(node: Node) -> None:
            if node[0] == "leaf":
                out.append(node[1])  # type: ignore[arg-type]
            else:
                walk(node[2])  # type: ignore[misc]
                walk(node[3])  # type: ignore[misc]

        walk(self.root)
        return out

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(sorted(set(self.leaves())))

    def leaf_ids(self, X: np.ndarray, thresholds: Sequence[Any]) -> np.ndarray:
        """The leaf each row of ``X`` reaches (vectorised).

        A threshold may be a 1-D array of ``k`` candidates: the result then has shape
        ``(k, n)``, one row per candidate (used by the exact search).
        """
        X = np.asarray(X, dtype=float)
        left = []
        for slot in range(self.n_slots):
            t = np.asarray(thresholds[slot], dtype=float)
            left.append(X[:, slot] <= (t[:, None] if t.ndim else t))
        shape = np.broadcast_shapes(*(m.shape for m in left))
        out = np.empty(shape, dtype=np.int64)
        counter = [0]

        def walk(node: Node, mask: np.ndarray) -> None:
            if node[0] == "leaf":
                out[mask] = counter[0]
                counter[0] += 1
                return
            go_left = left[node[1]]
            walk(node[2], mask & go_left)
            walk(node[3], mask & ~go_left)

        walk(self.root, np.ones(shape, dtype=bool))
        return out

    def predict(self, X: np.ndarray, thresholds: Sequence[Any]) -> np.ndarray:
        """Leaf labels for the rows of ``X`` (see :meth:`leaf_ids` for candidate arrays)."""
        return self._leaf_labels[self.leaf_ids(X, thresholds)]

    @cached_property
    def _leaf_labels(self) -> np.ndarray:
        return np.asarray(self.leaves())


_TE, _MC, _HT, _CKA = "train_error", "mode_connectivity_peak", "hessian_t", "CKA"

#: The trees of the paper (threshold order = slot order).
TREES: dict[str, TreeSpec] = {
    # Q1: is the temperature (lr/B) too small or too large?
    "temp": TreeSpec(
        "temp", "bs_failure", (_TE, _MC, _HT), (0.5, -10.0, 7.0), ((0, 1), (-30, 0), (4, 9)),
        _split(0, _leaf("small"), _split(1, _split(2, _leaf("large"), _leaf("small")), _leaf("large"))),
    ),
    # Q1 with CKA in place of the Hessian trace (leaves under the connectivity split swapped).
    "temp_cka": TreeSpec(
        "temp_cka", "bs_failure", (_TE, _MC, _CKA), (0.5, -10.0, 0.5), ((0, 1), (-30, 0), (0.2, 0.8)),
        _split(0, _leaf("small"), _split(1, _split(2, _leaf("small"), _leaf("large")), _leaf("large"))),
    ),
    # Q2a: width or temperature?
    "width": TreeSpec(
        "width", "width_vs_batch", (_TE, _MC, _MC), (0.5, -10.0, -10.0), ((0, 1), (-30, 0), (-30, 0)),
        _split(0, _split(1, _leaf("width"), _leaf("batch")), _split(2, _leaf("width"), _leaf("batch"))),
    ),
    # Q2b: data or temperature? (depth 3)
    "data": TreeSpec(
        "data", "data_vs_batch", (_TE, _MC, _HT, _MC, _HT, _HT), (0.5, -10.0, 7.0, -10.0, 7.0, 7.0),
        ((0, 1), (-30, 0), (4, 9), (-30, 0), (4, 9), (4, 9)),
        _split(
            0,
            _split(1, _split(4, _leaf("data"), _leaf("batch")), _split(2, _leaf("data"), _leaf("batch"))),
            _split(3, _leaf("batch"), _split(5, _leaf("data"), _leaf("batch"))),
        ),
    ),
}


def get_spec(tree: str | TreeSpec) -> TreeSpec:
    """A :class:`TreeSpec` by name (or the spec itself)."""
    if isinstance(tree, TreeSpec):
        return tree
    if tree not in TREES:
        raise InputError(f"unknown MD tree '{tree}'; choose one of {', '.join(TREES)}")
    return TREES[tree]


def _check_xy(X: np.ndarray, y: np.ndarray, spec: TreeSpec) -> tuple[np.ndarray, np.ndarray]:
    X = np.asarray(X, dtype=float)
    y = np.asarray(y).astype(str)
    if X.ndim != 2 or X.shape[1] != spec.n_slots:
        raise InputError(f"MD tree '{spec.name}' needs a matrix with {spec.n_slots} columns "
                         f"({', '.join(spec.features)}), got shape {X.shape}")
    if X.shape[0] != y.shape[0]:
        raise InputError(f"MD tree: {X.shape[0]} feature rows but {y.shape[0]} labels")
    if X.shape[0] == 0:
        raise InputError("MD tree: no training rows (after dropping 'optimal' labels)")
    if not np.isfinite(X).all():
        raise InputError("MD tree: the features contain NaN or Inf")
    unknown = sorted(set(y) - set(spec.classes))
    if unknown:
        raise InputError(f"MD tree '{spec.name}': unknown label(s) {', '.join(unknown)}; "
                         f"valid: {', '.join(spec.classes)}")
    return X, y


def fit_thresholds_brent(spec: TreeSpec, X: np.ndarray, y: np.ndarray,
                         init: Sequence[float] | None = None) -> list[float]:
    """The paper's threshold fit: one ordered pass of bounded Brent per slot.

    Parameters
    ----------
    spec : TreeSpec
    X : ndarray of shape (n, n_slots)
    y : ndarray of str
    init : sequence of float, optional
        Initial thresholds (default ``spec.init``).

    Returns
    -------
    list of float
    """
    from scipy.optimize import minimize_scalar

    t = list(spec.init if init is None else init)
    for slot in range(spec.n_slots):

        def objective(v: float, slot: int = slot) -> float:
            # the paper's objective leaves the last probed value in place; the
            # result below overwrites it with Brent's answer, as the paper does
            t[slot] = v
            return -float(np.mean(spec.predict(X, t) == y))

        res = minimize_scalar(objective, bounds=spec.bounds[slot], method="bounded")
        t[slot] = float(res.x)
    return t


def _candidates(values: np.ndarray, bounds: tuple[float, float] | None) -> np.ndarray:
    """Every distinct split of ``values`` (midpoints), kept inside ``bounds`` with its ends."""
    u = np.unique(values)
    mids = (u[:-1] + u[1:]) / 2.0
    if bounds is None:
        return np.concatenate([[u[0] - 1.0], mids, [u[-1] + 1.0]])
    lo, hi = float(bounds[0]), float(bounds[1])
    inside = mids[(mids > lo) & (mids < hi)]
    return np.unique(np.concatenate([[lo], inside, [hi]]))


def fit_thresholds_exact(spec: TreeSpec, X: np.ndarray, y: np.ndarray,
                         init: Sequence[float] | None = None, max_passes: int = 10,
                         bounded: bool = True) -> list[float]:
    """Exact coordinate search with largest-margin tie-breaking (nndiag's improved mode).

    For each slot every distinct split of its feature is scored by training
    accuracy; the best is kept, ties broken towards the middle of the widest run of
    tied candidates. Passes repeat until no threshold changes (or ``max_passes``).
    """
    t = list(spec.init if init is None else init)
    for _pass in range(max_passes):
        changed = False
        for slot in range(spec.n_slots):
            cands = _candidates(X[:, slot], spec.bounds[slot] if bounded else None)
            t_many: list[Any] = list(t)
            t_many[slot] = cands
            scores = (spec.predict(X, t_many) == y[None, :]).mean(1)
            best = scores.max()
            cur_score = np.mean(spec.predict(X, t) == y)
            tied = np.flatnonzero(scores >= best - 1e-12)
            # runs of consecutive tied candidates: take the widest one's middle
            runs: list[list[int]] = []
            for j in tied:
                if runs and j == runs[-1][-1] + 1:
                    runs[-1].append(int(j))
                else:
                    runs.append([int(j)])
            widths = [cands[r[-1]] - cands[r[0]] for r in runs]
            run = runs[int(np.argmax(widths))]
            lo, hi = cands[run[0]], cands[run[-1]]
            new = float((lo + hi) / 2.0) if len(run) > 1 else float(lo)
            if cur_score >= best - 1e-12 and lo <= t[slot] <= hi:
                continue  # already optimal inside the chosen run: keep it
            if new != t[slot]:
                t[slot] = new
                changed = True
        if not changed:
            break
    return t


@dataclass(frozen=True)
class MDTree:
    """A fitted MD tree.

    Attributes
    ----------
    spec : TreeSpec
    thresholds : tuple of float
    method : str
        ``paper`` or ``exact``.
    leaf_counts : ndarray of shape (n_leaves, n_classes)
        Training rows per leaf and class (class order = ``spec.classes``).
    train_accuracy : float
    """

    spec: TreeSpec
    thresholds: tuple[float, ...]
    method: str = "paper"
    leaf_counts: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    train_accuracy: float = float("nan")

    @classmethod
    def fit(cls, X: np.ndarray, y: np.ndarray, tree: str | TreeSpec = "temp", *,
            method: str = "paper", init: Sequence[float] | None = None) -> MDTree:
        """Learn the thresholds of ``tree`` on features ``X`` and labels ``y``.

        Parameters
        ----------
        X : ndarray of shape (n, n_slots)
            Column *i* = the feature of slot *i* (``spec.features``).
        y : array of str
            Labels (``optimal`` rows must already be dropped).
        tree : str or TreeSpec
            ``temp``, ``temp_cka``, ``width`` or ``data``.
        method : {"paper", "exact"}
        init : sequence of float, optional
            Initial thresholds (default: the paper's).
        """
        spec = get_spec(tree)
        X, y = _check_xy(X, y, spec)
        if method == "paper":
            t = fit_thresholds_brent(spec, X, y, init)
        elif method == "exact":
            t = fit_thresholds_exact(spec, X, y, init)
        else:
            raise InputError(f"unknown MD tree method '{method}'; choose paper or exact")
        return cls.from_thresholds(spec, t, X, y, method=method)

    @classmethod
    def from_thresholds(cls, tree: str | TreeSpec, thresholds: Sequence[float],
                        X: np.ndarray | None = None, y: np.ndarray | None = None, *,
                        method: str = "paper", leaf_counts: Any = None) -> MDTree:
        """A tree with given thresholds; leaf statistics from ``X, y`` or ``leaf_counts``."""
        spec = get_spec(tree)
        if len(thresholds) != spec.n_slots:
            raise InputError(f"MD tree '{spec.name}' needs {spec.n_slots} thresholds, got {len(thresholds)}")
        n_leaves, classes = len(spec.leaves()), spec.classes
        acc = float("nan")
        if X is not None and y is not None:
            X, y = _check_xy(X, y, spec)
            leaves = spec.leaf_ids(X, thresholds)
            counts = np.zeros((n_leaves, len(classes)))
            for ci, c in enumerate(classes):
                counts[:, ci] = np.bincount(leaves[y == c], minlength=n_leaves)
            acc = float(np.mean(spec.predict(X, thresholds) == y))
        elif leaf_counts is not None:
            counts = np.asarray(leaf_counts, dtype=float).reshape(n_leaves, len(classes))
        else:
            counts = np.zeros((n_leaves, len(classes)))
        return cls(spec, tuple(float(v) for v in thresholds), method, counts, acc)

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Predicted labels."""
        return self.spec.predict(np.asarray(X, dtype=float), self.thresholds)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Laplace-smoothed probability of the *predicted* label, from the leaf's training rows.

        ``(n_correct + 1) / (n + 2)`` where the leaf held ``n`` training rows of
        which ``n_correct`` carried the leaf's label; 0.5 for an empty leaf.
        """
        leaves = self.spec.leaf_ids(np.asarray(X, dtype=float), self.thresholds)
        labels = self.spec.leaves()
        classes = self.spec.classes
        correct = np.array([self.leaf_counts[i, classes.index(lab)] if self.leaf_counts.size else 0.0
                            for i, lab in enumerate(labels)])
        total = self.leaf_counts.sum(1) if self.leaf_counts.size else np.zeros(len(labels))
        return ((correct + 1.0) / (total + 2.0))[leaves]

    def score(self, X: np.ndarray, y: np.ndarray) -> float:
        """Accuracy on ``(X, y)``."""
        return float(np.mean(self.predict(X) == np.asarray(y).astype(str)))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe description (tree name, features, thresholds, leaf counts)."""
        return {
            "tree": self.spec.name,
            "label": self.spec.label,
            "features": list(self.spec.features),
            "thresholds": list(self.thresholds),
            "method": self.method,
            "classes": list(self.spec.classes),
            "leaves": self.spec.leaves(),
            "leaf_counts": self.leaf_counts.tolist(),
            "train_accuracy": None if np.isnan(self.train_accuracy) else self.train_accuracy,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MDTree:
        """Inverse of :meth:`to_dict`."""
        try:
            spec = get_spec(d["tree"])
            tree = cls.from_thresholds(spec, d["thresholds"], method=d.get("method", "paper"),
                                       leaf_counts=d.get("leaf_counts"))
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"invalid MD tree description ({exc})") from None
        acc = d.get("train_accuracy")
        return cls(tree.spec, tree.thresholds, tree.method, tree.leaf_counts,
                   float("nan") if acc is None else float(acc))
