"""``hessian_spectrum``: top/bottom eigenvalues, trace, density and criteria of the loss Hessian.

Examples
--------
>>> import torch
>>> from torch import nn
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<...>
>>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
>>> x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
>>> r = hessian_spectrum(model, (x, y), top_k=2, trace=True)
>>> r.eigenvalues.shape, bool(r.eigenvalues[0] >= r.eigenvalues[1])
((2,), True)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from nndiag._utils.memory import vectors_that_fit
from nndiag._utils.model_state import preserved
from nndiag._utils.precision import full_precision
from nndiag._utils.progress import progress_bar
from nndiag._utils.seeding import torch_generator
from nndiag._utils.threads import limit_threads
from nndiag.errors import InputError
from nndiag.landscape._setup import LossFn, differentiable_attention
from nndiag.landscape.criteria import spectrum_criteria
from nndiag.landscape.density import Density, slq
from nndiag.landscape.hvp import HessianOperator
from nndiag.landscape.lanczos import _random_unit, eigsh
from nndiag.landscape.split_trace import GaussNewtonProbes, split_trace
from nndiag.landscape.taylor import QuadraticForms, Unsupported
from nndiag.landscape.trace import TRACE_METHODS, TraceEstimate, exact_trace, hutchinson, hutchpp, xtrace
from nndiag.report.results import Finding, Result, provenance

#: Above this many SLQ-criteria ``re``, the spectrum looks like a random initialisation.
RE_RANDOM_LIKE = 0.5
#: Below this ``re`` the minimum looks well trained.
RE_TRAINED = 0.1


@dataclass(frozen=True)
class HessianResult:
    """The Hessian spectrum of a model's loss.

    Attributes
    ----------
    eigenvalues : ndarray
        The ``top_k`` largest eigenvalues, descending.
    residuals : ndarray
        ``‖H v − λ v‖`` of each eigenpair.
    eigenvectors : torch.Tensor or None
        Unit eigenvectors as rows ``(top_k, n_params)`` (flat parameter order).
    bottom_eigenvalues, bottom_residuals : ndarray
        The ``bottom_k`` smallest (most negative) eigenvalues, ascending, and residuals.
    trace, trace_stderr : float or None
        The trace and its standard error (None when not asked).
    density : Density or None
        SLQ nodes/weights (None when not asked).
    criteria : dict or None
        ``re``, ``Kh``, ``Ct`` from the density (None when not asked).
    loss : float
        The loss at the weights.
    n_samples, n_params : int
        Examples used and Hessian size.
    iterations : int
        Lanczos steps for the eigenvalues.
    converged : bool
        Whether the eigenpairs met ``tol``.
    n_hvp : int
        Hessian-vector products in total.
    params : dict
        Settings used (recorded in the JSON).
    seed : int
    timing : dict
        Seconds per stage.
    """

    eigenvalues: np.ndarray
    residuals: np.ndarray
    eigenvectors: torch.Tensor | None
    bottom_eigenvalues: np.ndarray
    bottom_residuals: np.ndarray
    trace: float | None
    trace_stderr: float | None
    trace_estimate: TraceEstimate | None
    density: Density | None
    criteria: dict[str, Any] | None
    loss: float
    n_samples: int
    n_params: int
    iterations: int
    converged: bool
    n_hvp: int
    params: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    timing: dict[str, float] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def top_eigenvalue(self) -> float:
        """The largest eigenvalue."""
        return float(self.eigenvalues[0]) if len(self.eigenvalues) else float("nan")

    def table(self) -> pd.DataFrame:
        """One row per eigenpair: ``name``, ``which``, ``rank``, ``eigenvalue``, ``residual``."""
        rows = [{"name": f"top_{i + 1}", "which": "top", "rank": i + 1, "eigenvalue": float(v),
                 "residual": float(r)} for i, (v, r) in enumerate(zip(self.eigenvalues, self.residuals, strict=True))]
        rows += [{"name": f"bottom_{i + 1}", "which": "bottom", "rank": i + 1, "eigenvalue": float(v),
                  "residual": float(r)}
                 for i, (v, r) in enumerate(zip(self.bottom_eigenvalues, self.bottom_residuals, strict=True))]
        return pd.DataFrame(rows, columns=["name", "which", "rank", "eigenvalue", "residual"])

    def findings(self) -> list[Finding]:
        """Statements about the curvature (codes ``HESS-*``, docs/FINDINGS.md)."""
        out: list[Finding] = []
        if not self.converged:
            out.append(Finding(
                "HESS-NOT-CONVERGED", "warn",
                f"the Lanczos eigenpairs did not reach tol={self.params.get('tol')} in "
                f"{self.iterations} steps; eigenvalues may be underestimated",
                {"metric": "residual", "value": float(np.max(self.residuals, initial=0.0)),
                 "iterations": self.iterations},
                "raise max_iter or loosen tol"))
        if len(self.bottom_eigenvalues) and len(self.eigenvalues) and self.eigenvalues[0] > 0:
            ratio = float(-self.bottom_eigenvalues[0] / self.eigenvalues[0])
            if ratio > 0.1:
                out.append(Finding(
                    "HESS-NEGATIVE-CURVATURE", "warn",
                    f"the Hessian has strong negative curvature (λmin/λmax = {-ratio:.3g}): "
                    "the weights are not at a minimum of this loss",
                    {"metric": "-lambda_min/lambda_max", "value": ratio, "threshold": 0.1},
                    "train longer or check the learning rate"))
        if self.criteria is not None and np.isfinite(self.criteria.get("re", np.nan)):
            re = float(self.criteria["re"])
            ev = {"metric": "re", "value": re, "Kh": self.criteria.get("Kh"), "Ct": self.criteria.get("Ct"),
                  "threshold": [RE_TRAINED, RE_RANDOM_LIKE]}
            if re >= RE_RANDOM_LIKE:
                out.append(Finding(
                    "HESS-RANDOM-LIKE", "warn",
                    f"the Hessian spectrum is nearly symmetric (re = {re:.3g}), as at random "
                    "initialisation: the model looks untrained or far from a minimum",
                    ev, "train the model (longer, or with a working learning rate)"))
            elif re <= RE_TRAINED:
                out.append(Finding(
                    "HESS-MAINLY-POSITIVE", "pass",
                    f"the Hessian spectrum is mainly positive (re = {re:.3g}): a trained minimum", ev))
            else:
                out.append(Finding(
                    "HESS-MIXED-CURVATURE", "warn",
                    f"the Hessian spectrum has notable negative mass (re = {re:.3g})",
                    ev, "the model may be under-trained; compare with a longer-trained checkpoint"))
        return out

    def summary(self) -> dict[str, Any]:
        """Scalar summary (the JSON fields of ``nndiag hessian``)."""
        s: dict[str, Any] = {
            "eigenvalues": [float(v) for v in self.eigenvalues],
            "top_eigenvalue": self.top_eigenvalue,
            "bottom_eigenvalues": [float(v) for v in self.bottom_eigenvalues],
            "trace": self.trace,
            "trace_stderr": self.trace_stderr,
            "loss": self.loss,
            "n_samples": self.n_samples,
            "n_params": self.n_params,
            "iterations": self.iterations,
            "converged": self.converged,
            "n_hvp": self.n_hvp,
        }
        if self.criteria is not None:
            s["criteria"] = {k: self.criteria[k] for k in ("re", "Kh", "Ct")}
            s["criteria_settings"] = {"Kh_n": self.criteria.get("Kh_n"),
                                      **(self.density.settings if self.density else {})}
        return s

    def to_result(self) -> Result:
        """The generic :class:`~nndiag.report.results.Result` (kind ``hessian``)."""
        tables = {"eigenvalues": self.table()}
        if self.density is not None:
            x, d, sigma = self.density.grid(400)
            tables["density"] = pd.DataFrame({"name": "density", "eigenvalue": x, "density": d})
            nodes, w = self.density.pooled()
            tables["slq_nodes"] = pd.DataFrame({"name": "slq", "node": nodes, "weight": w})
        return Result("hessian", tables=tables, summary=self.summary(), findings=self.findings(),
                      params=dict(self.params), seed=self.seed, timing=dict(self.timing),
                      meta=dict(self.meta))

    def to_dict(self) -> dict[str, Any]:
        """:meth:`to_result` as a JSON-safe dict."""
        return self.to_result().to_dict()

    def plot(self, ax: Any = None) -> Any:
        """The spectral density (needs ``density=True``); returns the Figure."""
        if self.density is None:
            raise InputError("no density in this result; call hessian_spectrum(..., density=True)")
        return self.density.plot(ax=ax)


#: Parameter-sized vectors Hutch++ holds at once (its 10-column sketch, their products, the
#: float64 QR): below this many in the memory share, ``auto`` takes Hutchinson instead.
HUTCHPP_VECTORS = 50


def _trace_plan(op: HessianOperator,
                method: str) -> tuple[str, tuple[QuadraticForms, GaussNewtonProbes | None] | None]:
    """The trace method to run and, for ``split``, its two probe engines.

    ``auto`` becomes ``split`` where the model, mode and loss allow it, else ``hutchpp``;
    an explicit ``split`` that does not apply is an :class:`InputError` naming the reason.
    When ``split`` is chosen the operator's cached gradient graphs are freed first: the
    split trace needs none of them, and its own activations (the Taylor primals and the
    logits graph) would otherwise be held alongside them.
    """
    if method not in ("auto", "split"):
        return method, None
    reason = "train mode (BatchNorm batch statistics, dropout)" if op.mode != "eval" else None
    if reason is None:
        op._set_mode()
        try:
            forms = QuadraticForms(op.model, op.params, op.buffers, op.data, op.loss_fn)
        except Unsupported as e:
            reason = str(e)
        else:
            op.release()
            try:
                gauss_newton = GaussNewtonProbes(op.model, op.params, op.buffers, op.data, op.loss_fn)
            except Unsupported:
                gauss_newton = None  # a loss without a known factor: parameter-space probes only
            return "split", (forms, gauss_newton)
    if method == "split":
        raise InputError(f"trace_method='split' does not apply here: {reason}; use 'hutchpp'")
    return "hutchpp", None


def _estimate_trace(op: HessianOperator, method: str, *, n_probes: int, rtol: float,
                    generator: torch.Generator, dtype: torch.dtype, device: torch.device,
                    bar: Any = None) -> tuple[str, TraceEstimate]:
    """Run the trace method ``method`` asks for (:func:`_trace_plan`); returns (method used, estimate).

    Some operations are only found unsupported by the split trace's tangent rules on the
    first probes (``F.linear`` with a parameter as its weight, a division by a varying
    tensor): ``auto`` then falls back to Hutch++, an explicit ``split`` is an
    :class:`InputError`.
    """
    used, engines = _trace_plan(op, method)
    kw = {"dtype": dtype, "device": device}
    if bar is not None:
        bar.update(description=f"Hessian: trace ({used}, at most {n_probes} probes)", total=n_probes, completed=0)
    if engines is not None:
        try:
            return used, split_trace(*engines, op.dim, n_probes=n_probes, rtol=rtol, generator=generator, **kw,
                                     on_probes=bar.advance if bar is not None else None)
        except Unsupported as e:
            if method == "split":
                raise InputError(f"trace_method='split' does not apply here: {e}; use 'hutchpp'") from None
        engines = None  # free the split trace's activations before Hutch++ rebuilds the gradient graphs
        used = "hutchpp"
    if used == "exact":
        return used, exact_trace(op.matmat, op.dim, **kw)
    fit = vectors_that_fit(op.dim, dtype, device)
    if used == "hutchpp" and method == "auto" and fit < HUTCHPP_VECTORS:
        used = "hutchinson"  # Hutch++'s sketch (tens of parameter-sized vectors) does not fit
    if used in ("hutchinson", "xtrace"):
        est = hutchinson if used == "hutchinson" else xtrace
        return used, est(op.matmat, op.dim, n_probes=n_probes, rtol=rtol, generator=generator,
                         block=max(1, min(8, fit // 4)), **kw)
    return used, hutchpp(op.matmat, op.dim, n_probes=n_probes, rtol=rtol, generator=generator, **kw)


@full_precision
def hessian_spectrum(
    model: nn.Module,
    data: Any,
    *,
    loss: LossFn | None = None,
    top_k: int = 1,
    bottom_k: int = 0,
    trace: bool = False,
    density: bool = False,
    n_samples: int | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    tol: float = 1e-4,
    max_iter: int | None = None,
    trace_method: str = "auto",
    trace_rtol: float = 1e-2,
    trace_probes: int = 200,
    slq_runs: int = 3,
    slq_steps: int = 80,
    slq_reorth: str | int = "full",
    kh_n: float = 0.5,
    mode: str = "eval",
    device: str | torch.device = "auto",
    dtype: torch.dtype = torch.float32,
    threads: int | None = None,
    vectors: bool = False,
    hvp_engine: str = "auto",
    progress: bool | None = None,
) -> HessianResult:
    """Eigenvalues, trace and density of the Hessian of ``model``'s loss on ``data``.

    Parameters
    ----------
    model : nn.Module
        The network; left exactly as it was (mode, flags, grads, hooks, weights).
    data : DataBundle, (x, y), DATA spec or DataLoader
        Examples the loss averages over.
    loss : callable, optional
        ``loss(logits, y)`` returning the batch mean; default mean cross-entropy.
    top_k, bottom_k : int
        Largest / smallest eigenvalues to compute (Lanczos, full reorthogonalisation).
    trace : bool
        Also estimate the trace (``trace_method``: ``split``, ``hutchpp``, ``xtrace``,
        ``hutchinson`` or ``exact``; ``auto`` = ``split`` where it applies, else ``hutchpp``),
        to a standard error of ``trace_rtol · |trace|`` or ``trace_probes``. ``split``
        (:mod:`~nndiag.landscape.split_trace`) estimates the Gauss–Newton part by
        output-space probes (default cross-entropy) and the rest by second-order forward
        passes; it needs eval mode and a model whose operations
        :mod:`~nndiag.landscape.taylor` supports. The method used is in
        ``params["trace_method"]``.
    density : bool
        Also compute the SLQ density (``slq_runs`` × ``slq_steps``, ``slq_reorth``)
        and the LLA criteria ``re``, ``Kh`` (exponent ``kh_n``), ``Ct``.
    n_samples : int, optional
        Seeded subset of the data.
    batch_size : int, optional
        Examples per forward pass (batch losses are weighted by size). ``None``: in eval
        mode on a CPU batches whose largest activation stays under 2 MiB (see
        :mod:`nndiag.landscape.blocking`), else 128; the size used is in
        ``params["batch_size"]``.
    seed : int
        Seeds the subset, start vector and probes.
    tol : float
        Relative residual tolerance of the eigenpairs.
    max_iter : int, optional
        Maximum Lanczos steps.
    mode : {"eval", "train"}
        Module mode of the forward passes (BatchNorm: running vs batch statistics).
    device : str
        ``auto`` keeps the model's device.
    dtype : torch.dtype
        ``torch.float64`` for high accuracy.
    threads : int, optional
        BLAS/torch threads (default: all usable cores or ``NNDIAG_THREADS``).
    vectors : bool
        Keep the top eigenvectors in the result.
    hvp_engine : {"auto", "double-backward", "forward-over-reverse"}
        How Hessian-vector products are computed (:mod:`~nndiag.landscape.hvp`); ``auto``
        times both on a GPU in eval mode. The engine used is in ``params["hvp_engine"]``.
    progress : bool, optional
        A progress bar on stderr (phase, products or probes done; default: when stderr is a
        terminal).

    Returns
    -------
    HessianResult

    Raises
    ------
    DataError
        Data that does not fit the model, labels out of range.
    AnalysisError
        No trainable parameters, a non-finite loss.
    """
    if top_k < 0 or bottom_k < 0:
        raise InputError(f"top_k and bottom_k must be >= 0 (got {top_k}, {bottom_k})")
    if trace_method not in TRACE_METHODS:
        raise InputError(f"unknown trace_method '{trace_method}'; choose one of {', '.join(TRACE_METHODS)}")
    timing: dict[str, float] = {}
    t0 = time.perf_counter()
    with limit_threads(threads), preserved(model, values=True), differentiable_attention():
        op = HessianOperator(model, data, loss=loss, n_samples=n_samples, batch_size=batch_size,
                             seed=seed, device=device, dtype=dtype, mode=mode, engine=hvp_engine,
                             lazy=top_k + bottom_k == 0 and not density)  # the trace may need no product
        timing["setup"] = time.perf_counter() - t0
        dev = op.device
        gen = torch_generator(seed)
        evals = res = bevals = bres = np.zeros(0)
        vecs = None
        iters, converged = 0, True
        first = None  # the eigenvalue run's tridiagonal matrix when it doubles as an SLQ run
        with progress_bar(None, "Hessian", enabled=progress) as bar:
            op.on_products = bar.advance
            if top_k + bottom_k > 0:
                bar.update(description=f"Hessian: top {top_k}" + (f" and bottom {bottom_k}" if bottom_k else "")
                           + " eigenvalues (Lanczos products)")
                t = time.perf_counter()
                # with a density (full reorthogonalisation) the eigenvalue run starts like an SLQ run
                # and takes at least its steps: it is then the density's first run as well
                share = density and slq_reorth == "full" and slq_runs >= 1
                er = eigsh(op.matvec, op.dim, top_k=top_k, bottom_k=bottom_k, tol=tol, max_iter=max_iter,
                           generator=gen, dtype=dtype, device=dev, vectors=vectors,
                           v0=_random_unit(op.dim, gen, dtype, dev, rademacher=True) if share else None,
                           min_iter=min(slq_steps, op.dim) if share else 0)
                first = er.tridiag if share else None
                evals, res, bevals, bres = er.eigenvalues, er.residuals, er.bottom_eigenvalues, er.bottom_residuals
                vecs = er.eigenvectors.detach().cpu() if er.eigenvectors is not None else None
                iters, converged = er.iterations, er.converged
                timing["eigenvalues"] = time.perf_counter() - t
            dens = crit = None
            if density:  # before the trace: the split trace frees the cached gradient graphs
                new_runs = slq_runs - (first is not None)
                bar.update(description=f"Hessian: density ({new_runs} × {slq_steps} Lanczos products"
                           + (", one run shared with the eigenvalues)" if first is not None else ")"),
                           total=new_runs * slq_steps, completed=0)
                t = time.perf_counter()
                dens = slq(op.matvec, op.dim, n_runs=slq_runs, steps=slq_steps, reorth=slq_reorth,
                           generator=gen, seed=seed, dtype=dtype, device=dev, first=first)
                crit = spectrum_criteria(*dens.pooled(), n=kh_n)
                timing["density"] = time.perf_counter() - t
            tr_est = None
            method_used = None
            if trace:
                t = time.perf_counter()
                method_used, tr_est = _estimate_trace(op, trace_method, n_probes=trace_probes, rtol=trace_rtol,
                                                      generator=gen, dtype=dtype, device=dev, bar=bar)
                timing["trace"] = time.perf_counter() - t
            op.on_products = None
        n_hvp, loss_value, n, dim = op.n_hvp, op.loss_value, op.data.n, op.dim
        used_batch, act_bytes = op.batch_size, op.activation_bytes
        engine_used = op.engine or "double-backward"  # None: no product was needed
        op.release()
    timing["total"] = time.perf_counter() - t0
    params = {
        "top_k": top_k, "bottom_k": bottom_k, "trace": trace, "density": density,
        "n_samples": n, "batch_size": used_batch, "batch_size_requested": batch_size,
        "activation_bytes_per_example": act_bytes, "tol": tol, "max_iter": max_iter,
        "trace_method": method_used, "trace_method_requested": trace_method if trace else None,
        "trace_rtol": trace_rtol,
        "trace_probes": trace_probes, "slq_runs": slq_runs, "slq_steps": slq_steps,
        "slq_reorth": slq_reorth, "kh_n": kh_n, "mode": mode, "dtype": str(dtype).replace("torch.", ""),
        "loss": "cross_entropy" if loss is None else getattr(loss, "__name__", "custom"),
        "hvp_engine": engine_used, "hvp_engine_requested": hvp_engine,
    }
    return HessianResult(
        eigenvalues=np.asarray(evals, dtype=float), residuals=np.asarray(res, dtype=float),
        eigenvectors=vecs, bottom_eigenvalues=np.asarray(bevals, dtype=float),
        bottom_residuals=np.asarray(bres, dtype=float),
        trace=None if tr_est is None else tr_est.value,
        trace_stderr=None if tr_est is None else tr_est.stderr,
        trace_estimate=tr_est, density=dens, criteria=crit, loss=loss_value, n_samples=n,
        n_params=dim, iterations=iters, converged=converged, n_hvp=n_hvp, params=params, seed=seed,
        timing=timing, meta=provenance(str(dev)),
    )
