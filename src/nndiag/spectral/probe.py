"""The weight-spectrum probe for ``nndiag diagnose`` (see :mod:`nndiag.report.probes`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from nndiag.report.results import Result

NAME = "spectral"
NEEDS_DATA = False


def run(model: Any, data: Any = None, *, seed: int = 0, device: torch.device | str = "cpu",
        **options: Any) -> Result:
    """Run :func:`nndiag.spectral.analyze` on a LoadedModel (data is not used)."""
    from nndiag.spectral.analyze import analyze

    return analyze(model, seed=seed, device=device, **options)


def figures(result: Result) -> dict[str, Any]:
    """Alpha per layer (correlation flow), the log-log ESD of the worst layer with its
    fitted tail, and an MP overlay when the result has MP columns — from tables only."""
    from nndiag.spectral import plots

    layers = result.tables.get("layers")
    if layers is None or len(layers) == 0:
        return {}
    out = {"alpha_per_layer": plots.plot_alpha(result)}
    worst = result.summary.get("worst_alpha_layer")
    names = list(layers["name"])
    target = worst if worst in names else None
    out["esd_worst_layer"] = plots.plot_esd(result, target)
    if "sigma_mp" in layers.columns:
        out["mp_fit"] = plots.plot_mp(result, target)
    return out


def save_figures(result: Result, folder: str | Path) -> list[Path]:
    """Write :func:`figures` as PNG files into ``folder``; returns the paths."""
    from nndiag._utils.files import save_figure

    folder = Path(folder)
    return [save_figure(fig, folder / f"spectral_{key}.png", dpi=100) for key, fig in figures(result).items()]
