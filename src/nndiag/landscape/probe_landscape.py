"""The ``landscape`` probe of ``nndiag diagnose`` (see :mod:`nndiag.report.probes`)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from nndiag.landscape._setup import probe_samples
from nndiag.report.results import Result

NAME = "landscape"
NEEDS_DATA = True
#: Runs on token sequences too (with the next-token loss).
TOKENS = True
#: Defaults that keep ``diagnose`` affordable on a CPU: a 15×15 filter-normalised plane.
DEFAULTS: dict[str, Any] = {"dim": 2, "steps": 15, "n_samples": 256, "directions": "random", "norm": "filter"}


def run(model: Any, data: Any, *, seed: int = 0, device: torch.device | str = "auto",
        loss: Any = None, **options: Any) -> Result:
    """A 2-D filter-normalised loss landscape around the weights.

    Parameters
    ----------
    model : LoadedModel or nn.Module
        Needs a runnable module.
    data : DataBundle
    seed : int
    device : torch.device or str
    loss : callable, optional
        ``loss(logits, y)``; mean cross-entropy by default.
    **options
        Passed to :func:`nndiag.landscape.surface` (over :data:`DEFAULTS`).
    """
    from nndiag.landscape.surface import surface

    module = model.require_module("the loss landscape") if hasattr(model, "require_module") else model
    opts = {**DEFAULTS, **options}
    opts["n_samples"] = probe_samples(opts.get("n_samples"), data, given="n_samples" in options)
    return surface(module, data, seed=seed, device=device, loss=loss, **opts).to_result()


def figures(result: Result) -> dict[str, Any]:
    """The contour (2-D) or line (1-D) picture, from the result's grid table alone."""
    from nndiag.landscape.plots import plot_contour, plot_line

    grid = result.tables.get("grid")
    if grid is None or not len(grid):
        return {}
    if "beta" not in grid.columns:
        return {"landscape_line": plot_line(grid["alpha"].to_numpy(), grid["loss"].to_numpy(dtype=float))}
    alphas = np.unique(grid["alpha"].to_numpy(dtype=float))
    betas = np.unique(grid["beta"].to_numpy(dtype=float))
    losses = grid["loss"].to_numpy(dtype=float).reshape(len(alphas), len(betas))
    return {"landscape_contour": plot_contour(alphas, betas, losses)}
