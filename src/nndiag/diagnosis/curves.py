"""Mode connectivity between two checkpoints: quadratic Bezier curves and straight lines.

A quadratic Bezier curve joins weights ``w1`` and ``w2`` through a trainable control
point ``c``: ``γ(t) = (1−t)² w1 + 2t(1−t) c + t² w2``. The endpoints stay fixed;
``c`` starts at the midpoint and is trained (SGD) to lower the loss at random
``t ~ U(0, 1)`` (Garipov et al. 2018). At each evaluated point BatchNorm running
statistics are recomputed on the training data (cumulative average, train mode)
before the error is measured in eval mode. The straight line ``(1−t) w1 + t w2``
is the cheap fallback (no training), labelled ``curve="linear"``.

From the training errors ``E(t_k)`` (in %), with ``t`` on a uniform grid including
both ends:

- ``mode_connectivity = ½(E(t_0) + E(t_K)) − E(t_u)``, ``u = argmax_k |E(t_k) − ½(E(t_0)+E(t_K))|``
  (Yang et al. 2021: negative = a barrier, positive = the path dips below the ends);
- ``mode_connectivity_peak = −max_{0<k<K} E(t_k)`` (≤ 0), the MD tree's feature.

The user's models are never modified: the curve works on a private copy.

Examples
--------
>>> import torch
>>> from nndiag.io.data import load_data
>>> data = load_data("digits?split=train")
>>> a, b = torch.nn.Linear(64, 10), torch.nn.Linear(64, 10)
>>> curve = connect(torch.nn.Sequential(torch.nn.Flatten(), a),
...                 torch.nn.Sequential(torch.nn.Flatten(), b), data, curve="linear")
>>> curve.errors.shape
(5,)
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from nndiag.errors import InputError
from nndiag.landscape._setup import logits_of

_BN = (nn.modules.batchnorm._BatchNorm,)


def check_same_architecture(a: nn.Module, b: nn.Module) -> None:
    """Raise :class:`InputError` unless ``a`` and ``b`` have the same parameter names and shapes."""
    sa = {k: tuple(v.shape) for k, v in a.state_dict().items()}
    sb = {k: tuple(v.shape) for k, v in b.state_dict().items()}
    if sa.keys() != sb.keys():
        only = sorted(set(sa) ^ set(sb))[:3]
        raise InputError(f"the two checkpoints have different architectures (tensors not in both: "
                         f"{', '.join(only)})")
    diff = [k for k in sa if sa[k] != sb[k]]
    if diff:
        k = diff[0]
        raise InputError(f"the two checkpoints have different architectures ({k}: {sa[k]} vs {sb[k]})")


@dataclass(frozen=True)
class Curve:
    """A path between two checkpoints and the training error/loss along it.

    Attributes
    ----------
    kind : str
        ``bezier`` or ``linear``.
    ts : ndarray
        Evaluated points in [0, 1] (both ends included).
    errors : ndarray
        Training error (%) at each point.
    losses : ndarray
        Mean cross-entropy at each point.
    params : dict
        Settings (epochs, lr, batch size, seed).
    """

    kind: str
    ts: np.ndarray
    errors: np.ndarray
    losses: np.ndarray
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def mode_connectivity(self) -> float:
        """Signed connectivity ½(E₀+E₁) − E(t_u) (Yang et al. 2021); negative = barrier."""
        mid = 0.5 * (self.errors[0] + self.errors[-1])
        u = int(np.argmax(np.abs(self.errors - mid)))
        return float(mid - self.errors[u])

    @property
    def mode_connectivity_peak(self) -> float:
        """Minus the highest training error (%) at the interior points (≤ 0)."""
        return float(-np.max(self.errors[1:-1]))

    def table(self) -> pd.DataFrame:
        """One row per evaluated point: ``name``, ``t``, ``train_error``, ``train_loss``."""
        return pd.DataFrame({"name": [f"t={t:.3g}" for t in self.ts], "t": self.ts,
                             "train_error": self.errors, "train_loss": self.losses})


def device_of(model: nn.Module) -> torch.device:
    """Where ``model``'s parameters live (CPU for a model without any)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _bezier(w1: torch.Tensor, c: torch.Tensor, w2: torch.Tensor, t: float) -> torch.Tensor:
    return (1 - t) ** 2 * w1 + 2 * t * (1 - t) * c + t ** 2 * w2


def _bn_modules(m: nn.Module) -> list[nn.Module]:
    return [x for x in m.modules() if isinstance(x, _BN)]


