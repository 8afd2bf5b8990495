"""``diagnose_failure``: features of a user's model → MD tree answer → a Result with findings.

Examples
--------
>>> res = diagnose_failure(model, second_seed, "digits?split=train")  # doctest: +SKIP
>>> res.summary["failure_mode"], res.summary["recommendation"], res.summary["confidence"]  # doctest: +SKIP
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pandas as pd
from torch import nn

from nndiag.report.results import Finding, Result, provenance

NEEDS_SECOND_SEED = "MDT-NEEDS-SECOND-SEED"


def cannot_run(reason: str) -> Result:
    """The result when the diagnosis cannot run (no guess is made)."""
    f = Finding(NEEDS_SECOND_SEED, "warn", f"failure-mode diagnosis not run: {reason}", {},
                "train the same configuration with another seed and pass it as the second seed "
                "(--second-seed CHECKPOINT)")
    return Result("mdtree", summary={"ran": False, "reason": reason}, findings=[f], meta=provenance())


def _module(m: Any, what: str) -> nn.Module:
    if isinstance(m, nn.Module):
        return m
    if hasattr(m, "require_module"):
        return m.require_module(what)
    from nndiag.errors import InputError

    raise InputError(f"{what}: expected a model, got {type(m).__name__}")


def diagnose_failure(
    model: Any,
    second_seed: Any,
    data: Any,
    *,
    thresholds: str | Path | None = None,
    curve: str = "bezier",
    curve_epochs: int = 5,
    hessian_samples: int = 200,
    max_samples: int | None = None,
    seed: int = 0,
    threads: int | None = None,
) -> Result:
    """Diagnose why ``model`` disappoints: temperature too small/large, too small, too little data.

    Parameters
    ----------
    model, second_seed : nn.Module or LoadedModel
        The model and the same configuration trained from another seed.
    data : DataBundle, (x, y) or DATA spec
        The model's training data.
    thresholds : path, optional
        A thresholds file (default: the one shipped, fitted on nndiag's digits MLP zoo).
    curve : {"bezier", "linear"}
        Connectivity path; ``linear`` is the cheap fallback (labelled in the result).
    curve_epochs, hessian_samples, max_samples : feature settings (see
        :func:`nndiag.diagnosis.features.compute_features`).
    seed : int
    threads : int, optional

    Returns
    -------
    Result
        ``kind="mdtree"``; summary with ``failure_mode``, ``recommendation``,
        ``confidence`` and the features; tables ``features``, ``curve``, ``questions``;
        one ``MDT-*`` finding.
    """
    from nndiag.diagnosis.features import compute_features
    from nndiag.diagnosis.shipped import decide, default_thresholds_path, load_thresholds

    if second_seed is None:
        return cannot_run("it needs the same model trained from a second seed")
    t0 = time.perf_counter()
    ts = load_thresholds(thresholds)
    a = _module(model, "the failure-mode diagnosis")
    b = _module(second_seed, "the second-seed checkpoint")
    feats = compute_features(a, b, data, curve=curve, curve_epochs=curve_epochs,
                             hessian_samples=hessian_samples, max_samples=max_samples, seed=seed,
                             threads=threads)
    dg = decide(feats.values, ts)
    evidence = {k: feats.values[k] for k in ("train_error", "mode_connectivity_peak", "hessian_t", "CKA")}
    evidence.update({"confidence": dg.confidence, "answers": dg.answers, "curve": curve})
    findings = [Finding(dg.code, "warn", f"likely failure mode: {dg.failure_mode} "
                        f"(confidence {dg.confidence:.2f})", evidence, dg.recommendation)]
    if dg.out_of_range:
        findings.append(Finding(
            "MDT-OUT-OF-RANGE", "warn",
            f"feature(s) {', '.join(dg.out_of_range)} lie outside the range of the zoo the thresholds "
            "were fitted on; trust the answer less",
            {"features": dg.out_of_range, "ranges": {k: ts.ranges[k] for k in dg.out_of_range}},
            "fit thresholds on a zoo close to your setting (nndiag zoo build, then nndiag zoo fit)"))
    if curve == "linear":
        findings.append(Finding("MDT-LINEAR-PATH", "pass",
                                "mode connectivity measured on the straight line (cheap fallback), "
                                "not on a trained Bezier curve; barriers are overestimated",
                                {"curve": "linear"}, "use the Bezier curve for the paper's feature"))
    qs = pd.DataFrame([{"name": q, "answer": dg.answers[q], "confidence": dg.confidences[q],
                        "thresholds": list(ts.trees[q].thresholds),
                        "features": list(ts.trees[q].spec.features)} for q in dg.answers])
    summary = {"ran": True, "failure_mode": dg.failure_mode, "answer": dg.answer,
               "recommendation": dg.recommendation, "confidence": dg.confidence, "curve": curve,
               **{k: v for k, v in feats.values.items()}}
    params = {**feats.params, "thresholds": str(thresholds or default_thresholds_path())}
    return Result("mdtree", tables={"features": feats.table(), "curve": feats.curve.table(),
                                    "questions": qs},
                  summary=summary, findings=findings, params=params, seed=seed,
                  timing={**feats.timing, "total": time.perf_counter() - t0}, meta=provenance())
