"""The planted-slice benchmark: plant a systematic error, then check that it is found.

For each seed: split the data into train / fit / score parts; pick a coherent subgroup
of one class (the low-ink third of the class, or one k-means cluster of it); relabel
that subgroup *in the training part only* to another class; train a small classifier;
extract representations (input of the final Linear) on the fit and score parts with
the true labels. Each method fits on the fit part and is scored on the score part
against the ground-truth membership: average precision (AP) and precision-at-10 of the
top slice's weights, and the share of the planted slice inside the top slice's
support. A plant that did not take (slice accuracy above 0.5 on the score part, or too
few members there) is rejected and reported.

Pass (spotlight): in at least ``need`` of the accepted seeds, AP ≥ 8 × base rate, ≥ 60 %
of the slice inside the top spotlight's support, no collapsed top spotlight, and (our
addition, so that a spotlight which never shrinks cannot pass vacuously) a support of
less than half the score part.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from nndiag.errors import InputError
from nndiag.report.results import Finding, Result, provenance

PLANTS = ("low_ink", "kmeans")
DATASETS = ("digits", "mnist")
AP_FACTOR = 8.0
SUPPORT_SHARE = 0.6
MAX_SUPPORT_SHARE = 0.5


@dataclass(frozen=True)
class BenchmarkConfig:
    """Settings of the planted-slice benchmark (defaults: the documented configuration)."""

    dataset: str = "digits"
    plant: str = "kmeans"
    arch: str = "mlp"
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    fractions: tuple[float, float] = (0.2, 0.2)  # fit and score parts; the rest trains
    size: float = 0.05  # the scale of the planted slices (3–9 % of the score part)
    n: int = 1
    steps: int = 600
    pca: int | None = None
    epochs: int = 30
    n_samples: int | None = None
    methods: tuple[str, ...] = ("spotlight", "loss_rank", "gmm", "domino")
    min_members: int = 5
    need: int = 4
    spotlight_options: dict[str, Any] = field(default_factory=dict)


def _load(dataset: str, n_samples: int | None) -> Any:
    from nndiag.io.data import load_data

    if dataset == "digits":
        return load_data("digits", n_samples=n_samples)
    if dataset == "mnist":
        from nndiag._utils.shared import shared_path

        p = shared_path("data", "mnist_test.npz")
        if p is None:
            raise InputError("the mnist benchmark needs ../shared/data/mnist_test.npz (set NNDIAG_SHARED)")
        return load_data(str(p), n_samples=n_samples)
    raise InputError(f"unknown benchmark data set '{dataset}'; valid: {', '.join(DATASETS)}")


def plant_membership(x: np.ndarray, y: np.ndarray, cls: int, plant: str, seed: int) -> np.ndarray:
    """Ground-truth membership (bool, N) of the planted subgroup of class ``cls``.

    ``low_ink``: the third of the class with the least total intensity.
    ``kmeans``: the largest of three k-means clusters of the class's inputs.
    """
    flat = x.reshape(len(x), -1)
    in_cls = y == cls
    if plant == "low_ink":
        ink = flat.sum(1)
        thr = np.quantile(ink[in_cls], 1 / 3)
        return in_cls & (ink <= thr)
    if plant == "kmeans":
        from sklearn.cluster import KMeans

        km = KMeans(3, n_init=4, random_state=seed).fit(flat[in_cls])
        lab = np.full(len(y), -1)
        lab[in_cls] = km.labels_
        return lab == int(np.argmax(np.bincount(km.labels_, minlength=3)))
    raise InputError(f"unknown plant '{plant}'; valid: {', '.join(PLANTS)}")


def _build(arch: str, in_shape: tuple[int, ...], classes: int, seed: int) -> Any:
    from nndiag._utils.seeding import fork_rng
    from nndiag.models.small import MLP, DigitsCNN

    with fork_rng(seed):
        if arch == "mlp":
            return MLP(int(np.prod(in_shape)), 128, classes, 2)
        if arch == "cnn":
            return DigitsCNN(width=16, hidden=64, num_classes=classes, in_channels=in_shape[0],
                             image_size=in_shape[-1])
    raise InputError(f"unknown benchmark arch '{arch}'; valid: mlp, cnn")


def _scores(weights: np.ndarray, support: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import average_precision_score

    top = np.argsort(-weights, kind="stable")[:10]
    return {
        "ap": float(average_precision_score(truth, weights)) if weights.max() > weights.min() else float(truth.mean()),
        "p_at_10": float(truth[top].mean()),
        "in_support": float(support[truth].mean()) if truth.any() else 0.0,
        "support": int(support.sum()),
    }


def run_seed(cfg: BenchmarkConfig, seed: int, data: Any = None) -> list[dict[str, Any]]:
    """One seed of the benchmark: rows per method (or one ``rejected`` row)."""
    from nndiag._utils.training import train_classifier
    from nndiag.slices.embeddings import extract_embeddings
    from nndiag.slices.find import fit_method

    bundle = _load(cfg.dataset, cfg.n_samples) if data is None else data
    rng = np.random.default_rng(seed)
    n = len(bundle)
    perm = rng.permutation(n)
    n_fit, n_score = (int(round(f * n)) for f in cfg.fractions)
    fit_idx, score_idx, train_idx = perm[:n_fit], perm[n_fit:n_fit + n_score], perm[n_fit + n_score:]
    x_np, y_np = bundle.x.numpy(), bundle.y.numpy()
    classes = int(bundle.num_classes)
    cls = int(rng.integers(classes))
    target = int((cls + 1 + rng.integers(classes - 1)) % classes)
    truth = plant_membership(x_np, y_np, cls, cfg.plant, seed)
    train = bundle.take(train_idx)
    y_train = train.y.clone()
    y_train[truth[train_idx]] = target
    from dataclasses import replace

    train = replace(train, y=y_train)
    model = _build(cfg.arch, bundle.input_shape, classes, seed)
    t0 = time.perf_counter()
    train_classifier(model, train, epochs=cfg.epochs, batch_size=32, lr=0.05, seed=seed, progress=False)
    t_train = time.perf_counter() - t0
    emb_fit = extract_embeddings(model, bundle.take(fit_idx))
    emb_score = extract_embeddings(model, bundle.take(score_idx))
    truth_score = truth[score_idx]
    base = {"seed": seed, "class": cls, "relabelled_to": target, "n_score": int(len(score_idx)),
            "members": int(truth_score.sum()),
            "base_rate": float(truth_score.mean()), "train_s": t_train}
    slice_acc = float(emb_score.correct[truth_score].mean()) if truth_score.any() else float("nan")
    base["slice_accuracy"] = slice_acc
    base["accuracy"] = float(emb_score.correct.mean())
    if truth_score.sum() < cfg.min_members or not slice_acc <= 0.5:
        why = (f"only {int(truth_score.sum())} members in the score part" if truth_score.sum() < cfg.min_members
               else f"the plant did not take (slice accuracy {slice_acc:.2f} > 0.5)")
        return [{**base, "method": "-", "rejected": why}]
    rows = []
    for method in cfg.methods:
        opts: dict[str, Any] = {}
        if method == "spotlight":
            opts = {"steps": cfg.steps, "pca": cfg.pca, **cfg.spotlight_options}
        t0 = time.perf_counter()
        sl = fit_method(method, emb_fit, size=cfg.size, n=1 if method == "loss_rank" else cfg.n,
                        seed=seed, **opts)
        fit_s = time.perf_counter() - t0
        w, sup = sl.score(emb_score)
        sc = _scores(w[0], sup[0], truth_score)
        rows.append({**base, "method": method, **sc, "collapsed": bool(sl.failed[0]), "fit_s": fit_s,
                     "rejected": ""})
    return rows


def verdict(table: pd.DataFrame, cfg: BenchmarkConfig) -> dict[str, Any]:
    """Pass/fail of the spotlight on the accepted seeds."""
    sp = table[table["method"] == "spotlight"]
    # a support covering most of the data would hold the slice trivially (as a spotlight that
    # never shrinks does): the support must also be less than half of the score part
    small = sp["support"] < MAX_SUPPORT_SHARE * sp["n_score"]
    ok = ((sp["ap"] >= AP_FACTOR * sp["base_rate"]) & (sp["in_support"] >= SUPPORT_SHARE)
          & (~sp["collapsed"].astype(bool)) & small)
    accepted = int(len(sp))
    rejected = int((table["method"] == "-").sum())
    need = min(cfg.need, accepted) if accepted < len(cfg.seeds) else cfg.need
    return {"accepted_seeds": accepted, "rejected_seeds": rejected, "passed_seeds": int(ok.sum()),
            "need": need, "passed": bool(accepted > 0 and int(ok.sum()) >= need and accepted >= cfg.need)}


def run_benchmark(cfg: BenchmarkConfig | None = None, threads: int | None = 1) -> Result:
    """Run every seed and method; a Result with table ``runs`` and the verdict in the summary.

    ``threads``: BLAS/torch threads (default 1: the models and tensors are tiny, and more
    threads only slow them down, badly so on a busy machine; None: ``NNDIAG_THREADS``).
    """
    from nndiag._utils.threads import limit_threads

    cfg = cfg or BenchmarkConfig()
    if cfg.plant not in PLANTS:
        raise InputError(f"unknown plant '{cfg.plant}'; valid: {', '.join(PLANTS)}")
    data = _load(cfg.dataset, cfg.n_samples)
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    with limit_threads(threads):
        for seed in cfg.seeds:
            rows += run_seed(cfg, seed, data)
    table = pd.DataFrame(rows)
    table.insert(0, "name", [f"seed{r['seed']}-{r['method']}" for r in rows])
    for col in ("ap", "p_at_10", "in_support", "collapsed"):
        if col not in table:
            table[col] = np.nan if col != "collapsed" else False
    v = verdict(table, cfg)
    means = (table[table["method"] != "-"].groupby("method")[["ap", "p_at_10", "in_support"]].mean()
             .to_dict(orient="index"))
    findings = [Finding(
        "SLICE-BENCH-PASS" if v["passed"] else "SLICE-BENCH-FAIL", "pass" if v["passed"] else "fail",
        f"spotlight found the planted slice in {v['passed_seeds']} of {v['accepted_seeds']} accepted seeds "
        f"(need {cfg.need}; {v['rejected_seeds']} plants rejected)",
        {"metric": "seeds_passed", "value": v["passed_seeds"], "threshold": cfg.need,
         "criteria": f"AP >= {AP_FACTOR:g} x base rate, >= {SUPPORT_SHARE:.0%} of slice in support, "
                     f"no collapse, support < {MAX_SUPPORT_SHARE:.0%} of the part"})]
    return Result("slices-benchmark", tables={"runs": table}, summary={**v, "means": means},
                  findings=findings, params={k: (list(v) if isinstance(v, tuple) else v)
                                             for k, v in asdict(cfg).items()},
                  seed=int(cfg.seeds[0]) if cfg.seeds else None,
                  timing={"total": time.perf_counter() - t0}, meta=provenance("cpu"))
