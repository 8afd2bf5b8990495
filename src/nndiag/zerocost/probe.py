"""The zero-cost probe for ``nndiag diagnose`` (see :mod:`nndiag.report.probes`).

It scores the model's *architecture*: a copy re-initialised with PyTorch's default
initialisers (seeded), never the trained weights. Every score is labelled as an
at-initialisation score. Zero-cost scores rank architectures against each other; a single
value has no absolute scale, so the findings report the scores and two checks that do
not need a reference: weights whose gradient is zero for every sample (parts of the
network that do not learn from this data at initialisation), and proxies that fail.
"""

from __future__ import annotations

import math
import time
from typing import Any

import pandas as pd
import torch

from nndiag.report.results import Finding, Result, provenance

NAME = "zerocost"
NEEDS_DATA = True

#: Default proxies of the probe (cheap ones plus GradSign).
DEFAULT_PROXIES: tuple[str, ...] = ("gradsign", "synflow", "grad_norm", "snip", "jacob_cov",
                                    "nwot", "params", "flops")
#: Share of weights with an always-zero gradient that triggers ``ZC-DEAD-WEIGHTS``.
DEAD_THRESHOLD = 0.5


def run(model: Any, data: Any = None, *, seed: int = 0, device: torch.device | str = "cpu",
        batch_size: int = 64, proxies: Any = None, **options: Any) -> Result:
    """Score the model's architecture at initialisation on a seeded batch of ``data``.

    Parameters
    ----------
    model : LoadedModel or nn.Module
        The model; only its architecture is used (a re-initialised copy is scored).
    data : DataBundle or DATA spec
        Labelled examples; ``batch_size`` of them (seeded) form the batch.
    seed : int
        Seeds the batch and the re-initialisation.
    batch_size : int
        Examples in the batch (at least 2; capped by the data size).
    proxies : str or list, optional
        Proxy names (default :data:`DEFAULT_PROXIES`).
    """
    from nndiag.errors import InputError
    from nndiag.io.data import as_data, model_inputs
    from nndiag.zerocost.gradsign import gradsign_detail
    from nndiag.zerocost.rank import reinitialised
    from nndiag.zerocost.score import compute_proxies, parse_proxies

    if options:
        raise InputError(f"zerocost probe: unknown option(s) {', '.join(options)}; "
                         "valid: batch_size, proxies")
    module = model.require_module("the zero-cost probe") if hasattr(model, "require_module") else model
    name = getattr(model, "name", type(module).__name__)
    names = parse_proxies(proxies if proxies is not None else list(DEFAULT_PROXIES))
    bundle = as_data(data)
    n = min(int(batch_size), len(bundle))
    if n < 2:
        raise InputError(f"the zero-cost probe needs a batch of at least 2 examples, got {n}")
    sub = bundle.subset(n, seed=seed)
    dev = torch.device(device)
    from nndiag._utils.threads import limit_threads

    t0 = time.perf_counter()
    net = reinitialised(module, seed).to(dev)
    x, y = model_inputs(net, sub.x, device=dev, name=bundle.name), sub.y.to(dev)
    with limit_threads():
        scores = compute_proxies(net, x, y, [p for p in names if p != "gradsign"])
        detail = None
        if "gradsign" in names:
            t1 = time.perf_counter()
            try:
                detail = gradsign_detail(net, x, y)
                scores["gradsign"] = detail.score
            except Exception as exc:  # reported as a failed proxy, the others stand
                scores["gradsign"] = math.nan
                scores["errors"]["gradsign"] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            scores["gradsign_seconds"] = time.perf_counter() - t1
    elapsed = time.perf_counter() - t0
    rows = [{"name": p, "score": scores[p], "seconds": scores[f"{p}_seconds"],
             "error": scores["errors"].get(p, "")} for p in names]
    table = pd.DataFrame(rows)
    summary: dict[str, Any] = {"model": name, "at_initialisation": True, "batch_size": n,
                               "data": bundle.name}
    for r in rows:
        summary[f"{r['name']}_at_init"] = r["score"]
    findings = [Finding(
        "ZC-AT-INIT", "pass",
        f"zero-cost scores of {name}'s architecture, re-initialised (seed {seed}) — not of its "
        "trained weights; compare them only with other architectures scored the same way",
        {"batch_size": n, "seed": seed, **{r["name"]: r["score"] for r in rows}},
        "rank candidate architectures with `nndiag zerocost rank` before training them")]
    if detail is not None:
        summary["gradsign_agreement"] = detail.tau / (detail.n_params * detail.n_samples)
        summary["dead_weight_fraction"] = detail.zero_fraction
        if detail.zero_fraction > DEAD_THRESHOLD:
            worst = [k for k, _ in sorted(detail.per_layer.items(), key=lambda kv: kv[1])[:3]]
            findings.append(Finding(
                "ZC-DEAD-WEIGHTS", "warn",
                f"{detail.zero_fraction:.0%} of the Conv/Linear weights get a zero gradient for "
                "every sample at initialisation: those parts of the network do not learn from "
                "this data",
                {"metric": "dead_weight_fraction", "value": detail.zero_fraction,
                 "threshold": DEAD_THRESHOLD, "lowest_gradsign_layers": worst},
                "look for disconnected branches, dead ReLUs or zero-initialised paths"))
    failed = {p: e for p, e in scores["errors"].items()}
    if failed:
        findings.append(Finding(
            "ZC-PROXY-FAILED", "warn",
            f"{len(failed)} proxy(ies) could not be computed: {', '.join(failed)}",
            {"errors": failed}, "read the error column; NaN gradients often mean a numerically "
                                "unstable architecture"))
    return Result(NAME, tables={"proxies": table}, summary=summary, findings=findings,
                  params={"batch_size": n, "proxies": names, "at_initialisation": True},
                  seed=seed, timing={"total": elapsed}, meta=provenance(str(dev)))


def figures(result: Result) -> dict[str, Any]:
    """A bar chart of GradSign's per-parameter agreement and the dead-weight share (from the summary)."""
    from matplotlib.figure import Figure

    keys = [("gradsign_agreement", "GradSign agreement"), ("dead_weight_fraction", "dead weights")]
    vals = [(label, result.summary.get(k)) for k, label in keys if result.summary.get(k) is not None]
    if not vals:
        return {}
    fig = Figure(figsize=(4, 2.5))
    ax = fig.add_subplot()
    ax.bar([v[0] for v in vals], [v[1] for v in vals], color=["tab:blue", "tab:red"][: len(vals)])
    ax.set_ylim(0, 1)
    ax.set_title("at initialisation (re-initialised copy)")
    fig.tight_layout()
    return {"gradsign": fig}
