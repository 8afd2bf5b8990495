"""1-D and 2-D loss landscapes around a model's weights.

``surface(model, data, dim=2, steps=21)`` evaluates ``L(θ + α d₁ + β d₂)`` on a regular
grid. The parameters are swapped in through ``torch.func.functional_call`` (the model
is never edited); several grid points go through one vectorised forward
(``torch.func.vmap`` over stacked parameter sets, or for fully connected models on a CPU
:mod:`~nndiag.landscape.stacked` passes), a plain loop on a bound copy, points side by
side in threads or a replayed CUDA graph — ``strategy="auto"`` times the candidates on the
first points and keeps the fastest. Big grids can be resumed from a ``.npz`` checkpoint
written after every chunk.

BatchNorm policy, recorded in the result: ``mode="eval"`` uses the model's running
statistics (so the loss at the origin is the model's eval-mode loss); ``mode="train"``
uses batch statistics, and the running statistics are updated only on copies.

Examples
--------
>>> import torch
>>> from torch import nn
>>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
>>> x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
>>> s = surface(model, (x, y), dim=1, steps=5)
>>> s.losses.shape
(5,)
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from nndiag._utils.device import model_device, resolve_device
from nndiag._utils.model_state import preserved
from nndiag._utils.precision import full_precision
from nndiag._utils.progress import progress_bar
from nndiag._utils.threads import limit_threads
from nndiag.errors import InputError
from nndiag.landscape._setup import (
    LossFn,
    buffer_copies,
    checked_loss,
    cpu_cross_entropy,
    default_loss,
    make_batches,
    resolve_mode,
    trainable,
)
from nndiag.landscape.blocking import auto_batches
from nndiag.landscape.bound import BoundCopy
from nndiag.landscape.directions import (
    Direction,
    direction_table,
    flat_to_direction,
    normalize_direction,
    random_direction,
    toward,
)
from nndiag.landscape.fold import FALLBACK_ERRORS, Folded, reproduces
from nndiag.landscape.stacked import Stacked, build_stacked, fully_connected
from nndiag.report.results import Finding, Result, provenance

STRATEGIES = ("auto", "vmap", "loop", "threads", "graph", "stacked")
#: File suffixes :meth:`Surface.save` writes a grid as.
GRID_SUFFIXES = (".npz", ".json")
#: Grids with more points than this are refused (override with ``max_points``).
MAX_POINTS = 250_000


@dataclass(frozen=True)
class Surface:
    """A loss landscape on a grid.

    Attributes
    ----------
    alphas : ndarray
        Steps along direction 1.
    betas : ndarray or None
        Steps along direction 2 (None for a line).
    losses : ndarray
        ``(steps,)`` or ``(steps, steps)`` with ``losses[i, j]`` at ``(alphas[i], betas[j])``.
    origin_loss : float
        The loss at the weights (α = β = 0) in the stated mode.
    directions : pandas.DataFrame
        Per parameter: name, shape, weight and direction norms.
    params : dict
        Settings (dim, steps, span, directions, norm, one_d, mode, BatchNorm, strategy...).
    seed : int
    timing : dict
    """

    alphas: np.ndarray
    betas: np.ndarray | None
    losses: np.ndarray
    origin_loss: float
    directions: pd.DataFrame
    params: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    timing: dict[str, float] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return 1 if self.betas is None else 2

    def summary(self) -> dict[str, Any]:
        finite = np.isfinite(self.losses)
        s: dict[str, Any] = {"origin_loss": self.origin_loss, "dim": self.dim,
                             "points": int(self.losses.size), "nonfinite": int((~finite).sum())}
        if finite.any():
            idx = np.unravel_index(np.nanargmin(np.where(finite, self.losses, np.nan)), self.losses.shape)
            s["min_loss"] = float(self.losses[idx])
            s["min_at"] = [float(self.alphas[idx[0]])] + ([float(self.betas[idx[1]])] if self.dim == 2 else [])
            s["max_loss"] = float(np.nanmax(np.where(finite, self.losses, np.nan)))
        if self.params.get("directions") == "interpolation":
            s["barriers"] = self.barriers()
        return s

    def _ends(self) -> list[tuple[str, str, np.ndarray, np.ndarray]]:
        """The interpolation segments on the grid: ``(from, to, t, losses)``, ``t`` from 0 to 1."""
        names = [self.params.get("model_name") or "this model", *(self.params.get("toward") or [])]
        ia, ja = _on_grid(self.alphas, 0.0), _on_grid(self.alphas, 1.0)
        if self.dim == 1:
            return [] if ia is None or ja is None else [(names[0], names[1], self.alphas, self.losses)]
        ib, jb = _on_grid(self.betas, 0.0), _on_grid(self.betas, 1.0)
        if None in (ia, ja, ib, jb):
            return []
        segs = [(names[0], names[1], self.alphas, self.losses[:, ib]),
                (names[0], names[2], self.betas, self.losses[ia, :])]
        # from the first other model (1, 0) to the second (0, 1): points (1 − t, t)
        pts = [(t, _on_grid(self.alphas, 1.0 - t)) for t in self.betas]
        t = np.array([tb for tb, i in pts if i is not None])
        losses = np.array([self.losses[i, j] for j, (_, i) in enumerate(pts) if i is not None])
        segs.append((names[1], names[2], t, losses))
        return segs

    def barriers(self) -> list[dict[str, Any]]:
        """Loss barriers between the models of an interpolation grid (linear mode connectivity).

        For each segment between two models, ``barrier = max_t L(t) − ((1 − t)·L(0) + t·L(1))``
        over the grid points with ``0 ≤ t ≤ 1`` (Frankle et al. 2020 measure it on the error),
        and ``relative`` = barrier / mean of the two end losses. Empty when the models are not
        grid points (a span given that misses 0 or 1).
        """
        out = []
        for a, b, t, losses in self._ends():
            inside = (t >= -1e-9) & (t <= 1 + 1e-9) & np.isfinite(losses)
            l0, l1 = float(losses[_on_grid(t, 0.0)]), float(losses[_on_grid(t, 1.0)])
            gap = losses[inside] - ((1 - t[inside]) * l0 + t[inside] * l1)
            j = int(np.argmax(gap))
            mean = (l0 + l1) / 2
            out.append({"from": a, "to": b, "loss_from": l0, "loss_to": l1, "barrier": float(max(gap[j], 0.0)),
                        "at": float(t[inside][j]), "relative": float(max(gap[j], 0.0) / mean) if mean > 0 else None})
        return out

    def findings(self) -> list[Finding]:
        out: list[Finding] = []
        s = self.summary()
        if s["nonfinite"]:
            out.append(Finding("LAND-NONFINITE", "warn",
                               f"{s['nonfinite']} of {s['points']} grid points have a non-finite loss",
                               {"metric": "nonfinite_points", "value": s["nonfinite"]},
                               "shrink the span or check the model for overflow"))
        if "min_loss" in s and np.isfinite(self.origin_loss):
            drop = self.origin_loss - s["min_loss"]
            rel = drop / max(abs(self.origin_loss), 1e-12)
            if rel > 0.05:
                out.append(Finding(
                    "LAND-NOT-MINIMUM", "warn",
                    f"the loss falls by {100 * rel:.1f}% from the weights to the grid minimum at "
                    f"({', '.join(f'{v:.3g}' for v in s['min_at'])}): the weights are not at a minimum "
                    "along these directions",
                    {"metric": "relative_drop", "value": rel, "threshold": 0.05, "min_at": s["min_at"]},
                    "train longer or lower the learning rate at the end of training"))
        for b in s.get("barriers", []):
            rel = b["relative"]
            connected = rel is not None and rel <= BARRIER_CONNECTED
            out.append(Finding(
                "LAND-BARRIER", "pass",
                f"from {b['from']} to {b['to']}: the loss rises {b['barrier']:.3g} above the straight line "
                f"between their losses ({b['loss_from']:.3g}, {b['loss_to']:.3g})"
                + (f", {100 * rel:.0f}% of their mean" if rel is not None else "")
                + (": linearly connected (one basin)" if connected else ": a barrier separates them"),
                {"metric": "loss_barrier", "value": b["barrier"], "relative": rel, "at": b["at"],
                 "threshold": BARRIER_CONNECTED},
                None if connected else "averaging their weights would land on the barrier; compare them as "
                                       "separate solutions"))
        return out

    def table(self) -> pd.DataFrame:
        """The grid in tidy form: ``name, alpha[, beta], loss``."""
        if self.dim == 1:
            return pd.DataFrame({"name": "line", "alpha": self.alphas, "loss": self.losses})
        A, B = np.meshgrid(self.alphas, self.betas, indexing="ij")
        return pd.DataFrame({"name": "plane", "alpha": A.ravel(), "beta": B.ravel(), "loss": self.losses.ravel()})

    def to_result(self) -> Result:
        return Result("landscape", tables={"grid": self.table(), "directions": self.directions},
                      summary=self.summary(), findings=self.findings(), params=dict(self.params),
                      seed=self.seed, timing=dict(self.timing), meta=dict(self.meta))

    def to_dict(self) -> dict[str, Any]:
        return self.to_result().to_dict()

    def save(self, path: str | Path) -> Path:
        """Write the grid as ``.npz`` (arrays + JSON settings) or ``.json`` (the result),
        through a temporary file and a rename; any other suffix is an :class:`InputError`."""
        from nndiag._utils.files import atomic_write

        path = Path(path)
        if path.suffix.lower() not in GRID_SUFFIXES:
            raise InputError(f"{path}: a landscape grid is written as {' or '.join(GRID_SUFFIXES)}")
        if path.suffix.lower() == ".json":
            return atomic_write(path, self.to_result().to_json())
        buf = io.BytesIO()
        np.savez(buf, alphas=self.alphas, betas=self.betas if self.betas is not None else np.zeros(0),
                 losses=self.losses, origin_loss=self.origin_loss,
                 params=json.dumps(self.to_result().to_dict()["params"]))
        return atomic_write(path, buf.getvalue())

    def plot(self, kind: str = "contour", ax: Any = None) -> Any:
        """``line`` (1-D), ``contour`` or ``surface`` (2-D, 3-D view); returns the Figure."""
        from nndiag.landscape import plots

        toward = self.params.get("toward") if self.params.get("directions") == "interpolation" else None
        if self.dim == 1 or kind == "line":
            if self.dim != 1:
                raise InputError("a line plot needs a 1-D landscape")
            if toward:
                this = self.params.get("model_name") or "this model"
                return plots.plot_line(self.alphas, self.losses, ax=ax, marks=[(0.0, this), (1.0, toward[0])],
                                       title=f"Loss along the line to {toward[0]}", xlabel="interpolation α")
            return plots.plot_line(self.alphas, self.losses, ax=ax)
        if kind == "surface":
            return plots.plot_surface3d(self.alphas, self.betas, self.losses, ax=ax)
        if kind == "contour":
            if toward:
                return plots.plot_contour(self.alphas, self.betas, self.losses, ax=ax,
                                          marks=[((1.0, 0.0), toward[0]), ((0.0, 1.0), toward[1])],
                                          title="Loss on the plane through three models",
                                          labels=(f"toward {toward[0]} (α)", f"toward {toward[1]} (β)"))
            return plots.plot_contour(self.alphas, self.betas, self.losses, ax=ax)
        raise InputError(f"unknown plot kind '{kind}'; choose line, contour or surface")


#: Loss barrier, relative to the mean of the two end losses, up to which two models count as
#: linearly connected in ``LAND-BARRIER`` (nndiag's threshold; Frankle et al. 2020 allow 2 %
#: of error).
BARRIER_CONNECTED = 0.1


def _on_grid(values: np.ndarray, x: float) -> int | None:
    """Index of ``x`` among grid ``values`` (to rounding), else None."""
    i = int(np.argmin(np.abs(np.asarray(values) - x)))
    return i if abs(float(values[i]) - x) <= 1e-9 * max(1.0, abs(x)) else None


class _Grid:
    """Evaluates the loss at ``base + Σ_j c_j d_j`` for rows of coefficients."""

    def __init__(self, model: nn.Module, base: Direction, dirs: list[Direction],
                 buffers: dict[str, torch.Tensor], batches: Any, loss_fn: LossFn,
                 channels_last: bool = True) -> None:
        self.model, self.base, self.dirs = model, base, dirs
        self.buffers, self.data, self.loss_fn = buffers, batches, loss_fn
        self.channels_last = channels_last
        self._graph: tuple[torch.Tensor, Any, torch.Tensor] | None = None
        self.folded: Folded | None = None
        self.bound: BoundCopy | None = None
        self.workers: list[BoundCopy] = []  # more bound copies for points side by side
        self.point_loss = loss_fn  # the loss used by :meth:`loop` on a bound copy
        self.stacker: Stacked | None = None  # points stacked through a fully connected model

    def _params(self, c: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        for k, b in self.base.items():
            p = b.expand((c.shape[0],) + b.shape)
            for j, d in enumerate(self.dirs):
                p = p + c[:, j].reshape((-1,) + (1,) * b.ndim) * d[k]
            out[k] = p
        return out

    @staticmethod
    def layout(params: dict[str, torch.Tensor], channels_last: bool = True) -> dict[str, torch.Tensor]:
        """4-D (conv) weights in channels-last memory format, which makes oneDNN
        convolutions, pooling and activations markedly faster on CPU (same values up to
        float rounding)."""
        if not channels_last:
            return params
        return {k: p.contiguous(memory_format=torch.channels_last) if p.ndim == 4 else p
                for k, p in params.items()}

    def _point(self, c: torch.Tensor) -> dict[str, torch.Tensor]:
        """Parameters at one grid point (laid out by :meth:`layout`)."""
        out = {}
        for k, b in self.base.items():
            p = b
            for j, d in enumerate(self.dirs):
                p = p + c[j] * d[k]
            out[k] = p
        return self.layout(out, self.channels_last)

    def _loss(self, p: dict[str, torch.Tensor], channels_last: bool | None = None) -> torch.Tensor:
        from torch.func import functional_call

        cl = self.channels_last if channels_last is None else channels_last
        model, tensors = self.model, {**self.buffers, **p}
        if self.folded is not None:
            model = self.folded.module
            tensors = {**self.buffers, **self.layout(self.folded.params(p, self.buffers), cl)}
        total = 0.0
        for (xb, yb), w in zip(self.data.batches, self.data.weights, strict=False):
            out = functional_call(model, tensors, (xb,), strict=False)
            total = total + w * self.loss_fn(out, yb)
        return total

    def vmap(self, c: torch.Tensor) -> torch.Tensor:
        import warnings

        from torch.func import vmap

        # an operation without a batching rule runs point by point; ``auto`` times vmap against the
        # loop and keeps the faster, so PyTorch's "performance drop" warning says nothing to the user
        with torch.inference_mode(), warnings.catch_warnings():  # (memory formats: not inside vmap)
            warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet")
            return vmap(lambda p: self._loss(p, channels_last=False), randomness="same")(self._params(c)).reshape(-1)

    def _bound_loss(self, c: torch.Tensor, bound: BoundCopy | None = None) -> torch.Tensor:
        bound = bound or self.bound
        assert bound is not None
        bound.set_point(c)
        total = 0.0
        for (xb, yb), w in zip(self.data.batches, self.data.weights, strict=False):
            total = total + w * self.point_loss(bound(xb), yb)
        return torch.as_tensor(total)

    def _side_by_side(self, c: torch.Tensor, n: int) -> torch.Tensor:
        """Points shared out over ``n`` Python threads, each with its own bound copy and one
        intra-op thread (convolutions and matrix products release the GIL)."""
        from concurrent.futures import ThreadPoolExecutor

        assert self.bound is not None
        while len(self.workers) < n - 1:
            self.workers.append(self.bound.copy())
        copies = [self.bound, *self.workers[:n - 1]]
        out: list[torch.Tensor | None] = [None] * c.shape[0]

        def work(j: int) -> None:
            with torch.inference_mode():
                for i in range(j, c.shape[0], n):
                    out[i] = self._bound_loss(c[i], copies[j])

        old = torch.get_num_threads()
        torch.set_num_threads(1)  # threads started from here on take one intra-op thread each
        try:
            with ThreadPoolExecutor(n) as pool:
                list(pool.map(work, range(n)))
        finally:
            torch.set_num_threads(old)
        return torch.stack(out).reshape(-1)  # type: ignore[arg-type]

    def threads(self, c: torch.Tensor) -> torch.Tensor:
        """Points side by side in Python threads (:meth:`_side_by_side`)."""
        if self.bound is None:
            raise ValueError("points side by side need a bound copy")
        n = min(torch.get_num_threads(), c.shape[0])
        return self._side_by_side(c, n) if n > 1 else self.loop(c)

    def loop(self, c: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            if self.bound is not None:
                return torch.stack([self._bound_loss(c[i]) for i in range(c.shape[0])]).reshape(-1)
            return torch.stack([torch.as_tensor(self._loss(self._point(c[i])))
                                for i in range(c.shape[0])]).reshape(-1)

    def stacked(self, c: torch.Tensor) -> torch.Tensor:
        """Several points per pass through a fully connected model (:mod:`~nndiag.landscape.stacked`)."""
        if self.stacker is None:
            raise ValueError("points stacked need a fully connected model bound on a CPU")
        with torch.inference_mode():
            return self.stacker(c, self.data)

    def capture(self, c0: torch.Tensor) -> None:
        """Record one grid point's parameter update and forward(s) as a CUDA graph, with the
        point's coefficients in a static tensor (see :meth:`graph`)."""
        if self._graph is not None:
            return
        cs = c0.clone()
        side = torch.cuda.Stream(cs.device)
        side.wait_stream(torch.cuda.current_stream(cs.device))
        with torch.inference_mode(), torch.cuda.stream(side):
            for _ in range(2):  # warm-up off the capture: cuDNN/cuBLAS pick their kernels
                self._loss(self._point(cs))
        torch.cuda.current_stream(cs.device).wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(g):
            out = torch.as_tensor(self._loss(self._point(cs)))
        self._graph = (cs, g, out)

    def graph(self, c: torch.Tensor) -> torch.Tensor:
        """CUDA: replay the captured graph for each point (copy two coefficients, one
        launch), instead of launching every kernel of the forward from Python; for small
        models the launches, not the arithmetic, bound a GPU grid."""
        self.capture(c[0])
        cs, g, out = self._graph
        vals = []
        with torch.inference_mode():
            for i in range(c.shape[0]):
                cs.copy_(c[i])
                g.replay()
                vals.append(out.clone())
        return torch.stack(vals).reshape(-1)


