"""Comparing two models layer by layer, and alpha along depth (correlation flow)."""

from __future__ import annotations

from typing import Any

import pandas as pd

from nndiag.errors import InputError
from nndiag.report.results import Result, provenance


def correlation_flow(result: Result) -> pd.DataFrame:
    """Alpha against depth: ``name, depth, alpha, log_spectral_norm, status`` in model order."""
    df = result.tables["layers"]
    out = pd.DataFrame({
        "name": df["name"],
        "depth": range(len(df)),
        "alpha": pd.to_numeric(df["alpha"], errors="coerce"),
        "log_spectral_norm": pd.to_numeric(df["log_spectral_norm"], errors="coerce"),
        "status": df["status"],
    })
    return out.reset_index(drop=True)


def aligned(base: Any, other: Any) -> Any:
    """``other`` (a TensorSource) with its names matched to ``base``'s up to one wrapper prefix
    (:func:`~nndiag._utils.names.matching_names`: a Lightning ``model.…`` checkpoint against
    the bare model); ``other`` itself when the names agree or no single prefix maps them."""
    from nndiag._utils.names import matching_names
    from nndiag.io.tensors import RenamedSource

    ours = [i.name for i in base.infos()]
    theirs = [i.name for i in other.infos()]
    if set(ours) <= set(theirs):
        return other
    names = matching_names(ours, theirs)
    if names is None:
        return other
    return RenamedSource(other, {t: o for o, t in names.items()})


def compare(base: Any, other: Any, **options: Any) -> Result:
    """Compare two models with the same layer names (e.g. base vs fine-tuned).

    Both models are analysed, and so is the difference ``ΔW = W_other − W_base`` of
    every same-shaped weight. The other model's names may carry one wrapper prefix more
    or less (:func:`aligned`). The ``layers`` table has one row per layer analysed in
    both: ``name, alpha_base, alpha_other, delta_alpha, log_norm_base,
    log_norm_other, log_spectral_norm_delta`` (λmax of ΔW), ``alpha_delta`` (alpha of
    ΔW's ESD), ``rel_change`` (‖ΔW‖_F / ‖W_base‖_F).

    Parameters
    ----------
    base, other : model
        Anything :func:`nndiag.spectral.analyze` accepts.
    **options
        Passed to :func:`~nndiag.spectral.analyze.analyze`.

    Returns
    -------
    Result
        ``kind="spectral-compare"``, tables ``layers``; summary ``mean_delta_alpha``,
        ``num_layers``, ``num_unchanged``.
    """
    import math

    from nndiag.io.tensors import DictSource
    from nndiag.spectral.analyze import _source, analyze

    src_a, _, name_a, cfg_a = _source(base)
    src_b, _, name_b, cfg_b = _source(other)
    src_b = aligned(src_a, src_b)
    if cfg_a or cfg_b:  # (the layout of fused Q/K/V weights, from either model's config)
        options.setdefault("hf_config", cfg_a or cfg_b)
    ra = analyze(src_a, **options)
    rb = analyze(src_b, **options)
    infos_b = {i.name: i for i in src_b.infos()}
    used = set(ra.layers["tensor"]) & set(rb.layers["tensor"])
    delta = {}
    for info in src_a.infos():
        ib = infos_b.get(info.name)
        if info.name in used and ib is not None and ib.shape == info.shape:
            delta[info.name] = src_b.get(info.name).double() - src_a.get(info.name).double()
    rd = analyze(DictSource(delta), **options) if delta else None
    a = ra.layers.set_index("name")
    b = rb.layers.set_index("name")
    d = rd.layers.set_index("name") if rd is not None and len(rd.layers) else None
    rows = []
    for n in a.index:
        if n not in b.index:
            continue
        na, nb = float(a.loc[n, "norm"]), float(b.loc[n, "norm"])
        row = {
            "name": n,
            "alpha_base": float(a.loc[n, "alpha"]),
            "alpha_other": float(b.loc[n, "alpha"]),
            "delta_alpha": float(b.loc[n, "alpha"]) - float(a.loc[n, "alpha"]),
            "log_norm_base": float(a.loc[n, "log_norm"]),
            "log_norm_other": float(b.loc[n, "log_norm"]),
            "alpha_delta": math.nan,
            "log_spectral_norm_delta": math.nan,
            "rel_change": 0.0,
        }
        if d is not None and n in d.index:
            row["alpha_delta"] = float(d.loc[n, "alpha"])
            row["log_spectral_norm_delta"] = float(d.loc[n, "log_spectral_norm"])
            row["rel_change"] = math.sqrt(float(d.loc[n, "norm"]) / na) if na > 0 else math.nan
        elif nb != na:
            row["rel_change"] = math.nan
        rows.append(row)
    if not rows:
        raise InputError(f"{name_a} and {name_b} share no analysed layer name; compare needs the same architecture")
    df = pd.DataFrame(rows)
    da = pd.to_numeric(df["delta_alpha"], errors="coerce")
    summary = {
        "base": name_a, "other": name_b, "num_layers": int(len(df)),
        "mean_delta_alpha": float(da.mean()) if da.notna().any() else None,
        "num_unchanged": int((df["rel_change"] == 0).sum()),
    }
    return Result("spectral-compare", tables={"layers": df}, summary=summary,
                  params={k: v for k, v in options.items() if isinstance(v, (int, float, str, type(None)))},
                  meta=provenance())
