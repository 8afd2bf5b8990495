"""Fitted MD trees for users' models: fitting them on a zoo, saving, loading, applying.

A *threshold set* holds three fitted trees — ``temp`` (Q1: temperature too small or
too large), ``width`` (Q2a: width or temperature) and ``data`` (Q2b: data or
temperature) — plus the range of each feature seen during fitting. nndiag ships
one, fitted on its digits MLP zoo (``data/thresholds.json``, produced by
``scripts/mdtree_zoo.py``); :func:`fit_threshold_set` fits another on any zoo table.

:func:`decide` turns a model's features into a diagnosis: if Q2a says the width is
the bottleneck (from a leaf with confidence ≥ :data:`MIN_OVERRIDE_CONFIDENCE`), "increase
width"; else if Q2b says data (same rule), "get more data"; else the temperature answer
of Q1. The confidence is the Laplace-smoothed training accuracy
of the leaf reached (product over the questions consulted).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from nndiag.diagnosis.mdtree import TREES, MDTree
from nndiag.errors import DataError, InputError

QUESTIONS: tuple[str, ...] = ("temp", "width", "data")
#: "Increase width" / "get more data" override the temperature answer only from a leaf
#: at least this reliable on the fitting zoo (Q2 trees are weaker than Q1 on small zoos).
MIN_OVERRIDE_CONFIDENCE = 0.6

#: Fixed bounds with a meaning independent of the model's scale (percentages);
#: the other slots are bounded by the fitting zoo's 5–95 % quantiles.
SCALE_FREE_BOUNDS: dict[str, tuple[float, float]] = {
    "train_error": (0.0, 1.0),
    "mode_connectivity_peak": (-30.0, 0.0),
}

RECOMMENDATIONS: dict[str, tuple[str, str, str]] = {
    # answer -> (finding code, failure mode, recommended change)
    "small": ("MDT-TEMP-TOO-SMALL", "optimizer temperature (lr/batch size) too small",
              "decrease the batch size or increase the learning rate"),
    "large": ("MDT-TEMP-TOO-LARGE", "optimizer temperature (lr/batch size) too large",
              "increase the batch size or decrease the learning rate"),
    "width": ("MDT-MODEL-TOO-SMALL", "model too small", "increase the width"),
    "data": ("MDT-TOO-LITTLE-DATA", "too little training data", "get more training data"),
}


def _bounds_for(tree: str, frame: pd.DataFrame) -> tuple[tuple[float, float], ...]:
    out = []
    for feat in TREES[tree].features:
        if feat in SCALE_FREE_BOUNDS:
            out.append(SCALE_FREE_BOUNDS[feat])
        else:
            lo, hi = np.nanquantile(frame[feat].to_numpy(float), [0.05, 0.95])
            out.append((float(lo), float(hi)))
    return tuple(out)


@dataclass(frozen=True)
class ThresholdSet:
    """Fitted trees for the three questions and the feature ranges they were fitted on."""

    trees: dict[str, MDTree]
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"trees": {k: v.to_dict() for k, v in self.trees.items()},
                "ranges": {k: list(v) for k, v in self.ranges.items()}, "meta": self.meta}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ThresholdSet:
        try:
            trees = {k: MDTree.from_dict(v) for k, v in d["trees"].items()}
            ranges = {k: (float(v[0]), float(v[1])) for k, v in d.get("ranges", {}).items()}
        except (KeyError, TypeError, IndexError, AttributeError) as exc:
            raise InputError(f"invalid thresholds file ({exc})") from None
        if "temp" not in trees:
            raise InputError("invalid thresholds file: it has no 'temp' tree")
        return cls(trees, ranges, d.get("meta", {}))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")


def fit_threshold_set(frame: pd.DataFrame, *, method: str = "exact", meta: dict[str, Any] | None = None
                      ) -> ThresholdSet:
    """Fit the three trees on a labelled zoo table (``optimal`` rows dropped per question).

    Starting thresholds are the middles of each slot's bounds; bounds are the
    scale-free ones for errors (%) and the zoo's 5–95 % quantiles otherwise.
    """
    trees = {}
    for q in QUESTIONS:
        spec = TREES[q]
        missing = [c for c in (*spec.features, spec.label) if c not in frame.columns]
        if missing:
            raise DataError(f"zoo table: missing column(s) {', '.join(sorted(set(missing)))}")
        rows = frame[frame[spec.label] != "optimal"].dropna(subset=list(spec.features))
        if rows[spec.label].nunique() < 2:
            continue  # nothing to learn for this question on this zoo
        bounds = _bounds_for(q, rows)
        from dataclasses import replace

        local = replace(spec, bounds=bounds, init=tuple((lo + hi) / 2 for lo, hi in bounds))
        X = rows[list(spec.features)].to_numpy(float)
        y = rows[spec.label].astype(str).to_numpy()
        fitted = MDTree.fit(X, y, local, method=method)
        trees[q] = MDTree(spec, fitted.thresholds, fitted.method, fitted.leaf_counts, fitted.train_accuracy)
    if "temp" not in trees:
        raise DataError("zoo table: the temperature question has a single class; the zoo is too small")
    feats = sorted({f for q in trees for f in TREES[q].features})
    ranges = {f: (float(frame[f].min()), float(frame[f].max())) for f in feats}
    return ThresholdSet(trees, ranges, dict(meta or {}, method=method, n_rows=len(frame)))


def default_thresholds_path() -> Path:
    """The thresholds file shipped with nndiag."""
    return Path(str(resources.files("nndiag.diagnosis") / "data" / "thresholds.json"))


def load_thresholds(path: str | Path | None = None) -> ThresholdSet:
    """A threshold set from ``path`` (default: the shipped one)."""
    p = Path(path) if path is not None else default_thresholds_path()
    if not p.is_file():
        raise InputError(f"{p}: thresholds file not found")
    try:
        d = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{p}: not a JSON thresholds file ({exc.msg})") from None
    return ThresholdSet.from_dict(d)


@dataclass(frozen=True)
class Diagnosis:
    """The answer for one model."""

    answer: str
    failure_mode: str
    recommendation: str
    code: str
    confidence: float
    answers: dict[str, str]
    confidences: dict[str, float]
    out_of_range: list[str]


def decide(features: dict[str, float], ts: ThresholdSet) -> Diagnosis:
    """Apply a threshold set to one model's features."""
    answers, confs = {}, {}
    for q, tree in ts.trees.items():
        x = np.array([[features.get(f, np.nan) for f in tree.spec.features]], dtype=float)
        if not np.isfinite(x).all():
            continue  # a missing feature (e.g. a non-positive Hessian trace): skip this question
        answers[q] = str(tree.predict(x)[0])
        confs[q] = float(tree.predict_proba(x)[0])
    if "temp" not in answers:
        bad = [f for f in ts.trees["temp"].spec.features if not np.isfinite(features.get(f, np.nan))]
        raise DataError(f"cannot diagnose: feature(s) {', '.join(bad)} missing or not finite")
    if answers.get("width") == "width" and confs["width"] >= MIN_OVERRIDE_CONFIDENCE:
        key, conf = "width", confs["width"]
    elif answers.get("data") == "data" and confs["data"] >= MIN_OVERRIDE_CONFIDENCE:
        key, conf = "data", confs["data"] * confs.get("width", 1.0)
    else:
        key = answers["temp"]
        conf = confs["temp"] * confs.get("width", 1.0) * confs.get("data", 1.0)
    code, mode, rec = RECOMMENDATIONS[key]
    oor = [f for f, (lo, hi) in ts.ranges.items()
           if f in features and np.isfinite(features[f]) and not lo <= features[f] <= hi]
    return Diagnosis(key, mode, rec, code, float(conf), answers, confs, oor)