def _reproduces_origin(loss_at: Any, grid: _Grid, origin: float, n_dirs: int) -> bool:
    """Whether ``loss_at`` (coefficients → loss) gives the model's own loss at the origin
    (:func:`~nndiag.landscape.fold.reproduces`)."""
    def at_origin() -> float:
        with torch.inference_mode():
            return float(loss_at(next(iter(grid.base.values())).new_zeros(n_dirs)))

    return reproduces(at_origin, origin)


def _fold(grid: _Grid) -> tuple[int, int, int, int]:
    """Give the grid a rewritten copy of the model (:mod:`~nndiag.landscape.fold`: BatchNorm
    folded, ReLUs and sums in place, 2×2 max-poolings as pairwise maxima; its origin checked by
    :func:`_fold_and_bind`); returns the BatchNorm pairs folded, the operations made in place,
    the poolings rewritten and the flattens read in channels-last order."""
    from nndiag.landscape.fold import inference_copy

    folded = inference_copy(grid.model, example=grid.data.batches[0][0][:2])
    if folded is None:
        return 0, 0, 0, 0
    grid.folded = folded
    return len(folded.pairs), folded.in_place, folded.pools, len(folded.flattened)


def _fold_and_bind(grid: _Grid, origin: float, n_dirs: int, fold: bool) -> tuple[tuple[int, int, int, int], bool]:
    """:func:`_fold` (eval mode) then :func:`_bind`, with one origin check for both when both
    work (each check is a forward pass over all the data: 0.7 ms of a 65 ms digits-MLP plane);
    when the bound copy of the rewritten model misses the origin, the rewrite is checked alone
    and dropped if it is the cause."""
    counts = _fold(grid) if fold else (0, 0, 0, 0)
    if _bind(grid, origin, n_dirs):
        return counts, True
    if grid.folded is None:
        return counts, False
    # (an in-place sum that broadcasts, say, fails or differs here)
    if not _reproduces_origin(lambda c: grid._loss(grid._point(c)), grid, origin, n_dirs):
        grid.folded = None
        return (0, 0, 0, 0), _bind(grid, origin, n_dirs)
    return counts, False


