"""``find_slices``: representations → slices → a :class:`~nndiag.report.results.Result`."""

from __future__ import annotations

import time
from typing import Any

from nndiag.errors import InputError
from nndiag.report.results import Result, provenance
from nndiag.slices.base import Slices
from nndiag.slices.embeddings import Embeddings, extract_embeddings

METHODS = ("spotlight", "loss_rank", "gmm", "domino")


def fit_method(method: str, emb: Embeddings, *, size: float = 0.02, n: int = 5, seed: int = 0,
               **options: Any) -> Slices:
    """Run one slice-discovery method on embeddings.

    Parameters
    ----------
    method : {"spotlight", "loss_rank", "gmm", "domino"}
    emb : Embeddings
    size, n, seed : as in :func:`nndiag.slices.spotlight.spotlight`.
    **options
        Passed to the method (e.g. ``pca``, ``kernel``, ``steps``).
    """
    from nndiag.slices import baselines
    from nndiag.slices.spotlight import spotlight

    if method == "spotlight":
        return spotlight(emb, size=size, n=n, seed=seed, **options)
    if method == "loss_rank":
        return baselines.loss_rank(emb, size=size)
    if method == "gmm":
        return baselines.gmm_slices(emb, size=size, n=n, seed=seed, **options)
    if method == "domino":
        return baselines.domino(emb, size=size, n=n, seed=seed, **options)
    raise InputError(f"unknown method '{method}'; valid: {', '.join(METHODS)}")


def slices_result(emb: Embeddings, slices: Slices, *, x: Any = None, seed: int = 0,
                  params: dict[str, Any] | None = None, timing: dict[str, float] | None = None,
                  device: str = "cpu") -> Result:
    """The :class:`Result` of a slice search (tables, summary, findings)."""
    from nndiag.slices.report import gallery_table, points_table, slice_findings, slice_table

    table = slice_table(slices, emb)
    tables = {"slices": table, "points": points_table(slices, emb, seed=seed)}
    gallery = gallery_table(slices, emb, x)
    if len(gallery):
        tables["gallery"] = gallery
    correct = emb.correct
    ok = table[~table["failed"]]
    summary = {
        "method": slices.method,
        "layer": emb.layer,
        "examples": len(emb),
        "dimensions": int(emb.z.shape[1]),
        "mean_loss": float(emb.losses.mean()),
        "accuracy": None if correct is None else float(correct.mean()),
        "slices": len(table),
        "failed": int(table["failed"].sum()),
        "worst_accuracy": None if correct is None or not len(ok) or ok["accuracy"].isna().all()
        else float(ok["accuracy"].min()),
        "top_mean_loss": float(ok["mean_loss"].max()) if len(ok) and ok["mean_loss"].notna().any() else None,
    }
    meta = provenance(device)
    meta["fit_info"] = slices.info
    return Result("slices", tables=tables, summary=summary, findings=slice_findings(table, emb),
                  params={**(params or {}), **slices.params, "method": slices.method}, seed=seed,
                  timing=timing or {}, meta=meta)


def find_slices(model: Any, data: Any, method: str = "spotlight", *, layer: str | None = None,
                size: float = 0.02, n: int = 5, seed: int = 0, batch_size: int = 256,
                device: Any = None, **options: Any) -> Result:
    """Find groups of similar inputs on which a classifier fails together.

    Parameters
    ----------
    model : nn.Module or LoadedModel
        A classifier returning logits; left exactly as it was.
    data : DataBundle, spec or (x, y)
        Labelled examples.
    method : {"spotlight", "loss_rank", "gmm", "domino"}
    layer : str, optional
        Module whose output is the representation (default: input of the final Linear).
    size : float
        Slice size: fraction of the data (< 1) or count.
    n : int
        Number of slices.
    seed : int
    batch_size : int
    device : optional
        Where to run the model (default: where it is).
    **options
        Passed to the method.

    Returns
    -------
    Result
        ``kind="slices"``, tables ``slices``, ``points`` and (images) ``gallery``.

    Examples
    --------
    >>> from nndiag.models import build_model
    >>> r = find_slices(build_model("digits-mlp"), "digits", method="loss_rank")
    >>> list(r.tables["slices"].columns[:3])
    ['name', 'method', 'size']
    """
    from nndiag._utils.device import model_device
    from nndiag.io.data import as_data
    from nndiag.io.models import LoadedModel

    if method not in METHODS:
        raise InputError(f"unknown method '{method}'; valid: {', '.join(METHODS)}")
    module = model.require_module("slice discovery") if isinstance(model, LoadedModel) else model
    bundle = as_data(data)
    t0 = time.perf_counter()
    emb = extract_embeddings(module, bundle, layer=layer, batch_size=batch_size, device=device)
    t1 = time.perf_counter()
    slices = fit_method(method, emb, size=size, n=n, seed=seed, **options)
    t2 = time.perf_counter()
    return slices_result(emb, slices, x=bundle.x, seed=seed,
                         params={"layer": layer, "size": size, "n": n, "data": bundle.name, **options},
                         timing={"embeddings": t1 - t0, "fit": t2 - t1},
                         device=str(model_device(module)))
