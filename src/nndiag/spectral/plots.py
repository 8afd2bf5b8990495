"""Figures of the weight-spectrum analysis (matplotlib object API; returned, never shown).

Every figure is drawn from the result's tables only (``layers`` and the per-layer
``esd`` histogram), so a report re-renders from JSON without recomputation.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from nndiag.errors import InputError


def _axes(ax: Any, size: tuple[float, float] = (6.4, 4.0)) -> tuple[Any, Any]:
    if ax is not None:
        return ax.figure, ax
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    return fig, fig.add_subplot(111)


def _tables(result: Any) -> tuple[pd.DataFrame, pd.DataFrame]:
    layers = result.tables["layers"]
    esd = result.tables.get("esd", pd.DataFrame(columns=["name", "log10_lo", "log10_hi", "count"]))
    return pd.DataFrame(layers), pd.DataFrame(esd)


def _pick(layers: pd.DataFrame, layer: str | None) -> pd.Series:
    if layers.empty:
        raise InputError("the result has no analysed layer to plot")
    if layer is None:
        ok = layers[layers["status"] == "success"]
        return (ok if len(ok) else layers).iloc[0]
    hit = layers[layers["name"] == layer]
    if hit.empty:
        raise InputError(f"no layer '{layer}'; choose one of {', '.join(layers['name'][:10])}")
    return hit.iloc[0]


def plot_alpha(result: Any, ax: Any = None) -> Any:
    """Alpha per layer in model order (correlation flow), with the [2, 6] band."""
    layers, _ = _tables(result)
    fig, ax = _axes(ax, (max(6.4, 0.18 * len(layers) + 2), 4.0))
    a = pd.to_numeric(layers.get("alpha", pd.Series(dtype=float)), errors="coerce")
    x = np.arange(len(layers))
    ax.axhspan(2, 6, color="tab:green", alpha=0.08, label="2 ≤ α ≤ 6")
    ax.plot(x, a, "o-", ms=3, lw=1, label="alpha")
    ax.set_xlabel("layer (model order)")
    ax.set_ylabel("alpha")
    ax.set_title("Power-law exponent per layer (correlation flow)")
    if len(layers) <= 40:
        ax.set_xticks(x)
        ax.set_xticklabels(list(layers["name"]), rotation=90, fontsize=6)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    return fig


def plot_esd(result: Any, layer: str | None = None, ax: Any = None) -> Any:
    """Log-log ESD of one layer with the fitted power-law tail and xmin."""
    layers, esd = _tables(result)
    row = _pick(layers, layer)
    h = esd[esd["name"] == row["name"]]
    fig, ax = _axes(ax)
    if h.empty:
        ax.text(0.5, 0.5, "no eigenvalues above threshold", ha="center", transform=ax.transAxes)
        return fig
    lo = 10 ** h["log10_lo"].to_numpy(float)
    hi = 10 ** h["log10_hi"].to_numpy(float)
    cnt = h["count"].to_numpy(float)
    dens = cnt / max(cnt.sum(), 1) / (hi - lo)
    mid = np.sqrt(lo * hi)
    nz = dens > 0
    ax.loglog(mid[nz], dens[nz], "o", ms=3, label="ESD")
    alpha, xmin = float(row.get("alpha", math.nan)), float(row.get("xmin", math.nan))
    if math.isfinite(alpha) and math.isfinite(xmin):
        frac = cnt[mid >= xmin].sum() / max(cnt.sum(), 1)
        xs = np.geomspace(xmin, hi.max(), 50)
        ax.loglog(xs, frac * (alpha - 1) / xmin * (xs / xmin) ** (-alpha), "r--",
                  label=f"power law α={alpha:.2f}")
        ax.axvline(xmin, color="r", lw=0.8, label=f"xmin={xmin:.3g}")
    ax.set_xlabel("eigenvalue λ")
    ax.set_ylabel("density")
    ax.set_title(f"ESD of {row['name']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_mp(result: Any, layer: str | None = None, ax: Any = None) -> Any:
    """Linear ESD of one layer with its Marchenko–Pastur fit (needs ``mp_fit=True``)."""
    from nndiag.spectral.mp import mp_pdf

    layers, esd = _tables(result)
    row = _pick(layers, layer)
    h = esd[esd["name"] == row["name"]]
    fig, ax = _axes(ax)
    lo = 10 ** h["log10_lo"].to_numpy(float)
    hi = 10 ** h["log10_hi"].to_numpy(float)
    cnt = h["count"].to_numpy(float)
    mid = (lo + hi) / 2
    dens = cnt / max(cnt.sum(), 1) / np.maximum(hi - lo, 1e-300)
    ax.bar(mid, dens, width=hi - lo, alpha=0.5, label="ESD")
    sig = float(row.get("sigma_mp", math.nan)) if "sigma_mp" in row else math.nan
    if math.isfinite(sig) and cnt.sum() > 0:
        total = float(row["norm"])
        n = float(row["num_evals"])
        scale = total / n  # mean eigenvalue: the MP fit's unit
        xs = np.linspace(0, float(hi.max()), 400)
        ax.plot(xs, mp_pdf(xs / scale, max(float(row["Q"]), 1.0), sig) / scale, "r-",
                label=f"MP fit σ={sig:.2f}")
        ax.axvline(float(row["bulk_max"]), color="orange", lw=0.8, label="bulk edge")
    ax.set_xlabel("eigenvalue λ")
    ax.set_ylabel("density")
    ax.set_title(f"Marchenko–Pastur fit of {row['name']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