def _bind(grid: _Grid, origin: float, n_dirs: int) -> bool:
    """Give the loop a :class:`~nndiag.landscape.bound.BoundCopy` (the folded copy when there
    is one) when it reproduces the model's loss at the origin; returns whether it does."""
    try:  # (a model that cannot be deep-copied stays on functional_call)
        grid.bound = BoundCopy(grid.model, grid.base, grid.dirs, grid.buffers, folded=grid.folded,
                               channels_last=grid.channels_last)
    except FALLBACK_ERRORS:
        return False
    if grid.loss_fn is default_loss:
        grid.point_loss = cpu_cross_entropy
    if not _reproduces_origin(grid._bound_loss, grid, origin, n_dirs):
        grid.bound, grid.point_loss = None, grid.loss_fn
        return False
    # the same values, held once: views into the bound copy's flat vectors
    grid.base, grid.dirs = grid.bound.base_views, grid.bound.dir_views
    return True


def _precompute_first_layer(grid: _Grid, origin: float, n_dirs: int, check: bool = True) -> str | None:
    """Compute the bound copy's first layer once per direction and batch
    (:mod:`~nndiag.landscape.first_layer`) when it applies and the copy still gives the
    model's loss at the origin; returns the layer's name. With ``check=False`` the caller
    checks (:func:`_check_first_layer`)."""
    from nndiag.landscape.first_layer import install

    assert grid.bound is not None
    name = install(grid.bound, [xb for xb, _ in grid.data.batches])
    return _check_first_layer(grid, origin, n_dirs, name) if check else name


