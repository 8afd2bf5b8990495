"""The MD tree's features for any model: train error/loss, CKA, mode connectivity, Hessian.

All four are measured on the user's *training* data, as in the MD tree paper:

- ``train_error`` (%), ``train_loss``: eval mode;
- ``CKA``: linear CKA between the two seeds' softmax outputs on mixup inputs
  (``x = λ x_i + (1 − λ) x_j``, ``λ ~ Beta(α, α)``, α = 16 as in the paper's files);
- ``mode_connectivity`` and ``mode_connectivity_peak``: along a trained quadratic
  Bezier curve between the two checkpoints (:mod:`nndiag.diagnosis.curves`); the
  straight line is available as a cheap fallback and is labelled as such;
- ``hessian_t``, ``hessian_e``: natural logs of the Hessian trace and top
  eigenvalue from :func:`nndiag.landscape.hessian_spectrum` (200 samples by default).

Examples
--------
>>> import numpy as np
>>> x = np.random.default_rng(0).normal(size=(50, 4))
>>> round(linear_cka(x, 3 * x + 1), 6)
1.0
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from nndiag._utils.model_state import preserved
from nndiag._utils.precision import full_precision
from nndiag.errors import AnalysisError, DataError, InputError
from nndiag.landscape._setup import logits_of


def linear_cka(x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor) -> float:
    """Linear CKA between two representations of the same examples.

    ``CKA = ‖Ycᵀ Xc‖²_F / (‖Xcᵀ Xc‖_F ‖Ycᵀ Yc‖_F)`` with column-centred ``Xc, Yc``
    (Kornblith et al. 2019). Computed in float64.

    Parameters
    ----------
    x, y : array of shape (n, d1), (n, d2)

    Returns
    -------
    float in [0, 1]
    """
    a = np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x, dtype=np.float64)
    b = np.asarray(y.detach().cpu() if isinstance(y, torch.Tensor) else y, dtype=np.float64)
    a = a.reshape(a.shape[0], -1)
    b = b.reshape(b.shape[0], -1)
    if a.shape[0] != b.shape[0]:
        raise InputError(f"CKA needs the same examples: {a.shape[0]} vs {b.shape[0]} rows")
    if a.shape[0] < 2:
        raise DataError("CKA needs at least 2 examples")
    a = a - a.mean(0)
    b = b - b.mean(0)
    cross = np.linalg.norm(b.T @ a) ** 2
    den = np.linalg.norm(a.T @ a) * np.linalg.norm(b.T @ b)
    if den == 0.0:
        return float("nan")
    return float(cross / den)


def mixup_inputs(x: torch.Tensor, n: int, *, alpha: float = 16.0, seed: int = 0) -> torch.Tensor:
    """``n`` mixup inputs ``λ x_i + (1 − λ) x_j`` from random pairs, ``λ ~ Beta(α, α)``."""
    if len(x) < 2:
        raise DataError(f"mixup needs at least 2 examples, got {len(x)}")
    rng = np.random.default_rng(seed)
    i = rng.integers(0, len(x), n)
    j = rng.integers(0, len(x), n)
    lam = torch.as_tensor(rng.beta(alpha, alpha, n), dtype=x.dtype).view(-1, *([1] * (x.ndim - 1)))
    return lam * x[i] + (1 - lam) * x[j]


@torch.no_grad()
def _outputs(model: nn.Module, x: torch.Tensor, bs: int = 512) -> torch.Tensor:
    return torch.cat([model(x[i:i + bs]) for i in range(0, len(x), bs)])


@full_precision
def output_cka(model_a: nn.Module, model_b: nn.Module, x: torch.Tensor, *, n_samples: int = 1000,
               alpha: float = 16.0, seed: int = 0) -> float:
    """Linear CKA of two models' softmax outputs on ``n_samples`` mixup inputs (eval mode).

    Raises
    ------
    DataError
        When ``model_a`` reads ``x`` as token ids: mixing ids is not defined.
    """
    from nndiag.diagnosis.curves import device_of
    from nndiag.io.data import model_inputs

    x = model_inputs(model_a, x)
    if not x.is_floating_point():
        raise DataError("CKA mixes pairs of inputs (mixup), which is not defined for token ids; "
                        f"{type(model_a).__name__} reads its integer inputs through an embedding layer")
    xm = mixup_inputs(x, n_samples, alpha=alpha, seed=seed).to(device_of(model_a))
    with preserved(model_a, values=False), preserved(model_b, values=False):
        model_a.eval()
        model_b.eval()
        pa = torch.softmax(_outputs(model_a, xm), 1)
        pb = torch.softmax(_outputs(model_b, xm.to(device_of(model_b))), 1).to(pa.device)
    return linear_cka(pa, pb)


@full_precision
def train_metrics(model: nn.Module, x: torch.Tensor, y: torch.Tensor, bs: int = 512) -> tuple[float, float]:
    """(training error in %, mean cross-entropy) of ``model`` in eval mode; model left as it was."""
    import torch.nn.functional as F

    from nndiag.diagnosis.curves import device_of
    from nndiag.io.data import model_inputs

    x, y = model_inputs(model, x, device=device_of(model)), y.to(device_of(model))
    with preserved(model, values=False), torch.no_grad():
        model.eval()
        wrong, total = 0, 0.0
        for i in range(0, len(x), bs):
            out = logits_of(model(x[i:i + bs]))
            if out.ndim != 2 or int(y[i:i + bs].max()) >= out.shape[1]:
                raise DataError(f"the model's output shape {tuple(out.shape)} does not fit labels up to "
                                f"{int(y.max())}")
            wrong += int((out.argmax(1) != y[i:i + bs]).sum())
            total += float(F.cross_entropy(out, y[i:i + bs], reduction="sum"))
    return 100.0 * wrong / len(x), total / len(x)


def hessian_features(model: nn.Module, data: Any, *, n_samples: int = 200, seed: int = 0,
                     threads: int | None = None) -> dict[str, float]:
    """Hessian trace and top eigenvalue via :func:`nndiag.landscape.hessian_spectrum`.

    Returns ``hessian_trace``, ``hessian_top``, ``hessian_t = ln(trace)`` and
    ``hessian_e = ln(top)`` (NaN when the value is not positive).
    """
    try:
        from nndiag.landscape import hessian_spectrum
    except (ImportError, AttributeError) as exc:  # pragma: no cover - the engine ships with nndiag
        raise AnalysisError(f"the Hessian engine nndiag.landscape.hessian_spectrum is unavailable ({exc})") from None
    res = hessian_spectrum(model, data, top_k=1, trace=True, n_samples=n_samples, seed=seed, threads=threads)
    tr = float(res.trace) if res.trace is not None else float("nan")
    top = float(res.eigenvalues[0]) if len(res.eigenvalues) else float("nan")
    return {"hessian_trace": tr, "hessian_top": top,
            "hessian_t": math.log(tr) if tr > 0 else float("nan"),
            "hessian_e": math.log(top) if top > 0 else float("nan")}


@dataclass(frozen=True)
class MDFeatures:
    """The features of one model (with a second seed) for the MD tree.

    Attributes
    ----------
    values : dict
        ``train_error``, ``train_loss``, ``CKA``, ``mode_connectivity``,
        ``mode_connectivity_peak``, ``hessian_t``, ``hessian_e``, ``hessian_trace``,
        ``hessian_top`` (NaN for those not computed).
    curve : Curve or None
        The connectivity path and its errors.
    params : dict
    timing : dict
    """

    values: dict[str, float]
    curve: Any = None
    params: dict[str, Any] = field(default_factory=dict)
    timing: dict[str, float] = field(default_factory=dict)

    def __getitem__(self, key: str) -> float:
        return self.values[key]

    def table(self) -> pd.DataFrame:
        """One row per feature: ``name``, ``value``."""
        return pd.DataFrame({"name": list(self.values), "value": list(self.values.values())})


@full_precision
def compute_features(
    model: nn.Module,
    second_seed: nn.Module,
    data: Any,
    *,
    curve: str = "bezier",
    curve_epochs: int = 5,
    curve_lr: float = 0.01,
    curve_points: int = 5,
    cka_samples: int = 1000,
    mixup_alpha: float = 16.0,
    hessian: bool = True,
    hessian_samples: int = 200,
    max_samples: int | None = None,
    seed: int = 0,
    threads: int | None = None,
) -> MDFeatures:
    """All MD tree features of ``model`` given a second-seed checkpoint and training data.

    Parameters
    ----------
    model, second_seed : nn.Module
        Two trainings of the same configuration with different seeds. Left as they were.
    data : DataBundle, (x, y) or DATA spec
        The training data.
    curve : {"bezier", "linear"}
        Connectivity path (``linear`` is the cheap, untrained fallback).
    curve_epochs, curve_lr, curve_points : Bezier training epochs, learning rate, grid size.
    cka_samples : int
        Mixup inputs for CKA.
    mixup_alpha : float
    hessian : bool
        Compute the Hessian features (``hessian_samples`` examples).
    max_samples : int, optional
        Use a seeded subset of the training data for error, CKA and the curve.
    seed : int
    threads : int, optional

    Returns
    -------
    MDFeatures
    """
    from nndiag._utils.threads import limit_threads
    from nndiag.diagnosis.curves import check_same_architecture, connect
    from nndiag.io.data import as_data

    if model is second_seed:
        raise InputError("the second-seed checkpoint must be a different model (two seeds are needed)")
    check_same_architecture(model, second_seed)
    bundle = as_data(data)
    if hessian and hessian_samples > len(bundle):
        raise DataError(f"{bundle.name}: {hessian_samples} Hessian samples asked but the data has only "
                        f"{len(bundle)} examples")
    sub = bundle.subset(max_samples, seed) if max_samples else bundle
    times: dict[str, float] = {}
    vals: dict[str, float] = {}
    with limit_threads(threads):
        t = time.perf_counter()
        vals["train_error"], vals["train_loss"] = train_metrics(model, sub.x, sub.y)
        times["train"] = time.perf_counter() - t
        t = time.perf_counter()
        vals["CKA"] = output_cka(model, second_seed, sub.x, n_samples=cka_samples, alpha=mixup_alpha, seed=seed)
        times["cka"] = time.perf_counter() - t
        t = time.perf_counter()
        path = connect(model, second_seed, sub, curve=curve, n_points=curve_points, epochs=curve_epochs,
                       lr=curve_lr, seed=seed)
        vals["mode_connectivity"] = path.mode_connectivity
        vals["mode_connectivity_peak"] = path.mode_connectivity_peak
        times["curve"] = time.perf_counter() - t
        if hessian:
            t = time.perf_counter()
            vals.update(hessian_features(model, bundle, n_samples=hessian_samples, seed=seed, threads=threads))
            times["hessian"] = time.perf_counter() - t
        else:
            vals.update({k: float("nan") for k in ("hessian_trace", "hessian_top", "hessian_t", "hessian_e")})
    params = {"curve": curve, "curve_epochs": curve_epochs, "curve_lr": curve_lr, "curve_points": curve_points,
              "cka_samples": cka_samples, "mixup_alpha": mixup_alpha, "hessian_samples": hessian_samples,
              "n_samples": len(sub), "seed": seed}
    return MDFeatures(vals, path, params, times)
