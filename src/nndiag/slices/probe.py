"""The ``slices`` probe for ``nndiag diagnose`` (see :mod:`nndiag.report.probes`)."""

from __future__ import annotations

from typing import Any

import numpy as np

from nndiag.report.results import Result

NAME = "slices"
NEEDS_DATA = True


def run(model: Any, data: Any, *, seed: int = 0, device: Any = None, **options: Any) -> Result:
    """Spotlight slices of ``model`` on ``data`` (options: method, layer, size, n, pca, steps).

    The model is left as it was (see :func:`nndiag.slices.embeddings.extract_embeddings`)
    and runs where it already is (``device`` is not used to move it; batches follow the model).
    """
    from nndiag.slices.find import find_slices

    method = options.pop("method", "spotlight")
    return find_slices(model, data, method, seed=seed, **options)


def figures(result: Result) -> dict[str, Any]:
    """``pca`` (2-D projection, slices marked) and, for images, ``gallery``; from tables only."""
    figs: dict[str, Any] = {}
    pts = result.tables.get("points")
    if pts is not None and len(pts):
        figs["pca"] = _pca_figure(result)
    gal = result.tables.get("gallery")
    if gal is not None and len(gal):
        figs["gallery"] = _gallery_figure(result)
    return figs


def _pca_figure(result: Result) -> Any:
    from matplotlib.figure import Figure

    pts = result.tables["points"]
    table = result.tables.get("slices")
    fig = Figure(figsize=(6.4, 5.2))
    ax = fig.add_subplot(1, 1, 1)
    base = pts[pts["slice"] == 0]
    vmax = float(np.nanmax(pts["loss"])) if len(pts) else 1.0
    import matplotlib
    from matplotlib.colors import LinearSegmentedColormap

    # grey for zero loss (still visible on white), black for the highest; the colour bar
    # starts at 0 (a loss is never negative)
    greys = LinearSegmentedColormap.from_list("greys_visible", matplotlib.colormaps["Greys"](np.linspace(0.3, 1, 256)))
    sc = ax.scatter(base["pc1"], base["pc2"], c=base["loss"], cmap=greys, s=8, alpha=0.7,
                    vmin=0.0, vmax=max(vmax, 1e-12))
    fig.colorbar(sc, ax=ax, label="loss (outside slices)")

    cmap = matplotlib.colormaps["tab10"]
    for j in sorted(int(s) for s in pts["slice"].unique() if s > 0):
        part = pts[pts["slice"] == j]
        failed = bool(table.iloc[j - 1]["failed"]) if table is not None and len(table) >= j else False
        label = f"slice-{j}" + (" (failed)" if failed else "")
        ax.scatter(part["pc1"], part["pc2"], s=18, color=cmap((j - 1) % 10), label=label,
                   marker="x" if failed else "o", edgecolors="none" if not failed else None)
        top = part.sort_values("weight", ascending=False).iloc[:1]
        ax.scatter(top["pc1"], top["pc2"], s=160, facecolors="none", edgecolors=cmap((j - 1) % 10), linewidths=2)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    s = result.summary
    ax.set_title(f"{s.get('method', 'slices')}: {s.get('examples', len(pts))} examples ({s.get('layer', '')})",
                 fontsize=9)
    if (pts["slice"] > 0).any():
        ax.legend(fontsize=8, loc="best")
    return fig


def _gallery_figure(result: Result) -> Any:
    from matplotlib.figure import Figure

    gal = result.tables["gallery"]
    n_slices = int(gal["slice"].max())
    n_cols = int(gal["rank"].max())
    fig = Figure(figsize=(1.2 * n_cols + 0.8, 1.35 * n_slices + 0.4))
    axes = fig.subplots(n_slices, n_cols, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for row in gal.itertuples():
        ax = axes[int(row.slice) - 1][int(row.rank) - 1]
        img = np.asarray(row.thumb, dtype=np.uint8)
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=255, interpolation="nearest")
        lab = "" if row.label is None or (isinstance(row.label, float) and np.isnan(row.label)) else int(row.label)
        pred = "" if row.pred is None or (isinstance(row.pred, float) and np.isnan(row.pred)) else int(row.pred)
        # class names where the data has them (reports saved before had numbers only)
        lab = getattr(row, "label_name", None) or lab
        pred = getattr(row, "pred_name", None) or pred
        ax.set_title(f"#{row.index} y={lab}\nŷ={pred}", fontsize=6)
        if int(row.rank) == 1:
            ax.text(-0.15, 0.5, row.name, transform=ax.transAxes, rotation=90, va="center", ha="right",
                    fontsize=7)
    fig.suptitle("most representative members of each slice", fontsize=9)
    return fig