def _check_first_layer(grid: _Grid, origin: float, n_dirs: int, name: str | None) -> str | None:
    """``name`` when the bound copy with its precomputed first layer gives the model's loss at
    the origin, else None (the precomputation removed)."""
    from nndiag.landscape.first_layer import uninstall

    assert grid.bound is not None
    if name is not None and not _reproduces_origin(grid._bound_loss, grid, origin, n_dirs):
        uninstall(grid.bound)
        return None
    return name


def _stack(grid: _Grid, origin: float) -> bool:
    """Give the grid a :class:`~nndiag.landscape.stacked.Stacked` evaluator when the bound
    copy's graph is supported and it reproduces the model's loss at the origin."""
    assert grid.bound is not None
    built = build_stacked(grid.bound, grid.loss_fn, grid.data)
    grid.stacker = built[0] if built is not None and reproduces(lambda: built[1], origin) else None
    return grid.stacker is not None


def _fingerprint(params: dict[str, Any], dirs: list[Direction]) -> str:
    h = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode())
    for d in dirs:
        for k in sorted(d):
            h.update(k.encode())
            h.update(np.float64(d[k].double().sum()).tobytes())
            h.update(np.float64(d[k].double().abs().sum()).tobytes())
    return h.hexdigest()


def _load_resume(path: Path, fp: str, n: int) -> np.ndarray | None:
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            if str(f["fingerprint"]) != fp or f["flat"].shape != (n,):
                raise InputError(f"{path}: checkpoint belongs to another landscape (different settings); "
                                 "delete it or choose another --resume file")
            return f["flat"].copy()
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"{path}: cannot read the landscape checkpoint ({exc})") from None


