"""Findings of the weight-spectrum analysis (codes ``SPEC-*``, see docs/FINDINGS.md)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from nndiag.report.results import Finding
from nndiag.spectral.metrics import OVER_TRAINED_ALPHA, UNDER_TRAINED_ALPHA

#: Layers with at least this many eigenvalues are judged by alpha alone (WeightWatcher's rule) ...
JUDGED_EVALS = 50
#: ... smaller ones only when alpha lies outside [2, 6] by this many standard errors
#: (``sigma`` = (α − 1)/√tail, Clauset et al. 2009).
SIGNIFICANT_SE = 2.0


def _int_or_none(v: Any) -> int | None:
    return int(v) if v is not None and np.isfinite(v) else None


def _count_range(counts: pd.Series) -> str:
    c = counts[np.isfinite(counts)].astype(int)
    if c.empty:
        return "few"
    lo, hi = int(c.min()), int(c.max())
    return str(lo) if lo == hi else f"{lo}–{hi}"


def _names(df: pd.DataFrame, limit: int = 5) -> str:
    names = list(df["name"])
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def scale_collapse(df: pd.DataFrame, jump: float = 1.0) -> pd.DataFrame:
    """Consecutive analysed layers of the same kind whose ``log10 λmax`` differ by more
    than ``jump`` decades (a conv followed by the classifier is not compared: their
    scales differ by construction).

    Returns
    -------
    DataFrame
        ``name, previous, log_spectral_norm, delta`` for each jump.
    """
    cols = ["name", "previous", "log_spectral_norm", "delta"]
    if len(df) < 2:
        return pd.DataFrame(columns=cols)
    ls = pd.to_numeric(df["log_spectral_norm"], errors="coerce").to_numpy()
    names = df["name"].to_numpy()
    d = np.diff(ls)
    kinds = df["kind"].to_numpy() if "kind" in df.columns else np.full(len(df), "")
    same = kinds[1:] == kinds[:-1]
    hit = np.flatnonzero(np.isfinite(d) & (np.abs(d) > jump) & same)
    return pd.DataFrame(
        [{"name": names[i + 1], "previous": names[i], "log_spectral_norm": float(ls[i + 1]),
          "delta": float(d[i])} for i in hit], columns=cols)


def spectral_findings(df: pd.DataFrame, skipped: pd.DataFrame, summary: dict[str, Any],
                      scale_jump: float = 1.0) -> list[Finding]:
    """Findings from the layer table, the skipped table and the summary."""
    out: list[Finding] = []
    if not skipped.empty:
        bad = skipped[skipped["reason"].str.startswith("non-finite")]
        if len(bad):
            out.append(Finding(
                "SPEC-NONFINITE", "fail",
                f"{len(bad)} weight matrices contain NaN or Inf values: {_names(bad)}.",
                {"layers": list(bad["name"])},
                "Find where training diverged (lower the learning rate, clip gradients) or reload a good checkpoint."))
        zero = skipped[skipped["reason"] == "all-zero matrix"]
        if len(zero):
            out.append(Finding(
                "SPEC-ZERO-WEIGHTS", "warn",
                f"{len(zero)} weight matrices are all zero: {_names(zero)}.",
                {"layers": list(zero["name"])},
                "Check initialisation and whether these layers were pruned or never trained."))
        dt = skipped[skipped["reason"].str.contains("dtype")]
        if len(dt):
            out.append(Finding(
                "SPEC-UNSUPPORTED-DTYPE", "warn",
                f"{len(dt)} weight tensors have a dtype that cannot be analysed without a scale: {_names(dt)}.",
                {"layers": list(dt["name"]), "dtypes": sorted(set(dt["dtype"]))},
                "Dequantise the weights (weight × scale) before the analysis."))
    if df.empty:
        if not any(f.code == "SPEC-NONFINITE" for f in out):
            out.append(Finding("SPEC-NO-LAYERS", "warn", "No weight matrix could be analysed.",
                               {"skipped": int(len(skipped))},
                               "Run `nndiag layers MODEL` to see why each tensor was skipped."))
        return out
    low = df[df["dtype"].isin(["float16", "bfloat16"])]
    if len(low):
        out.append(Finding(
            "SPEC-LOW-PRECISION", "pass",
            f"{len(low)} layers are stored in 16-bit floats; their spectra were computed in float32 or higher.",
            {"layers": list(low["name"])}))
    failed = df[df["status"] != "success"]
    if len(failed):
        out.append(Finding(
            "SPEC-FIT-FAILED", "warn",
            f"The power-law fit failed on {len(failed)} layers ({_names(failed)}); "
            "they are left out of the alpha summary.",
            {"layers": list(failed["name"]), "reasons": list(failed["reason"])},
            "These layers are often rank-deficient or tiny; check them with `nndiag layers`."))
    rank1 = df[pd.to_numeric(df["matrix_rank"], errors="coerce") <= 1]
    if len(rank1):
        out.append(Finding(
            "SPEC-RANK-COLLAPSE", "warn",
            f"{len(rank1)} weight matrices have numerical rank ≤ 1: {_names(rank1)}.",
            {"layers": list(rank1["name"])},
            "A rank-1 weight passes a single direction; check for collapsed or tied weights."))
    alpha = pd.to_numeric(df["alpha"], errors="coerce")
    sigma = (pd.to_numeric(df["sigma"], errors="coerce").fillna(0.0) if "sigma" in df.columns
             else pd.Series(0.0, index=df.index))
    # a layer of fewer than JUDGED_EVALS eigenvalues counts only when its alpha lies outside [2, 6]
    # by more than SIGNIFICANT_SE standard errors: a 1→16 convolution pools 9 eigenvalues, and a
    # tail of 5 of them gave alpha 8.6 ± 3.4 on a digits CNN with 99 % test accuracy
    under_all, over_all = alpha > UNDER_TRAINED_ALPHA, alpha < OVER_TRAINED_ALPHA
    n_evals = pd.to_numeric(df["num_evals"], errors="coerce") if "num_evals" in df.columns else alpha * 0
    large = n_evals >= JUDGED_EVALS
    under_m = under_all & (large | (alpha - SIGNIFICANT_SE * sigma > UNDER_TRAINED_ALPHA))
    over_m = over_all & (large | (alpha + SIGNIFICANT_SE * sigma < OVER_TRAINED_ALPHA))
    under, over = df[under_m], df[over_m]
    if len(under):
        out.append(Finding(
            "SPEC-UNDERTRAINED", "warn",
            f"{len(under)} of {len(df)} layers have alpha > {UNDER_TRAINED_ALPHA:g} "
            f"(little learned correlation): {_names(under)}.",
            {"metric": "alpha", "threshold": UNDER_TRAINED_ALPHA, "layers": list(under["name"]),
             "values": [float(v) for v in alpha[under_m]], "stderr": [float(v) for v in sigma[under_m]]},
            "Train longer or with a larger learning rate; consider a smaller layer."))
    if len(over):
        out.append(Finding(
            "SPEC-OVERTRAINED", "warn",
            f"{len(over)} of {len(df)} layers have alpha < {OVER_TRAINED_ALPHA:g} "
            f"(very heavy tail, possible over-fitting): {_names(over)}.",
            {"metric": "alpha", "threshold": OVER_TRAINED_ALPHA, "layers": list(over["name"]),
             "values": [float(v) for v in alpha[over_m]], "stderr": [float(v) for v in sigma[over_m]]},
            "Add regularisation (weight decay, dropout), lower the learning rate or stop earlier."))
    vague_m = (under_all & ~under_m) | (over_all & ~over_m)
    if vague_m.any():
        vague = df[vague_m]
        tails = pd.to_numeric(vague.get("num_pl_spikes", pd.Series(np.nan, index=vague.index)), errors="coerce")
        out.append(Finding(
            "SPEC-ALPHA-UNCERTAIN", "pass",
            f"{len(vague)} small layers (fewer than {JUDGED_EVALS} eigenvalues) have alpha outside "
            f"[{OVER_TRAINED_ALPHA:g}, {UNDER_TRAINED_ALPHA:g}] by less than {SIGNIFICANT_SE:g} standard "
            f"errors (power-law tails of {_count_range(tails)} eigenvalues): {_names(vague)}; "
            "not counted as under- or over-trained.",
            {"metric": "alpha", "layers": list(vague["name"]), "values": [float(v) for v in alpha[vague_m]],
             "stderr": [float(v) for v in sigma[vague_m]], "tail": [_int_or_none(v) for v in tails]},
            "Their spectra are too short to judge from alpha; read the other metrics (stable rank, "
            "spectral norm) or compare with the same layer in a reference model."))
    if "num_traps" in df.columns:
        traps = df[pd.to_numeric(df["num_traps"], errors="coerce") > 0]
        if len(traps):
            out.append(Finding(
                "SPEC-CORRELATION-TRAP", "warn",
                f"{len(traps)} layers keep large eigenvalues after their entries are shuffled "
                f"(correlation traps): {_names(traps)}.",
                {"layers": list(traps["name"]), "num_traps": [int(v) for v in traps["num_traps"]]},
                "A few very large weights dominate these layers; check for outlier weights."))
    jumps = scale_collapse(df, scale_jump)
    if len(jumps):
        out.append(Finding(
            "SPEC-SCALE-COLLAPSE", "warn",
            f"The spectral norm jumps by more than {scale_jump:g} decade(s) between consecutive "
            f"layers at {_names(jumps)}.",
            {"metric": "log_spectral_norm", "threshold": scale_jump,
             "jumps": [{"layer": r.name, "previous": r.previous, "delta": r.delta}
                       for r in jumps.itertuples()]},
            "Check initialisation scale and normalisation around these layers."))
    mean_alpha = summary.get("alpha")
    if mean_alpha is not None and math.isfinite(mean_alpha) and not under.shape[0] and not over.shape[0]:
        within = "Every fitted layer has" if not vague_m.any() else "Every other fitted layer has"
        out.append(Finding(
            "SPEC-OK", "pass",
            f"{within} alpha in [{OVER_TRAINED_ALPHA:g}, {UNDER_TRAINED_ALPHA:g}] "
            f"(mean over all fitted layers {mean_alpha:.2f}).",
            {"metric": "alpha", "mean": mean_alpha}))
    return out
