"""Test-only probes that exercise the orchestration (never shipped as analyses).

``norms``: a real but tiny data-free analysis (Frobenius norm of every weight matrix),
checked against numpy in the tests; ``boom`` raises; ``needsdata`` needs data;
``needsseed`` needs ``second_seed``; ``interrupt`` raises KeyboardInterrupt;
``badfig`` works but its figures raise.
"""

from __future__ import annotations

import sys
import types
from typing import Any

import numpy as np
import pandas as pd

from nndiag.report.results import Finding, Result

MODULE_PREFIX = "tests.report.fakeprobes"


def _norms_run(model: Any, data: Any, *, seed: int, device: Any, limit: float = 1e9, **_: Any) -> Result:
    rows = []
    for name, t in model.tensors:
        if t.ndim >= 2:
            rows.append({"name": name, "frobenius": float(np.linalg.norm(t.detach().double().numpy().ravel()))})
    df = pd.DataFrame(rows, columns=["name", "frobenius"])
    findings = [Finding("TEST-NORM-HIGH", "warn", f"{r['name']}: norm {r['frobenius']:.3g} above {limit}",
                        {"metric": "frobenius", "value": r["frobenius"], "threshold": limit, "layer": r["name"]},
                        "shrink it")
                for r in rows if r["frobenius"] > limit]
    return Result("norms", tables={"norms": df}, findings=findings,
                  summary={"max_norm": float(df["frobenius"].max()), "layers": len(df)},
                  params={"limit": limit, "extra": sorted(_)}, seed=seed)


def _norms_figures(result: Result) -> dict[str, Any]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4, 2.5))
    ax = fig.add_subplot()
    df = result.tables["norms"]
    ax.bar(range(len(df)), df["frobenius"].astype(float))
    ax.set_title("norm per layer")
    return {"norm_per_layer": fig}


def _boom_run(model: Any, data: Any, *, seed: int, device: Any, **_: Any) -> Result:
    raise RuntimeError("deliberate failure\nsecond line")


def _data_run(model: Any, data: Any, *, seed: int, device: Any, **_: Any) -> Result:
    return Result("needsdata", summary={"n": len(data)}, seed=seed)


def _seed_run(model: Any, data: Any, *, seed: int, device: Any, second_seed: Any) -> Result:
    return Result("needsseed", summary={"second": second_seed.name}, seed=seed)


def _interrupt_run(model: Any, data: Any, *, seed: int, device: Any, **_: Any) -> Result:
    raise KeyboardInterrupt


def _badfig_figures(result: Result) -> dict[str, Any]:
    raise ValueError("cannot draw")


def _module(name: str, run: Any, figures: Any = None, needs_data: bool = False, **attrs: Any) -> str:
    mod = types.ModuleType(f"{MODULE_PREFIX}.{name}")
    mod.NAME = name
    mod.NEEDS_DATA = needs_data
    for k, v in attrs.items():
        setattr(mod, k, v)
    mod.run = run
    mod.figures = figures or (lambda result: {})
    sys.modules[mod.__name__] = mod
    return mod.__name__


def install(monkeypatch: Any, names: list[str]) -> None:
    """Replace the probe registry with the named fake probes (plus the real ones asked)."""
    import nndiag.report.diagnose  # noqa: F401 - imported before patching, so nothing binds the fakes
    from nndiag.report import probes

    made = {
        "norms": lambda: _module("norms", _norms_run, _norms_figures),
        "boom": lambda: _module("boom", _boom_run),
        "needsdata": lambda: _module("needsdata", _data_run, needs_data=True),
        "trainside": lambda: _module("trainside", _data_run, needs_data=True, TRAIN_DATA=True),
        "needsseed": lambda: _module("needsseed", _seed_run),
        "interrupt": lambda: _module("interrupt", _interrupt_run),
        "badfig": lambda: _module("badfig", _norms_run, _badfig_figures),
        "missing": lambda: f"{MODULE_PREFIX}.not_built_yet",
    }
    registry = {}
    for n in names:
        registry[n] = made[n]() if n in made else probes.PROBE_MODULES[n]
    monkeypatch.setattr(probes, "PROBE_MODULES", registry)