def _save_resume(path: Path, fp: str, flat: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, fingerprint=np.asarray(fp), flat=flat)
    os.replace(tmp, path)


def _make_directions(
    directions: Any, dim: int, weights: Direction, *, model: nn.Module, data: Any, norm: str, one_d: str,
    seed: int, mode: str, loss: LossFn | None, n_samples: int | None, batch_size: int | None, device: Any,
    dtype: torch.dtype,
) -> tuple[list[Direction], str, str]:
    if isinstance(directions, str):
        if directions == "random":
            gen = torch.Generator().manual_seed(int(seed))
            raw = [random_direction(weights, generator=gen) for _ in range(dim)]
            return [normalize_direction(d, weights, norm=norm, one_d=one_d) for d in raw], "random", norm
        if directions == "hessian":
            from nndiag.landscape.spectrum import hessian_spectrum

            r = hessian_spectrum(model, data, top_k=dim, vectors=True, seed=seed, mode=mode, loss=loss,
                                 n_samples=n_samples, batch_size=batch_size, device=device, dtype=dtype,
                                 tol=1e-3)
            raw = [flat_to_direction(v, weights) for v in r.eigenvectors]
            if norm == "none":
                return raw, "hessian", "none"
            return [normalize_direction(d, weights, norm=norm, one_d=one_d) for d in raw], "hessian", norm
        raise InputError(f"unknown directions '{directions}'; choose random, hessian, other models or direction dicts")
    items = list(directions)
    if len(items) != dim:
        raise InputError(f"a {dim}-D landscape needs {dim} direction(s) or other model(s), got {len(items)}")
    if all(_is_model(d) for d in items):
        return [toward(weights, other) for other in items], "interpolation", "none"
    if all(isinstance(d, dict) for d in items):
        dirs = []
        for d in items:
            if set(d) != set(weights):
                raise InputError("a direction dict must name exactly the trainable parameters")
            dirs.append({k: torch.as_tensor(v).detach().to(weights[k].device, weights[k].dtype)
                         for k, v in d.items()})
        return [normalize_direction(d, weights, norm=norm, one_d=one_d) for d in dirs], "given", norm
    raise InputError("directions must be 'random', 'hessian', a list of direction dicts or a list of other models")


def interpolation_span(steps: int) -> tuple[float, float]:
    """The default range of an interpolation grid: about a quarter beyond both models, with
    0 (this model) and 1 (the other) grid points, so that the ends are the models themselves.

    Examples
    --------
    >>> interpolation_span(7), interpolation_span(5)
    ((-0.25, 1.25), (0.0, 1.0))
    >>> lo, hi = interpolation_span(21)
    >>> round(lo, 4), round(hi, 4)  # steps of 1/14: 0 is the 4th point, 1 the 18th
    (-0.2143, 1.2143)
    """
    if steps < 3:
        return 0.0, 1.0
    k = int(0.25 * (steps - 1) / 1.5 + 1e-9)  # points beyond each end at the nominal spacing
    h = 1.0 / (steps - 1 - 2 * k)
    return -k * h, 1.0 + k * h


def _model_name(d: Any) -> str:
    """How an other model is named in results and pictures."""
    name = getattr(d, "name", None)
    return str(name) if isinstance(name, str) and name else type(d).__name__


