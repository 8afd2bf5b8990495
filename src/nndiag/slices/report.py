"""Per-slice report: tidy tables and findings from a :class:`~nndiag.slices.base.Slices`.

Tables (all JSON-safe, so figures re-render from a saved result):

- ``slices``: one row per slice — ``name``, ``method``, ``size`` (total weight),
  ``members`` (support count), ``mean_loss`` (members), ``weighted_mean_loss``,
  ``accuracy`` (members), ``accuracy_out``, ``class_counts``, ``top_indices``, ``failed``;
- ``points``: a 2-D PCA projection of (a seeded subset of) the examples with loss, label
  and the first slice each belongs to (0: none);
- ``gallery``: for image data, the top members of each slice with a small thumbnail.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from nndiag.report.results import Finding
from nndiag.slices.base import Slices
from nndiag.slices.embeddings import Embeddings

MAX_POINTS = 2000
GALLERY_PER_SLICE = 8
THUMB_MAX = 16


def slice_table(slices: Slices, emb: Embeddings, top: int = 10) -> pd.DataFrame:
    """One row per slice (see module docstring)."""
    correct = emb.correct
    rows = []
    for j in range(len(slices)):
        w, sup = slices.weights[j], slices.support[j]
        order = np.argsort(-w, kind="stable")
        top_idx = [int(i) for i in order[:top] if w[i] > 0]
        members = int(sup.sum())
        counts: dict[str, int] = {}
        if emb.labels is not None and members:
            lab, cnt = np.unique(emb.labels[sup], return_counts=True)
            counts = {str(int(a)): int(b) for a, b in sorted(zip(lab, cnt, strict=True), key=lambda t: -t[1])}
        acc_in = float(correct[sup].mean()) if correct is not None and members else None
        acc_out = float(correct[~sup].mean()) if correct is not None and (~sup).any() else None
        rows.append({
            "name": f"slice-{j + 1}",
            "method": slices.method,
            "size": float(w.sum()),
            "members": members,
            "mean_loss": float(emb.losses[sup].mean()) if members else None,
            "weighted_mean_loss": float(w @ emb.losses / w.sum()) if w.sum() > 0 else None,
            "accuracy": acc_in,
            "accuracy_out": acc_out,
            "class_counts": counts,
            "top_indices": top_idx,
            "failed": bool(slices.failed[j]),
        })
    return pd.DataFrame(rows)


def points_table(slices: Slices, emb: Embeddings, seed: int = 0, max_points: int = MAX_POINTS) -> pd.DataFrame:
    """A 2-D PCA projection of the examples (top members always kept)."""
    n = len(emb)
    keep = np.arange(n)
    if n > max_points:
        rng = np.random.default_rng(seed)
        must = np.unique(np.concatenate([np.argsort(-w)[:GALLERY_PER_SLICE] for w in slices.weights]))
        rest = np.setdiff1d(np.arange(n), must)
        keep = np.sort(np.concatenate([must, rng.choice(rest, max_points - len(must), replace=False)]))
    zc = emb.z - emb.z.mean(0)
    _, _, vt = np.linalg.svd(zc[keep], full_matrices=False)
    xy = zc[keep] @ vt[:2].T
    if xy.shape[1] < 2:
        xy = np.column_stack([xy, np.zeros(len(keep))])
    first = np.zeros(n, dtype=int)
    for j in range(len(slices) - 1, -1, -1):
        first[slices.support[j]] = j + 1
    df = pd.DataFrame({"name": [f"ex-{i}" for i in keep], "index": keep, "pc1": xy[:, 0], "pc2": xy[:, 1],
                       "loss": emb.losses[keep], "slice": first[keep],
                       "weight": slices.weights[:, keep].max(0)})
    if emb.labels is not None:
        df["label"] = emb.labels[keep]
    return df


def _thumb(img: np.ndarray) -> list[Any]:
    """A small uint8 thumbnail (H×W or H×W×3) of one image given channel-first or 2-D."""
    a = np.asarray(img, dtype=np.float64)
    if a.ndim == 3 and a.shape[0] in (1, 3):
        a = np.transpose(a, (1, 2, 0))
        if a.shape[2] == 1:
            a = a[..., 0]
    step = int(np.ceil(max(a.shape[0], a.shape[1]) / THUMB_MAX))
    if step > 1:
        h, w = (a.shape[0] // step) * step, (a.shape[1] // step) * step
        a = a[:h, :w]
        a = a.reshape(h // step, step, w // step, step, *a.shape[2:]).mean((1, 3))
    lo, hi = float(a.min()), float(a.max())
    a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    return np.round(a * 255).astype(np.uint8).tolist()


def is_image_batch(x: Any) -> bool:
    """Whether inputs look like images: (N, H, W) or (N, C, H, W) with C in 1, 3."""
    shape = tuple(getattr(x, "shape", ()))
    return len(shape) == 3 or (len(shape) == 4 and shape[1] in (1, 3))


def gallery_table(slices: Slices, emb: Embeddings, x: Any, per_slice: int = GALLERY_PER_SLICE) -> pd.DataFrame:
    """Top members of each slice with thumbnails (empty when ``x`` is not images)."""
    if x is None or not is_image_batch(x):
        return pd.DataFrame(columns=["name", "slice", "rank", "index", "weight", "label", "pred", "loss", "thumb"])
    xa = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
    names = list((emb.meta or {}).get("classes") or [])

    def named(k: int | None) -> str | None:
        return names[k] if k is not None and 0 <= k < len(names) and names[k] != str(k) else None

    rows = []
    for j in range(len(slices)):
        w = slices.weights[j]
        for r, i in enumerate([i for i in np.argsort(-w, kind="stable")[:per_slice] if w[i] > 0]):
            rows.append({"name": f"slice-{j + 1}", "slice": j + 1, "rank": r + 1, "index": int(i),
                         "weight": float(w[i]),
                         "label": None if emb.labels is None else int(emb.labels[i]),
                         "pred": None if emb.preds is None else int(emb.preds[i]),
                         "loss": float(emb.losses[i]), "thumb": _thumb(xa[i])})
            rows[-1]["label_name"], rows[-1]["pred_name"] = named(rows[-1]["label"]), named(rows[-1]["pred"])
    return pd.DataFrame(rows)


def slice_findings(table: pd.DataFrame, emb: Embeddings, min_gap: float = 0.2,
                   alpha: float = 0.01) -> list[Finding]:
    """``SLICE-SYSTEMATIC`` / ``SLICE-NONE`` / ``SLICE-FAILED`` findings.

    A slice is reported as systematic when its accuracy is at least ``min_gap`` below the
    overall accuracy *and* that many errors among its members would be unlikely at the
    overall accuracy: one-sided binomial ``P(X ≤ correct) ≤ alpha / slices`` (Bonferroni over
    the slices tested). The slices are searched for high loss, so this guards against what
    chance alone gives small slices (4 examples all wrong at 25 % overall accuracy: p = 0.32),
    not against the search itself. Slices with the gap but not the evidence are named in
    ``SLICE-NONE``.
    """
    from scipy.stats import binom

    out: list[Finding] = []
    failed = table[table["failed"]]
    if len(failed):
        out.append(Finding("SLICE-FAILED", "warn",
                           f"{len(failed)} of {len(table)} slices could not keep their size "
                           f"({', '.join(failed['name'])}) and are not reported as slices",
                           {"failed": list(failed["name"]), "metric": "total_weight",
                            "threshold": "0.9*size"},
                           "use a larger size, fewer slices, or PCA of the embeddings (--pca)"))
    correct = emb.correct
    if correct is None:
        return out
    overall = float(correct.mean())
    tested = [row for row in table.itertuples()
              if not row.failed and row.accuracy is not None and row.members > 0]
    level = alpha / max(1, len(tested))
    bad, unclear = [], []
    for row in tested:
        if overall - row.accuracy >= min_gap:
            k = int(round(row.accuracy * row.members))
            p = float(binom.cdf(k, row.members, overall))
            (bad if p <= level else unclear).append((row, p))
    names = list((emb.meta or {}).get("classes") or [])
    for row, p in bad:
        top_cls = next(iter(row.class_counts), None)
        share = row.class_counts.get(top_cls, 0) / max(1, row.members) if top_cls is not None else 0
        label = top_cls
        if (top_cls is not None and str(top_cls).isdigit() and int(top_cls) < len(names)
                and names[int(top_cls)] != str(top_cls)):
            label = f"{top_cls} ({names[int(top_cls)]})"
        out.append(Finding(
            "SLICE-SYSTEMATIC", "warn",
            f"{row.name}: {row.members} similar examples with accuracy {row.accuracy:.2f} "
            f"against {overall:.2f} overall (p = {p:.1g})"
            + (f"; {share:.0%} are class {label}" if top_cls is not None else ""),
            {"slice": row.name, "metric": "accuracy", "value": row.accuracy, "overall": overall,
             "threshold": overall - min_gap, "members": row.members, "p_value": p, "alpha": level,
             "top_indices": row.top_indices},
            "inspect the slice's top members (gallery): look for mislabelled or under-represented "
            "subgroups and add or fix training data for them"))
    if not bad:
        why = "".join(f"; {r.name}: {r.members} examples at {r.accuracy:.2f}, too few to tell (p = {p:.2g})"
                      for r, p in unclear)
        out.append(Finding("SLICE-NONE", "pass",
                           f"no slice's accuracy is {min_gap:.2f} or more below the overall {overall:.2f} "
                           f"with evidence (binomial p ≤ {level:.2g}){why}",
                           {"metric": "accuracy_gap", "threshold": min_gap, "overall": overall, "alpha": level,
                            "unclear": [r.name for r, _ in unclear]}))
    return out
