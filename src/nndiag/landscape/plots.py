"""Pictures of spectra and loss landscapes (matplotlib object API, never ``plt.show``).

Every function takes plain arrays (so reports re-render from JSON) and an optional
``ax``; it returns the Figure.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from nndiag.errors import require


def _fig_ax(ax: Any = None, projection: str | None = None) -> tuple[Any, Any]:
    require("matplotlib", "plot", "plots")
    if ax is not None:
        return ax.figure, ax
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 4.2), layout="constrained")
    return fig, fig.add_subplot(1, 1, 1, projection=projection)


def plot_density(x: np.ndarray, density: np.ndarray, *, ax: Any = None, log: bool = True,
                 title: str = "Hessian eigenvalue density (SLQ)") -> Any:
    """The smoothed SLQ density against the eigenvalue."""
    fig, ax = _fig_ax(ax)
    y = np.maximum(np.asarray(density, dtype=float), 1e-12) if log else density
    ax.plot(x, y, color="C0")
    if log:
        ax.set_yscale("log")
        top = float(np.nanmax(y)) if np.size(y) else 1.0
        ax.set_ylim(top * 1e-6, top * 3)
    ax.axvline(0.0, color="0.6", lw=0.8, ls="--")
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    ax.set_title(title)
    return fig


def plot_eigenvalues(values: np.ndarray, *, ax: Any = None, title: str = "Top Hessian eigenvalues") -> Any:
    """The computed eigenvalues as a bar chart by rank."""
    fig, ax = _fig_ax(ax)
    v = np.asarray(values, dtype=float)
    ax.bar(np.arange(1, len(v) + 1), v, color="C1")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # ranks 1, 2, 3, not 0.5, 1.0, 1.5
    ax.set_xlabel("rank")
    ax.set_ylabel("eigenvalue")
    ax.set_title(title)
    return fig


def plot_line(alphas: np.ndarray, losses: np.ndarray, *, ax: Any = None, label: str | None = None,
              title: str = "Loss along a direction", marks: list[tuple[float, str]] | None = None,
              xlabel: str = "step α") -> Any:
    """A 1-D landscape: loss against the step along the direction; ``marks``: named positions
    (the models of an interpolation line), else a line at the weights."""
    fig, ax = _fig_ax(ax)
    ax.plot(alphas, losses, marker=".", label=label)
    for x, name in marks or [(0.0, "")]:
        ax.axvline(x, color="0.6", lw=0.8, ls="--")
        if name:
            ax.annotate(name, (x, 1.0), xycoords=("data", "axes fraction"), xytext=(3, -12),
                        textcoords="offset points", fontsize="small", color="0.3")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("loss")
    ax.set_title(title)
    if label:
        ax.legend()
    return fig


#: Filled contours switch to logarithmic levels when the largest loss on the grid is more
#: than this many times the smallest.
LOG_LEVELS_RATIO = 10.0


def contour_levels(losses: np.ndarray, levels: int = 30) -> tuple[np.ndarray, bool]:
    """Contour levels for a landscape: ``(levels, logarithmic)``.

    Far from the weights the loss grows by orders of magnitude (a trained digits CNN: 0.02 at
    the weights, 200 at the plane's corner); evenly spaced levels then put the whole basin
    in the first colour. When ``max/min > LOG_LEVELS_RATIO`` (positive losses) the levels are
    geometric, so that every decade gets the same number of colours.
    """
    z = np.asarray(losses, dtype=float)
    z = z[np.isfinite(z)]
    lo, hi = (float(z.min()), float(z.max())) if z.size else (0.0, 1.0)
    if lo > 0 and hi > LOG_LEVELS_RATIO * lo:
        return np.geomspace(lo, hi, levels + 1), True
    if hi <= lo:
        hi = lo + 1.0
    return np.linspace(lo, hi, levels + 1), False


def plot_contour(alphas: np.ndarray, betas: np.ndarray, losses: np.ndarray, *, ax: Any = None,
                 levels: int = 30, title: str = "Loss landscape",
                 marks: list[tuple[tuple[float, float], str]] | None = None,
                 labels: tuple[str, str] = ("direction 1 (α)", "direction 2 (β)")) -> Any:
    """A 2-D landscape as filled contours, the origin and the grid minimum marked.

    ``losses[i, j]`` is the loss at ``(alphas[i], betas[j])``. Levels are logarithmic when the
    losses span more than a decade (:func:`contour_levels`). ``marks``: named points (the
    other models of an interpolation plane).
    """
    fig, ax = _fig_ax(ax)
    Z = np.asarray(losses, dtype=float).T  # rows = betas for contourf
    A, B = np.meshgrid(alphas, betas)
    finite = np.isfinite(Z)
    if finite.any():
        from matplotlib.colors import LogNorm

        lv, log = contour_levels(Z, levels)
        cs = ax.contourf(A, B, np.where(finite, Z, np.nanmax(Z[finite])), levels=lv, cmap="viridis",
                         norm=LogNorm(lv[0], lv[-1]) if log else None)
        if log:  # ticks at 1, 2, 5 × powers of ten, written plainly (not the contour boundaries)
            from matplotlib.ticker import FormatStrFormatter, LogLocator

            bar = fig.colorbar(cs, ax=ax, label="loss (log scale)")
            bar.set_ticks([t for t in LogLocator(subs=(1.0, 2.0, 5.0)).tick_values(lv[0], lv[-1])
                           if lv[0] <= t <= lv[-1]])
            bar.ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
            bar.ax.yaxis.set_minor_formatter(FormatStrFormatter(""))
        else:
            fig.colorbar(cs, ax=ax, label="loss")
        i, j = np.unravel_index(np.nanargmin(losses), np.shape(losses))
        ax.plot(alphas[i], betas[j], marker="*", color="red", ms=12, ls="", label="grid minimum")
    ax.plot(0, 0, marker="o", color="white", mec="black", ls="", label="weights")
    for (x, y), name in marks or []:
        ax.plot(x, y, marker="s", color="white", mec="black", ls="")
        ax.annotate(name, (x, y), xytext=(5, 5), textcoords="offset points", fontsize="small", color="white")
    ax.set_xlabel(labels[0])
    ax.set_ylabel(labels[1])
    ax.set_title(title)
    ax.legend(loc="upper right", fontsize="small")
    return fig


def plot_surface3d(alphas: np.ndarray, betas: np.ndarray, losses: np.ndarray, *, ax: Any = None,
                   title: str = "Loss surface") -> Any:
    """A 2-D landscape as a 3-D surface."""
    fig, ax = _fig_ax(ax, projection="3d")
    A, B = np.meshgrid(alphas, betas)
    ax.plot_surface(A, B, np.asarray(losses, dtype=float).T, cmap="viridis", linewidth=0, antialiased=True)
    ax.set_xlabel("α")
    ax.set_ylabel("β")
    ax.set_zlabel("loss")
    ax.set_title(title)
    return fig