def evaluate_transfer(train: pd.DataFrame, test: pd.DataFrame, *, seed: int = 0) -> pd.DataFrame:
    """Fit on one labelled zoo, score on another: MD tree (paper and exact) vs both baselines.

    Returns one row per question with accuracies in % and row counts.
    """
    from dataclasses import replace

    from nndiag.diagnosis.baselines import baseline_features, fit_tree_baseline

    rows = []
    for q in QUESTIONS:
        spec = TREES[q]
        tr = train[train[spec.label] != "optimal"].dropna(subset=list(spec.features))
        te = test[test[spec.label] != "optimal"].dropna(subset=list(spec.features))
        if tr[spec.label].nunique() < 2 or te.empty:
            continue
        y, yt = tr[spec.label].astype(str).to_numpy(), te[spec.label].astype(str).to_numpy()
        bounds = _bounds_for(q, tr)
        local = replace(spec, bounds=bounds, init=tuple((lo + hi) / 2 for lo, hi in bounds))
        row: dict[str, Any] = {"name": q, "label": spec.label, "n_train": len(tr), "n_test": len(te),
                               "majority": 100.0 * float(np.mean(yt == pd.Series(y).mode()[0]))}
        for method in ("paper", "exact"):
            tree = MDTree.fit(tr[list(spec.features)].to_numpy(float), y, local, method=method)
            row[f"mdtree_{method}"] = 100.0 * tree.score(te[list(spec.features)].to_numpy(float), yt)
        for kind in ("validation", "hyperparameter"):
            cols = list(baseline_features(kind, spec.label))
            clf = fit_tree_baseline(tr[cols].to_numpy(float), y, seed=seed)
            row[kind] = 100.0 * float(np.mean(clf.predict(te[cols].to_numpy(float)) == yt))
        rows.append(row)
    return pd.DataFrame(rows)