def _batches(x: torch.Tensor, y: torch.Tensor, bs: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for i in range(0, len(x), bs):
        yield x[i:i + bs], y[i:i + bs]


@torch.no_grad()
def _evaluate_at(work: nn.Module, weights: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                 bs: int) -> tuple[float, float]:
    params = dict(work.named_parameters())
    for k, v in weights.items():
        params[k].copy_(v)
    bns = _bn_modules(work)
    if bns:  # recompute BatchNorm statistics at this point of the path
        moms = [m.momentum for m in bns]
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
        work.train()
        for xb, _ in _batches(x, y, bs):
            work(xb)
        for m, mom in zip(bns, moms, strict=True):
            m.momentum = mom
    work.eval()
    total, wrong = 0.0, 0
    for xb, yb in _batches(x, y, bs):
        out = logits_of(work(xb))
        total += float(F.cross_entropy(out, yb, reduction="sum"))
        wrong += int((out.argmax(1) != yb).sum())
    return 100.0 * wrong / len(x), total / len(x)


def connect(
    model_a: nn.Module,
    model_b: nn.Module,
    data: Any,
    *,
    curve: str = "bezier",
    n_points: int = 5,
    epochs: int = 5,
    lr: float = 0.01,
    momentum: float = 0.9,
    batch_size: int = 128,
    seed: int = 0,
) -> Curve:
    """Train (Bezier) or draw (linear) a path between two checkpoints and evaluate it.

    Parameters
    ----------
    model_a, model_b : nn.Module
        The two endpoints (same architecture). Left untouched.
    data : DataBundle or (x, y)
        Training data (for training the curve, BN statistics and the error).
    curve : {"bezier", "linear"}
    n_points : int
        Points on a uniform grid of [0, 1], both ends included (paper: 5).
    epochs, lr, momentum, batch_size : curve training settings (Bezier only).
    seed : int
        Seeds the shuffling and the sampled ``t``.

    Returns
    -------
    Curve
    """
    from nndiag.io.data import as_data, model_inputs

    if curve not in ("bezier", "linear"):
        raise InputError(f"unknown curve '{curve}'; choose bezier or linear")
    if n_points < 3:
        raise InputError(f"n_points must be at least 3 (both ends and one interior point), got {n_points}")
    check_same_architecture(model_a, model_b)
    bundle = as_data(data)
    dev = device_of(model_a)
    x, y = model_inputs(model_a, bundle.x, device=dev, name=bundle.name), bundle.y.to(dev)
    pa = {k: v.detach().clone() for k, v in model_a.named_parameters()}
    pb = {k: v.detach().to(dev, copy=True) for k, v in model_b.named_parameters()}
    work = copy.deepcopy(model_a)
    for m in work.modules():  # the user's hooks must not fire on the private copy
        for name, value in list(vars(m).items()):
            if name.endswith("_hooks") and isinstance(value, dict):
                value.clear()
    for p in work.parameters():
        p.requires_grad_(False)
        p.grad = None
    ctrl = {k: ((pa[k] + pb[k]) / 2).requires_grad_(True) for k in pa}
    g = torch.Generator().manual_seed(int(seed))
    steps = 0
    if curve == "bezier" and epochs > 0:
        from torch.func import functional_call

        opt = torch.optim.SGD(list(ctrl.values()), lr=lr, momentum=momentum)
        work.train()
        for _ in range(epochs):
            perm = torch.randperm(len(x), generator=g)
            for i in range(0, len(x), batch_size):
                idx = perm[i:i + batch_size]
                t = float(torch.rand(1, generator=g))
                w = {k: _bezier(pa[k], ctrl[k], pb[k], t) for k in pa}
                loss = F.cross_entropy(logits_of(functional_call(work, w, (x[idx],))), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                steps += 1
    ts = np.linspace(0.0, 1.0, n_points)
    errs, losses = [], []
    with torch.no_grad():
        for t in ts:
            if curve == "bezier":
                w = {k: _bezier(pa[k], ctrl[k].detach(), pb[k], float(t)) for k in pa}
            else:
                w = {k: (1 - float(t)) * pa[k] + float(t) * pb[k] for k in pa}
            if t == 0.0:
                w = pa
            elif t == 1.0:
                w = pb
            e, lo = _evaluate_at(work, w, x, y, batch_size)
            errs.append(e)
            losses.append(lo)
    params = {"curve": curve, "n_points": n_points, "epochs": epochs if curve == "bezier" else 0, "lr": lr,
              "momentum": momentum, "batch_size": batch_size, "seed": seed, "steps": steps,
              "bn_recomputed": bool(_bn_modules(work)), "n_samples": len(x)}
    return Curve(curve, ts, np.asarray(errs), np.asarray(losses), params)
