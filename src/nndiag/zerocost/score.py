"""Run several proxies on one network, keeping going when one fails."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from nndiag._utils.precision import full_precision
from nndiag.errors import InputError, NNDiagError


def _gradsign(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    from nndiag.zerocost.gradsign import gradsign

    return gradsign(model, x, y)


def _table() -> dict[str, Callable[..., float]]:
    from nndiag.zerocost import proxies as p

    return {
        "gradsign": _gradsign,
        "synflow": p.synflow,
        "grad_norm": p.grad_norm,
        "snip": p.snip,
        "grasp": p.grasp,
        "fisher": p.fisher,
        "jacob_cov": p.jacob_cov,
        "nwot": p.nwot,
        "zen": p.zen,
        "params": p.params,
        "flops": p.flops,
    }


#: Every proxy name, in report order.
PROXY_NAMES: tuple[str, ...] = ("gradsign", "synflow", "grad_norm", "snip", "grasp", "fisher",
                                "jacob_cov", "nwot", "zen", "params", "flops")


def parse_proxies(spec: str | Sequence[str] | None) -> list[str]:
    """``"gradsign,synflow"`` / a list / ``"all"`` / None → validated proxy names."""
    if spec is None or spec == "all":
        return list(PROXY_NAMES)
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s) for s in spec]
    names = [n for n in names if n]
    bad = [n for n in names if n not in PROXY_NAMES]
    if bad or not names:
        raise InputError(f"unknown proxy {', '.join(bad) or '(none given)'}; "
                         f"valid: {', '.join(PROXY_NAMES)}, all")
    return names


@full_precision
def compute_proxies(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                    names: Sequence[str]) -> dict[str, Any]:
    """Scores, seconds and errors of the named proxies on ``model`` and the batch ``(x, y)``.

    A proxy that fails gives NaN and its error message; the others still run. ``x`` goes
    through :func:`nndiag.io.data.model_inputs` (float32 unless ``model`` reads token ids).

    Returns
    -------
    dict
        ``{name: score, f"{name}_seconds": s, "errors": {name: message}}``.
    """
    from nndiag.io.data import model_inputs

    x = model_inputs(model, x)
    table = _table()
    out: dict[str, Any] = {"errors": {}}
    for name in names:
        t0 = time.perf_counter()
        try:
            out[name] = float(table[name](model, x, y))
        except NNDiagError as exc:
            out[name] = math.nan
            out["errors"][name] = str(exc)
        except (RuntimeError, ValueError, TypeError) as exc:  # failures inside torch
            out[name] = math.nan
            out["errors"][name] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        out[f"{name}_seconds"] = time.perf_counter() - t0
    return out
