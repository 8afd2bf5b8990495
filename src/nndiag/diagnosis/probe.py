"""The ``mdtree`` probe of ``nndiag diagnose`` (see :mod:`nndiag.report.probes`).

It needs the training data and the same model trained from a second seed
(option ``second_seed``); without the second seed it reports that it cannot run
(finding ``MDT-NEEDS-SECOND-SEED``) instead of guessing.
"""

from __future__ import annotations

from typing import Any

import torch

from nndiag.report.results import Result

NAME = "mdtree"
NEEDS_DATA = True
#: How to give the options this probe requires.
OPTIONS = {"second_seed": "the same model trained from another seed (--second-seed CHECKPOINT)"}
#: Defaults that keep ``diagnose`` affordable on a CPU.
DEFAULTS: dict[str, Any] = {"curve": "bezier", "curve_epochs": 3, "hessian_samples": 200,
                            "max_samples": 2000}


def run(model: Any, data: Any, *, second_seed: Any, seed: int = 0,
        device: torch.device | str = "auto", **options: Any) -> Result:
    """Failure-mode diagnosis (MD tree) of ``model`` on its training ``data``.

    Parameters
    ----------
    model : LoadedModel or nn.Module
    data : DataBundle
        The training data.
    second_seed : LoadedModel or nn.Module or None
        The same configuration trained from another seed.
    seed : int
    device : unused (the diagnosis runs where the model is)
    **options
        Passed to :func:`nndiag.diagnosis.api.diagnose_failure` (over :data:`DEFAULTS`).
    """
    from nndiag.diagnosis.api import cannot_run, diagnose_failure

    if second_seed is None:
        return cannot_run("it needs the same model trained from a second seed")
    if data is None:
        return cannot_run("it needs the model's training data")
    opts = {**DEFAULTS, **options}
    if opts.get("max_samples") and opts["max_samples"] >= len(data):
        opts["max_samples"] = None
    opts["hessian_samples"] = min(int(opts["hessian_samples"]), len(data))
    return diagnose_failure(model, second_seed, data, seed=seed, **opts)


def figures(result: Result) -> dict[str, Any]:
    """Training error along the connectivity path, from the result's ``curve`` table."""
    curve = result.tables.get("curve")
    if curve is None or not len(curve):
        return {}
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.5, 3.0))
    ax = fig.add_subplot()
    ax.plot(curve["t"], curve["train_error"], marker="o")
    ax.set_xlabel("t (0 = model, 1 = second seed)")
    ax.set_ylabel("training error (%)")
    kind = result.summary.get("curve", "bezier")
    ax.set_title(f"mode connectivity ({kind} path)")
    fig.tight_layout()
    return {"mdtree_curve": fig}