def _model_names(models: list[Any], this: str | None = None) -> list[str]:
    """Distinct names of the other models (``#1``, ``#2`` added when two share one or this
    model's name)."""
    names = [_model_name(d) for d in models]
    if len(set(names)) < len(names) or (this or "this model") in names:
        names = [f"{n} #{i + 1}" for i, n in enumerate(names)]
    return names


def _is_model(d: Any) -> bool:
    """An other model for interpolation: a module, a LoadedModel or a TensorSource."""
    return isinstance(d, nn.Module) or hasattr(d, "tensors") or (hasattr(d, "infos") and hasattr(d, "get"))


@full_precision
def surface(
    model: nn.Module,
    data: Any,
    *,
    dim: int = 2,
    steps: int = 21,
    span: float | tuple[float, float] = 1.0,
    directions: Any = "random",
    norm: str = "filter",
    one_d: str = "zero",
    mode: str = "eval",
    loss: LossFn | None = None,
    n_samples: int | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    strategy: str = "auto",
    chunk: int | None = None,
    resume: str | Path | None = None,
    progress: bool | None = None,
    device: str | torch.device = "auto",
    dtype: torch.dtype = torch.float32,
    threads: int | None = None,
    max_points: int = MAX_POINTS,
    fold: bool = True,
    name: str | None = None,
) -> Surface:
    """The loss on a 1-D line or 2-D plane through the weights.

    Parameters
    ----------
    model : nn.Module
        The network; left exactly as it was.
    data : DataBundle, (x, y), DATA spec or DataLoader
        The fixed examples every grid point is evaluated on.
    dim : {1, 2}
        Line or plane.
    steps : int
        Grid points per axis (odd numbers put a point at the weights).
    span : float or (lo, hi)
        Steps range over ``[-span, span]`` (or ``[lo, hi]``). For interpolation toward
        other models, 0 is this model and 1 the other (default range then about
        (-0.25, 1.25), with 0 and 1 on the grid: :func:`interpolation_span`).
    directions : "random", "hessian", list of direction dicts, or list of other models
        Seeded Gaussian directions; the top ``dim`` Hessian eigenvectors (LLA's Hessian
        axes); directions you give (normalised by ``norm``); or ``dim`` other models of
        the same architecture (a line to one, a plane through three; no normalisation):
        modules, :func:`~nndiag.load_model` results or tensor sources (checkpoint
        files, Hugging Face folders), names matched up to one wrapper prefix such as
        ``module.`` (:func:`~nndiag._utils.names.matching_names`). Only trainable
        parameters move; buffers (BatchNorm running statistics) stay this model's.
    norm : {"filter", "layer", "model", "weight", "none"}
        Direction normalisation (see :mod:`nndiag.landscape.directions`).
    one_d : {"zero", "keep", "scale"}
        Policy for 1-D parameters (biases, BatchNorm affine).
    mode : {"eval", "train"}
        BatchNorm/dropout mode for the forward passes.
    loss : callable, optional
        ``loss(logits, y)``, mean over the batch; default cross-entropy.
    n_samples : int, optional
        Seeded subset of the data.
    batch_size : int, optional
        Examples per forward. Default: in eval mode on a CPU batches whose largest
        activation stays under 2 MiB (:mod:`nndiag.landscape.blocking`; same loss up to
        float rounding); otherwise all at once (in train mode BatchNorm then normalises
        with the whole data's statistics).
    seed : int
        Seeds the directions and the subset.
    strategy : {"auto", "vmap", "loop", "threads", "graph", "stacked"}
        How grid points are evaluated: ``vmap`` over stacked parameter sets, a ``loop`` of
        forwards, (CPU, eval mode) ``threads``: points side by side, one per thread, each on
        its own bound copy with one intra-op thread, (CPU, eval mode, fully connected
        models) ``stacked``: several points per pass, activations with a point axis and
        batched products (:mod:`~nndiag.landscape.stacked`), or (CUDA, eval mode) one
        captured CUDA ``graph`` replayed per point; ``auto`` times each twice on a few points
        (kept in the grid; two rounds in opposite orders) and keeps the fastest by its better
        trial (``params["strategy_seconds_per_point"]``); ``stacked``, once it runs, is kept.
    chunk : int, optional
        Grid points per vectorised forward (default from the parameter count).
    resume : path, optional
        ``.npz`` checkpoint, written after every chunk and read back on restart.
    progress : bool, optional
        Progress bar on stderr (default: when it is a terminal).
    max_points : int
        Refuse larger grids.
    fold : bool
        On a CPU, loop over the grid with a private copy of the model bound to one flat
        parameter buffer (:mod:`~nndiag.landscape.bound`: a point costs one operation per
        direction and a plain forward, ``params["bound_copy"]``), in eval mode a traced copy
        with BatchNorm folded into the convolutions before it and ReLUs/residual sums in
        place (:mod:`~nndiag.landscape.fold`; the same function, fewer passes over memory),
        2×2 max-poolings as two pairwise maxima and flattened convolution outputs read in
        channels-last order by the next linear layer, each used only after checking it
        reproduces the loss at the origin. The counts are in ``params["batchnorm_folded"]``,
        ``params["in_place_ops"]``, ``params["pools_rewritten"]`` and
        ``params["flattens_channels_last"]``. A fully connected model whose grid is stacked
        (``strategy`` ``"auto"`` or ``"stacked"``) is not rewritten: nothing there to gain.
    name : str, optional
        What to call this model beside other models of an interpolation (its barriers,
        pictures); default "this model".

    Returns
    -------
    Surface
    """
    if dim not in (1, 2):
        raise InputError(f"dim must be 1 or 2, got {dim}")
    if steps < 2:
        raise InputError(f"steps must be at least 2, got {steps}")
    if steps ** dim > max_points:
        raise InputError(f"a {'×'.join([str(steps)] * dim)} grid has {steps ** dim:,} points, more than the "
                         f"limit of {max_points:,}; use fewer steps or raise max_points")
    if strategy not in STRATEGIES:
        raise InputError(f"unknown strategy '{strategy}'; choose one of {', '.join(STRATEGIES)}")
    resolve_mode(mode)
    directions = directions if isinstance(directions, str) else list(directions)
    interp = not isinstance(directions, str) and all(_is_model(d) for d in directions)
    lo, hi = (interpolation_span(steps) if interp and not isinstance(span, (tuple, list)) and span == 1.0 else
              (tuple(span) if isinstance(span, (tuple, list)) else (-float(span), float(span))))
    if not hi > lo:
        raise InputError(f"span must have hi > lo, got ({lo}, {hi})")
    timing: dict[str, float] = {}
    t0 = time.perf_counter()
    loss_fn = loss or default_loss
    with limit_threads(threads), preserved(model, values=True):
        dev = model_device(model) if device == "auto" else resolve_device(device)
        named = trainable(model)
        weights = {k: p.detach().to(device=dev, dtype=dtype).clone() for k, p in named.items()}
        bs = 1 << 30 if batch_size is None else batch_size
        batches = make_batches(data, model=model, n_samples=n_samples, batch_size=bs, seed=seed,
                               device=dev, dtype=dtype)
        dirs, dkind, used_norm = _make_directions(
            directions, dim, weights, model=model, data=data, norm=norm, one_d=one_d, seed=seed, mode=mode,
            loss=loss, n_samples=n_samples, device=dev, dtype=dtype,
            batch_size=None if batch_size is None and mode == "eval" else bs)
        timing["directions"] = time.perf_counter() - t0
        model.train(mode == "train")
        buffers = buffer_copies(model, dev, dtype)
        act_bytes = None
        if batch_size is None:
            batches, act_bytes = auto_batches(model, {**buffers, **_Grid.layout(weights)}, batches, loss_fn,
                                              mode=mode, fallback=bs)
        with torch.inference_mode():
            origin = 0.0
            for (xb, yb), w in zip(batches.batches, batches.weights, strict=False):
                origin += w * float(checked_loss(model, {**buffers, **weights}, xb, yb, loss_fn, check=True))
        buffers = buffer_copies(model, dev, dtype)  # running statistics as the model has them
        grid = _Grid(model, weights, dirs, buffers, batches, loss_fn, channels_last=dev.type == "cpu")
        # (a fully connected model's grid is stacked, and the stacked evaluator reads the graph
        # of the plain copy as well: the rewritten copy cost 4 ms of a 65 ms digits-MLP plane;
        # a loop asked for by name keeps it, for its in-place activations)
        stacks_anyway = strategy in ("auto", "stacked") and fully_connected(model)
        eval_cpu = mode == "eval" and dev.type == "cpu" and fold and not stacks_anyway
        if dev.type == "cpu" and fold:
            (folded, in_place, pools, flats), bound = _fold_and_bind(grid, origin, dim, fold=eval_cpu)
        else:
            (folded, in_place, pools, flats), bound = (0, 0, 0, 0), False
        # when the grid will be stacked, the stacked pass's origin check covers the precomputed
        # first layer too (each check is a forward over all the data)
        may_stack = bound and mode == "eval" and strategy in ("auto", "stacked")
        first = _precompute_first_layer(grid, origin, dim, check=not may_stack) if bound else None
        stackable = _stack(grid, origin) if bound and mode == "eval" else False
        if may_stack and not stackable and first is not None:
            first = _check_first_layer(grid, origin, dim, first)
            if first is None:  # the precomputation missed the origin: stack without it
                stackable = _stack(grid, origin)
        weights, dirs = grid.base, grid.dirs  # (views into the bound copy's vectors when bound)
        alphas = np.linspace(lo, hi, steps)
        betas = np.linspace(lo, hi, steps) if dim == 2 else None
        if dim == 1:
            coeffs = alphas[:, None]
        else:
            A, B = np.meshgrid(alphas, betas, indexing="ij")
            coeffs = np.stack([A.ravel(), B.ravel()], axis=1)
        n_pts = coeffs.shape[0]
        n_par = sum(w.numel() for w in weights.values())
        per_point = n_par * (dim + 1) * torch.finfo(dtype).bits // 8
        chunk_n = int(chunk or max(1, min(16, (256 << 20) // max(per_point, 1))))
        if stackable and chunk is None:  # whole passes per call (a small network stacks up to 64 points)
            chunk_n = max(chunk_n, grid.stacker.points_per_pass)
        settings = {
            "dim": dim, "steps": steps, "span": [lo, hi], "directions": dkind, "norm": used_norm,
            "toward": _model_names(directions, name) if dkind == "interpolation" else None,
            "model_name": name,
            "one_d": one_d, "mode": mode, "n_samples": batches.n,
            "dtype": str(dtype).replace("torch.", ""),
            "batchnorm_modules": sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()),
            "batchnorm_statistics": "running (eval)" if mode == "eval" else "batch (train), running stats on copies",
            "loss": "cross_entropy" if loss is None else getattr(loss, "__name__", "custom"),
            "n_params": n_par,
        }
        flat = np.full(n_pts, np.nan)
        done = np.zeros(n_pts, dtype=bool)
        rpath = Path(resume) if resume is not None else None
        fp = ""  # (hashing the directions cost 0.5 ms of a 65 ms digits-MLP plane: only for resume files)
        if rpath is not None:
            fp = _fingerprint(settings | {"seed": seed, "batch_size": batch_size}, dirs)
            prev = _load_resume(rpath, fp, n_pts)
            if prev is not None:
                flat = prev
                done = ~np.isnan(flat) | np.isinf(flat)
        graphable = dev.type == "cuda" and mode == "eval"
        if strategy == "graph" and not graphable:
            raise InputError("strategy='graph' (CUDA graphs) needs a CUDA device and mode='eval'")
        # side by side only in eval mode: in train mode the copies would share running
        # statistics and dropout's random stream, and the order of draws would vary
        threadable = bound and mode == "eval" and torch.get_num_threads() > 1
        if strategy == "threads" and not (bound and mode == "eval"):
            raise InputError("strategy='threads' needs mode='eval' on a CPU (with fold=True)")
        if strategy == "stacked" and not stackable:
            raise InputError("strategy='stacked' needs mode='eval' on a CPU (with fold=True) and a fully "
                             "connected model (linear layers, element-wise activations, BatchNorm1d/LayerNorm)")
        # one thread: points side by side is the loop (and is recorded as such)
        chosen = "loop" if strategy == "threads" and torch.get_num_threads() < 2 else strategy
        ctensor = torch.as_tensor(coeffs, dtype=dtype, device=dev)
        t1 = time.perf_counter()
        todo = np.flatnonzero(~done)
        # vmap over stacked parameter sets runs convolutions as grouped ones: 2–3× slower than
        # the loop on every CPU CNN measured, so a CPU trial for a convolutional model would
        # only waste its first points
        convs = any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())
        # (stacked does what vmap does for the models it takes, without vmap's per-call cost)
        candidates = (["stacked", "loop"] if stackable else ["loop"] if dev.type == "cpu" and convs
                      else ["vmap", "loop"]) + (
            ["threads"] if threadable else []) + (["graph"] if graphable else [])
        # auto times each candidate on a few points twice, in two rounds of opposite order, and
        # keeps the fastest by each one's better trial: a single trial each chose the slower of
        # loop and threads in one of two digits-CNN planes on two threads (2.46 against 1.72 s),
        # the first trial paying one-time costs (oneDNN primitives, the threads' copies) and a
        # noisy host's drift falling on one of them
        schedule = deque(candidates + candidates[::-1] if len(candidates) > 1 else candidates)
        trials: dict[str, list[float]] = {}
        with progress_bar(len(todo), f"landscape {dim}-D", enabled=progress) as bar:
            i = 0
            while i < len(todo):
                use = chosen
                if chosen == "auto":  # time each on a few points, keep the fastest
                    use = schedule.popleft()
                idx = todo[i:i + (min(chunk_n, 4) if chosen == "auto" and use != "stacked" else chunk_n)]
                try:
                    if use == "graph":
                        grid.capture(ctensor[idx[0]])  # once, before the clock starts
                    t = time.perf_counter()
                    # to the host before the clock stops: CUDA kernels run asynchronously
                    vals = getattr(grid, use)(ctensor[idx]).double().cpu().numpy()
                except (RuntimeError, NotImplementedError, ValueError):
                    if use == "loop" or strategy != "auto":
                        raise
                    trials[use] = [float("inf")]  # vmap or graph capture unsupported by this model
                    schedule = deque(c for c in schedule if c != use)
                    if not schedule:
                        chosen = min(trials, key=lambda c: min(trials[c]))
                    continue
                trials.setdefault(use, []).append((time.perf_counter() - t) / len(idx))
                if chosen == "auto" and (not schedule or use == "stacked"):
                    # stacked, once it runs, is kept untimed against the others: it is the loop with
                    # many points per pass (digits MLP, one thread: 0.11 against 0.5 ms a point), and
                    # the other trials cost more than they could save (the threads trial's copies ~5 ms)
                    chosen = min(trials, key=lambda c: min(trials[c]))
                flat[idx] = vals
                if rpath is not None:
                    _save_resume(rpath, fp, flat)
                bar.advance(len(idx))
                i += len(idx)
        times = {c: min(v) for c, v in trials.items()}
        timing["grid"] = time.perf_counter() - t1
    timing["total"] = time.perf_counter() - t0
    settings["strategy"] = chosen if chosen != "auto" else (next(iter(times), "none"))
    # seconds per point of each strategy timed (the better of its trials; inf: unsupported)
    settings["strategy_seconds_per_point"] = ({c: v if np.isfinite(v) else None for c, v in times.items()}
                                              if strategy == "auto" else None)
    settings["chunk"] = chunk_n
    settings["batchnorm_folded"] = folded
    settings["in_place_ops"] = in_place
    settings["pools_rewritten"] = pools
    settings["flattens_channels_last"] = flats
    settings["bound_copy"] = bound
    settings["first_layer_precomputed"] = first
    settings["points_stacked"] = (grid.stacker.points_per_pass
                                  if grid.stacker is not None and settings["strategy"] == "stacked" else None)
    settings["batch_size"] = batches.batch_size
    settings["batch_size_requested"] = batch_size
    settings["activation_bytes_per_example"] = act_bytes
    table = pd.DataFrame(direction_table(dirs, weights))
    losses = flat.reshape((steps,) * dim)
    return Surface(alphas, betas, losses, origin, table, settings, seed, timing, provenance(str(dev)))
