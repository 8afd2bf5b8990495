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


def numeric(col: pd.Series) -> np.ndarray:
    """A table column as float64, anything not a number as NaN (cheaper than ``pd.to_numeric``
    on the numeric columns a layer table mostly has)."""
    if col.dtype.kind in "fiub":
        return col.to_numpy(dtype=float, na_value=np.nan)
    return pd.to_numeric(col, errors="coerce").to_numpy(dtype=float)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _int_or_none(v: Any) -> int | None:
    return int(v) if v is not None and np.isfinite(v) else None


def _count_range(counts: np.ndarray) -> str:
    c = counts[np.isfinite(counts)]
    if not c.size:
        return "few"
    lo, hi = int(c.min()), int(c.max())
    return str(lo) if lo == hi else f"{lo}–{hi}"


def _names(df: pd.DataFrame, limit: int = 5) -> str:
    return _join(list(df["name"]), limit)


def _join(names: list[str], limit: int = 5) -> str:
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
    ls = numeric(df["log_spectral_norm"])
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
        reasons = [str(r) for r in skipped["reason"].tolist()]  # (.tolist(): iterating the Series cost ~0.5 ms)
        sk_names = [str(n) for n in skipped["name"].tolist()]
        bad = [n for n, r in zip(sk_names, reasons, strict=True) if r.startswith("non-finite")]
        if bad:
            out.append(Finding(
                "SPEC-NONFINITE", "fail",
                f"{len(bad)} weight matrices contain NaN or Inf values: {_join(bad)}.",
                {"layers": bad},
                "Find where training diverged (lower the learning rate, clip gradients) or reload a good checkpoint."))
        zero = [n for n, r in zip(sk_names, reasons, strict=True) if r == "all-zero matrix"]
        if zero:
            out.append(Finding(
                "SPEC-ZERO-WEIGHTS", "warn",
                f"{len(zero)} weight matrices are all zero: {_join(zero)}.",
                {"layers": zero},
                "Check initialisation and whether these layers were pruned or never trained."))
        dt = [i for i, r in enumerate(reasons) if "dtype" in r]
        if dt:
            dtypes = [str(v) for v in skipped["dtype"].tolist()]
            out.append(Finding(
                "SPEC-UNSUPPORTED-DTYPE", "warn",
                f"{len(dt)} weight tensors have a dtype that cannot be analysed without a scale: "
                f"{_join([sk_names[i] for i in dt])}.",
                {"layers": [sk_names[i] for i in dt], "dtypes": sorted({dtypes[i] for i in dt})},
                "Dequantise the weights (weight × scale) before the analysis."))
    if df.empty:
        if not any(f.code == "SPEC-NONFINITE" for f in out):
            out.append(Finding("SPEC-NO-LAYERS", "warn", "No weight matrix could be analysed.",
                               {"skipped": int(len(skipped))},
                               "Run `nndiag layers MODEL` to see why each tensor was skipped."))
        return out
    # the layer table's columns as arrays once: pandas filtering cost ~5 ms for ResNet56's 56 rows,
    # a twentieth of its whole analysis
    names = df["name"].to_numpy(dtype=object)

    def num(col: str) -> np.ndarray:
        return numeric(df[col]) if col in df.columns else np.full(len(df), np.nan)

    def pick(mask: np.ndarray) -> list[str]:
        return [str(n) for n in names[mask]]

    low = np.isin(df["dtype"].to_numpy(dtype=object), ["float16", "bfloat16"])
    if low.any():
        out.append(Finding(
            "SPEC-LOW-PRECISION", "pass",
            f"{int(low.sum())} layers are stored in 16-bit floats; their spectra were computed in float32 or higher.",
            {"layers": pick(low)}))
    failed = df["status"].to_numpy(dtype=object) != "success"
    if failed.any():
        out.append(Finding(
            "SPEC-FIT-FAILED", "warn",
            f"The power-law fit failed on {int(failed.sum())} layers ({_join(pick(failed))}); "
            "they are left out of the alpha summary.",
            {"layers": pick(failed), "reasons": list(df["reason"].to_numpy(dtype=object)[failed])},
            "These layers are often rank-deficient or tiny; check them with `nndiag layers`."))
    rank1 = num("matrix_rank") <= 1
    if rank1.any():
        out.append(Finding(
            "SPEC-RANK-COLLAPSE", "warn",
            f"{int(rank1.sum())} weight matrices have numerical rank ≤ 1: {_join(pick(rank1))}.",
            {"layers": pick(rank1)},
            "A rank-1 weight passes a single direction; check for collapsed or tied weights."))
    alpha = num("alpha")
    sigma = np.nan_to_num(num("sigma"), nan=0.0)
    # a layer of fewer than JUDGED_EVALS eigenvalues counts only when its alpha lies outside [2, 6]
    # by more than SIGNIFICANT_SE standard errors: a 1→16 convolution pools 9 eigenvalues, and a
    # tail of 5 of them gave alpha 8.6 ± 3.4 on a digits CNN with 99 % test accuracy
    under_all, over_all = alpha > UNDER_TRAINED_ALPHA, alpha < OVER_TRAINED_ALPHA
    large = num("num_evals") >= JUDGED_EVALS
    under_m = under_all & (large | (alpha - SIGNIFICANT_SE * sigma > UNDER_TRAINED_ALPHA))
    over_m = over_all & (large | (alpha + SIGNIFICANT_SE * sigma < OVER_TRAINED_ALPHA))
    tails = num("num_pl_spikes")

    def weak_note(flagged: np.ndarray, bound: float) -> tuple[str, list[str]]:
        # large layers are judged by alpha alone (WeightWatcher's rule), but say which of them
        # lie within SIGNIFICANT_SE standard errors of the bound: a short tail, weak evidence
        weak = flagged & (np.abs(alpha - bound) < SIGNIFICANT_SE * sigma)
        if not weak.any():
            return "", []
        who = ("it lies" if flagged.sum() == 1 else
               f"{int(weak.sum())} of them {'lies' if weak.sum() == 1 else 'lie'}")
        return (f" ({who} within "
                f"{SIGNIFICANT_SE:g} standard errors of {bound:g}, on power-law tails of "
                f"{_count_range(tails[weak])} eigenvalues: weak evidence)"), pick(weak)

    if under_m.any():
        note, weak = weak_note(under_m, UNDER_TRAINED_ALPHA)
        out.append(Finding(
            "SPEC-UNDERTRAINED", "warn",
            f"{int(under_m.sum())} of {len(df)} layers have alpha > {UNDER_TRAINED_ALPHA:g} "
            f"(little learned correlation): {_join(pick(under_m))}{note}.",
            {"metric": "alpha", "threshold": UNDER_TRAINED_ALPHA, "layers": pick(under_m),
             "values": alpha[under_m].tolist(), "stderr": sigma[under_m].tolist(), "weak": weak},
            "Train longer or with a larger learning rate; consider a smaller layer."))
    if over_m.any():
        note, weak = weak_note(over_m, OVER_TRAINED_ALPHA)
        out.append(Finding(
            "SPEC-OVERTRAINED", "warn",
            f"{int(over_m.sum())} of {len(df)} layers have alpha < {OVER_TRAINED_ALPHA:g} "
            f"(very heavy tail, possible over-fitting): {_join(pick(over_m))}{note}.",
            {"metric": "alpha", "threshold": OVER_TRAINED_ALPHA, "layers": pick(over_m),
             "values": alpha[over_m].tolist(), "stderr": sigma[over_m].tolist(), "weak": weak},
            "Add regularisation (weight decay, dropout), lower the learning rate or stop earlier."))
    vague_m = (under_all & ~under_m) | (over_all & ~over_m)
    if vague_m.any():
        vague_tails = tails[vague_m]
        out.append(Finding(
            "SPEC-ALPHA-UNCERTAIN", "pass",
            f"{_count(int(vague_m.sum()), 'small layer')} (fewer than {JUDGED_EVALS} eigenvalues) "
            f"{'has' if vague_m.sum() == 1 else 'have'} alpha outside "
            f"[{OVER_TRAINED_ALPHA:g}, {UNDER_TRAINED_ALPHA:g}] by less than {SIGNIFICANT_SE:g} standard "
            f"errors (power-law tails of {_count_range(vague_tails)} eigenvalues): {_join(pick(vague_m))}; "
            "not counted as under- or over-trained.",
            {"metric": "alpha", "layers": pick(vague_m), "values": alpha[vague_m].tolist(),
             "stderr": sigma[vague_m].tolist(), "tail": [_int_or_none(v) for v in vague_tails]},
            "Their spectra are too short to judge from alpha; read the other metrics (stable rank, "
            "spectral norm) or compare with the same layer in a reference model."))
    if "num_traps" in df.columns:
        n_traps = num("num_traps")
        traps = n_traps > 0
        if traps.any():
            out.append(Finding(
                "SPEC-CORRELATION-TRAP", "warn",
                f"{int(traps.sum())} layers keep large eigenvalues after their entries are shuffled "
                f"(correlation traps): {_join(pick(traps))}.",
                {"layers": pick(traps), "num_traps": [int(v) for v in n_traps[traps]]},
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
    if mean_alpha is not None and math.isfinite(mean_alpha) and not under_m.any() and not over_m.any():
        within = "Every fitted layer has" if not vague_m.any() else "Every other fitted layer has"
        out.append(Finding(
            "SPEC-OK", "pass",
            f"{within} alpha in [{OVER_TRAINED_ALPHA:g}, {UNDER_TRAINED_ALPHA:g}] "
            f"(mean over all fitted layers {mean_alpha:.2f}).",
            {"metric": "alpha", "mean": mean_alpha}))
    return out
