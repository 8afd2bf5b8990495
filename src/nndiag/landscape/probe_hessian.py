"""The ``hessian`` probe of ``nndiag diagnose`` (see :mod:`nndiag.report.probes`)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from nndiag.landscape._setup import probe_samples
from nndiag.report.results import Result

NAME = "hessian"
NEEDS_DATA = True
#: Runs on token sequences too (with the next-token loss).
TOKENS = True
#: Defaults that keep ``diagnose`` affordable on a CPU: the landscape's 256 examples (a
#: ResNet20's Hessian-vector product takes ~1.1 s on 256 CIFAR images with two CPU threads, so
#: the ~150 products of eigenvalues, density and trace take about three minutes; twice that
#: on 512).
DEFAULTS: dict[str, Any] = {"top_k": 3, "trace": True, "density": True, "n_samples": 256,
                            "slq_runs": 2, "slq_steps": 60, "trace_rtol": 0.02,
                            "trace_probes": 100}


def run(model: Any, data: Any, *, seed: int = 0, device: torch.device | str = "auto",
        loss: Any = None, **options: Any) -> Result:
    """Top eigenvalues, trace, SLQ density and LLA criteria of the loss Hessian.

    Parameters
    ----------
    model : LoadedModel or nn.Module
        Needs a runnable module.
    data : DataBundle
        The examples.
    seed : int
    device : torch.device or str
    loss : callable, optional
        ``loss(logits, y)``; mean cross-entropy by default.
    **options
        Passed to :func:`nndiag.landscape.hessian_spectrum` (over :data:`DEFAULTS`).
    """
    from nndiag.landscape.spectrum import hessian_spectrum

    module = model.require_module("the Hessian analysis") if hasattr(model, "require_module") else model
    opts = {**DEFAULTS, **options}
    opts["n_samples"] = probe_samples(opts.get("n_samples"), data, given="n_samples" in options)
    return hessian_spectrum(module, data, seed=seed, device=device, loss=loss, **opts).to_result()


def figures(result: Result) -> dict[str, Any]:
    """The density (when computed) and the top eigenvalues, from the result alone."""
    from nndiag.landscape.plots import plot_density, plot_eigenvalues

    figs: dict[str, Any] = {}
    ev = result.summary.get("eigenvalues") or []
    if ev:
        figs["hessian_eigenvalues"] = plot_eigenvalues(np.asarray(ev, dtype=float))
    dens = result.tables.get("density")
    if dens is not None and len(dens):
        figs["hessian_density"] = plot_density(dens["eigenvalue"].to_numpy(), dens["density"].to_numpy())
    return figs
