"""Hessian-vector products of a model's loss over its trainable parameters.

The Hessian is that of the full-data loss ``L = Σ_b (n_b / n) · mean-loss_b`` with
respect to the parameters that require grad, taken through
``torch.func.functional_call`` on *copies* of the parameters and buffers, so the
user's model is never edited. For each batch the gradient graph is built once
(``autograd.grad(create_graph=True)``) and reused for every probe vector; several
probes at once go through ``is_grads_batched`` when ``batched=True`` works for the
model (falls back to a loop otherwise).

Engines
-------
``double-backward``
    The cached gradient graph, differentiated again for each probe. On the CPU it was the
    fastest engine on every model measured (digits MLP, digits CNN, ResNet20;
    ``benchmarks/hvp_engines.py``: forward-over-reverse took 1.3–1.6× longer there).
``forward-over-reverse``
    ``torch.func.jvp`` of ``torch.func.grad`` — recomputes forward and backward in forward
    mode for each product, ``vmap`` over probes. On an H100, ResNet20 on 512 images: 29 ms
    per product against 295 ms for double backward (whose convolution double-backward is
    slow there); tiny models stayed faster with double backward (0.8 vs 2.1 ms).
    Only in ``mode="eval"`` (train mode would redraw dropout masks for every product and
    update BatchNorm statistics inside the transform).
``auto`` (default)
    ``double-backward`` on the CPU and in train mode; on a GPU in eval mode the first
    product(s) run through both engines and the faster one is kept (recorded in
    :attr:`HessianOperator.engine`).

Examples
--------
>>> import torch
>>> from torch import nn
>>> model = nn.Sequential(nn.Linear(4, 3))
>>> x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
>>> op = HessianOperator(model, (x, y))
>>> op.matvec(torch.zeros(op.dim)).abs().max().item()
0.0
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from nndiag._utils.device import model_device, resolve_device
from nndiag._utils.precision import full_precision
from nndiag.errors import InputError
from nndiag.landscape._setup import (
    Batches,
    LossFn,
    buffer_copies,
    checked_loss,
    default_loss,
    make_batches,
    param_copies,
    resolve_mode,
    trainable,
    with_differentiable_attention,
)
from nndiag.landscape.blocking import auto_batches
from nndiag.landscape.fold import FALLBACK_ERRORS, Folded, inference_copy, reproduces

ENGINES = ("auto", "double-backward", "forward-over-reverse")
#: Examples per forward when ``batch_size=None`` and the size rule does not apply (train mode, GPU).
DEFAULT_BATCH = 128
#: The batched-vs-loop decision of :meth:`HessianOperator.matmat`, per model shape and setting
#: (a process-wide memo: repeated analyses of one architecture skip the timing trial).
_BATCHED_CHOICE: dict[tuple[Any, ...], bool] = {}


class HessianOperator:
    """The Hessian of a model's loss as a linear operator on flat parameter vectors.

    Parameters
    ----------
    model : nn.Module
        The network; only read (its mode is set to ``mode`` while the operator is
        built and used — wrap calls in :func:`nndiag._utils.model_state.preserved`).
    data : DataBundle, (x, y), spec or DataLoader
        The examples the loss is averaged over.
    loss : callable, optional
        ``loss(logits, y) -> scalar`` (mean over the batch); mean cross-entropy by default.
    n_samples : int, optional
        Use a seeded subset of this size.
    batch_size : int, optional
        Examples per forward pass. ``None`` (default): in eval mode on a CPU batches whose
        largest activation stays under 2 MiB (:mod:`nndiag.landscape.blocking`: large
        activations page-fault on every pass; the loss is the same size-weighted mean),
        otherwise 128 — in train mode it sets BatchNorm's batch statistics, so choose it
        deliberately.
    seed : int
        Seed for the subset.
    device : str or torch.device
        ``auto`` uses the model's device.
    dtype : torch.dtype
        ``torch.float64`` for high-accuracy spectra.
    mode : {"eval", "train"}
        Module mode during the forward passes. ``train`` uses batch statistics in
        BatchNorm (running statistics are updated only on copies).
    cache : bool
        Keep every batch's gradient graph (fast, memory ∝ batches); otherwise rebuild
        the graph for each product.
    engine : {"auto", "double-backward", "forward-over-reverse"}
        How products are computed (see the module docstring).
    lazy : bool
        With ``cache``, build the gradient graphs at the first product instead of now
        (construction then runs one checked forward pass without gradients); for callers
        that may need no product at all.

    Attributes
    ----------
    dim : int
        Number of trainable parameters (the Hessian is ``dim × dim``).
    names, shapes : list
        The coordinates' parameter names and shapes, in flat order.
    n_hvp : int
        Hessian-vector products computed so far (a batched call with k probes counts k).
    engine : str or None
        The engine in use; None until ``auto`` has timed both on a GPU.
    batch_size : int
        Examples per forward pass in use (the largest batch).
    activation_bytes : int or None
        Largest activation per example, measured when ``batch_size=None`` chose the size.
    """

    #: Probes per vectorised forward-over-reverse call (memory grows with it).
    fr_chunk = 4

    @with_differentiable_attention
    def __init__(
        self,
        model: nn.Module,
        data: Any,
        *,
        loss: LossFn | None = None,
        n_samples: int | None = None,
        batch_size: int | None = None,
        seed: int = 0,
        device: str | torch.device = "auto",
        dtype: torch.dtype = torch.float32,
        mode: str = "eval",
        cache: bool = True,
        engine: str = "auto",
        lazy: bool = False,
    ) -> None:
        if engine not in ENGINES:
            raise InputError(f"unknown engine '{engine}'; choose one of {', '.join(ENGINES)}")
        if engine == "forward-over-reverse" and mode != "eval":
            raise InputError("the forward-over-reverse engine needs mode='eval' (train mode would redraw "
                             "dropout masks and update BatchNorm statistics for every product)")
        self.model = model
        self.loss_fn: LossFn = loss or default_loss
        self.mode = resolve_mode(mode)
        dev = model_device(model) if device == "auto" else resolve_device(device)
        self.device, self.dtype = dev, dtype
        named = trainable(model)
        self.names = list(named)
        self.shapes = [tuple(p.shape) for p in named.values()]
        self.sizes = [p.numel() for p in named.values()]
        self.dim = int(sum(self.sizes))
        self.params = param_copies(named, dev, dtype)
        self.buffers = buffer_copies(model, dev, dtype)
        self.data: Batches = make_batches(
            data, model=model, n_samples=n_samples, batch_size=1 << 30 if batch_size is None else batch_size, seed=seed,
            device=dev, dtype=dtype,
        )
        self.activation_bytes: int | None = None
        if batch_size is None:
            self._set_mode()
            self.data, self.activation_bytes = auto_batches(model, self._tensors(), self.data, self.loss_fn,
                                                       mode=self.mode, fallback=DEFAULT_BATCH)
        self.batch_size = self.data.batch_size
        self.cache = cache
        self.n_hvp = 0
        #: called with the number of products after each call (a progress display), or None
        self.on_products: Callable[[int], None] | None = None
        if engine == "auto" and (dev.type == "cpu" or self.mode != "eval"):
            engine = "double-backward"
        self.engine: str | None = None if engine == "auto" else engine
        self._fr: tuple[dict[str, torch.Tensor], list[Any]] | None = None
        self._graphs: list[torch.Tensor] | None = None
        self._batched_ok: bool | None = None
        self.loss_value = float("nan")
        self._set_mode()
        self.folded: Folded | None = None  # decided at the first graph (:meth:`_forward`)
        self._fold_pending = self.mode == "eval"
        # eager: the graphs now (their losses validated); lazy or uncached: one checked forward
        self.loss_value = self._build() if cache and not lazy else self._forward_check()

    # --- set-up ---------------------------------------------------------------------
    def _set_mode(self) -> None:
        self.model.train(self.mode == "train")

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {**self.buffers, **self.params}

    def _fold(self) -> Folded | None:
        """The model with eval-mode BatchNorm folded into its convolutions, for the gradient
        graphs (:func:`~nndiag.landscape.fold.inference_copy` without the in-place rewrites).

        The folded weights are computed from the parameters inside the graph, so gradients
        and Hessian are still those of the model's parameters; the graph just has no
        normalisation pass over the activations (ResNet20, 128 images, 2 CPU threads: 0.60 →
        0.49 s per double-backward product, graph built in 0.22 instead of 0.45 s). Used only
        when it reproduces the model's loss on the first batch (1e-4 relative).
        """
        folded = inference_copy(self.model, in_place=False, rewrite_pools=False)
        if folded is None or not folded.pairs:
            return None
        xb, yb = self.data.batches[0]

        def first_batch(module: nn.Module, tensors: dict[str, torch.Tensor]) -> float:
            with torch.no_grad():
                return float(self.loss_fn(functional_call(module, tensors, (xb,)), yb))

        try:
            ref = first_batch(self.model, self._tensors())
        except FALLBACK_ERRORS:  # the model's own error: checked_loss reports it in one line
            return None
        return folded if reproduces(lambda: first_batch(folded.module, self._folded_tensors(folded)), ref) else None

    def _folded_tensors(self, folded: Folded) -> dict[str, torch.Tensor]:
        return {**self.buffers, **folded.params(self.params, self.buffers)}

    def _forward(self) -> tuple[nn.Module, dict[str, torch.Tensor]]:
        """The module the products differentiate and the tensors to call it with."""
        if self._fold_pending:
            self._fold_pending = False
            self.folded = self._fold()
        if self.folded is not None:
            return self.folded.module, self._folded_tensors(self.folded)
        return self.model, self._tensors()

    def _grad(self, xb: torch.Tensor, yb: torch.Tensor, w: float, check: bool) -> tuple[torch.Tensor, float]:
        module, tensors = self._forward()
        # attention through the math kernel: the fused CPU/flash kernels have no double backward
        # ("derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented")
        with sdpa_kernel([SDPBackend.MATH]):
            loss = checked_loss(module, tensors, xb, yb, self.loss_fn, check=check)
        grads = torch.autograd.grad(loss * w, list(self.params.values()), create_graph=True,
                                    allow_unused=True)
        flat = torch.cat([
            (g if g is not None else torch.zeros_like(p)).reshape(-1)
            for g, p in zip(grads, self.params.values(), strict=True)
        ])
        if not flat.requires_grad:  # loss is linear in every parameter: zero Hessian
            flat = flat + 0.0 * sum(p.sum() for p in self.params.values())
        return flat, float(loss.detach()) * w

    @full_precision
    def _build(self) -> float:
        graphs, total = [], 0.0
        with torch.enable_grad():
            for (xb, yb), w in zip(self.data.batches, self.data.weights, strict=True):
                g, lv = self._grad(xb, yb, w, check=True)
                graphs.append(g)
                total += lv
        self._graphs = graphs
        return total

    @full_precision
    def _forward_check(self) -> float:
        total = 0.0
        with torch.no_grad():
            for (xb, yb), w in zip(self.data.batches, self.data.weights, strict=True):
                loss = checked_loss(self.model, self._tensors(), xb, yb, self.loss_fn, check=True)  # the model's own
                total += float(loss) * w
        return total

    def _iter_graphs(self):
        if self._graphs is None and self.cache:
            self._build()
        if self._graphs is not None:
            yield from self._graphs
            return
        with torch.enable_grad():
            for (xb, yb), w in zip(self.data.batches, self.data.weights, strict=True):
                yield self._grad(xb, yb, w, check=False)[0]

    # --- products -------------------------------------------------------------------
    @full_precision
    @with_differentiable_attention
    def gradient(self) -> torch.Tensor:
        """The full-data gradient as a flat vector (detached)."""
        return sum(g.detach() for g in self._iter_graphs())  # type: ignore[return-value]

    def _vjp(self, g: torch.Tensor, v: torch.Tensor, batched: bool) -> torch.Tensor:
        hv = torch.autograd.grad(g, list(self.params.values()), grad_outputs=v, retain_graph=True,
                                 allow_unused=True, is_grads_batched=batched)
        lead = (v.shape[0],) if batched else ()
        return torch.cat([
            (h if h is not None else torch.zeros(lead + tuple(p.shape), dtype=v.dtype, device=v.device))
            .reshape(*lead, -1)
            for h, p in zip(hv, self.params.values(), strict=True)
        ], dim=-1)

    @full_precision
    @with_differentiable_attention
    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``H v`` for a flat vector ``v`` of length :attr:`dim`."""
        v = v.to(device=self.device, dtype=self.dtype)
        if self.engine is None:
            return self._choose_engine(v[None])[0]
        if self.engine == "forward-over-reverse":
            return self._fr_matmat(v[None])[0]
        return self._dbl_matvec(v)

    def _dbl_matvec(self, v: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(v)
        self._set_mode()
        with torch.enable_grad():
            for g in self._iter_graphs():
                out += self._vjp(g, v, batched=False)
        self._count(1)
        return out.detach()

    # --- forward-over-reverse ---------------------------------------------------------
    def _fr_funcs(self) -> tuple[dict[str, torch.Tensor], list[Any]]:
        if self._fr is None:
            from torch.func import grad

            params = {k: p.detach() for k, p in self.params.items()}
            grads = []
            for (xb, yb), w in zip(self.data.batches, self.data.weights, strict=True):
                def loss(p: dict[str, torch.Tensor], xb: torch.Tensor = xb, yb: torch.Tensor = yb,
                         w: float = w) -> torch.Tensor:
                    with sdpa_kernel([SDPBackend.MATH]):  # forward-mode AD through attention, as in _grad
                        out = functional_call(self.model, {**self.buffers, **p}, (xb,), strict=False)
                    return self.loss_fn(out, yb) * w

                grads.append(grad(loss))
            self._fr = (params, grads)
        return self._fr

    def _fr_matmat(self, V: torch.Tensor) -> torch.Tensor:
        """Rows ``H v_i`` by ``jvp`` of ``grad`` (``vmap`` over at most :attr:`fr_chunk` probes)."""
        from torch.func import jvp, vmap

        params, grads = self._fr_funcs()
        parts = torch.split(V, self.sizes, dim=1)
        tangents = {n: t.reshape((V.shape[0],) + s) for n, t, s in zip(self.names, parts, self.shapes, strict=True)}
        out = torch.zeros_like(V)
        self._set_mode()
        for g in grads:
            def one(t: dict[str, torch.Tensor], g: Any = g) -> dict[str, torch.Tensor]:
                return jvp(g, (params,), (t,))[1]

            if V.shape[0] == 1:
                hv = {n: h[None] for n, h in one({n: t[0] for n, t in tangents.items()}).items()}
            else:
                hv = vmap(one, chunk_size=self.fr_chunk)(tangents)
            out += torch.cat([hv[n].reshape(V.shape[0], -1) for n in self.names], dim=1)
        self._count(V.shape[0])
        return out.detach()

    def _choose_engine(self, V: torch.Tensor) -> torch.Tensor:
        """``auto`` on a GPU: the first product(s) through both engines; keep the faster.

        Returns the double-backward rows (both are ``H V``; they agree to rounding).
        """
        self._sync()
        t0 = time.perf_counter()
        out = torch.stack([self._dbl_matvec(v) for v in V])
        self._sync()
        t1 = time.perf_counter()
        try:
            self._fr_matmat(V)
            self._sync()
            fr = time.perf_counter() - t1
        except (RuntimeError, NotImplementedError, ValueError):  # a model torch.func cannot transform
            fr = float("inf")
        self.engine = "forward-over-reverse" if fr < t1 - t0 else "double-backward"
        if self.engine == "forward-over-reverse":
            self._graphs = None  # the cached graph is no longer needed; free its memory
        return out

    def _batched(self, V: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(V)
        self._set_mode()
        with torch.enable_grad():
            for g in self._iter_graphs():
                out += self._vjp(g, V, batched=True)
        self._count(V.shape[0])
        return out.detach()

    @full_precision
    @with_differentiable_attention
    def matmat(self, V: torch.Tensor, batched: bool | None = None) -> torch.Tensor:
        """Rows ``H v_i`` for ``V`` of shape ``(k, dim)``.

        ``batched=None`` measures once which is faster for this model — one vectorised
        backward over all k probes (``is_grads_batched``) or a loop of single products —
        and keeps the winner (vectorising pays for small models, a loop for big CNNs); the
        choice is remembered for the process per architecture, sizes, device and mode.
        """
        V = V.to(device=self.device, dtype=self.dtype)
        if self.engine is None:
            return self._choose_engine(V)
        if self.engine == "forward-over-reverse":
            return torch.cat([self._fr_matmat(c) for c in torch.split(V, 64)])
        if batched is None and self._batched_ok is None:
            self._batched_ok = _BATCHED_CHOICE.get(self._shape_key())
        use = self._batched_ok if batched is None else batched
        if use is None and V.shape[0] >= 2:
            half = min(2, V.shape[0] // 2)  # a short trial: batching can be several times slower
            self._sync()
            t0 = time.perf_counter()
            try:
                first = self._batched(V[:half])
            except (RuntimeError, NotImplementedError):
                self._batched_ok = False
                return torch.stack([self._dbl_matvec(v) for v in V])
            self._sync()  # CUDA kernels run asynchronously: time them only once they finished
            t1 = time.perf_counter()
            rest = torch.stack([self._dbl_matvec(v) for v in V[half:]])
            self._sync()
            t2 = time.perf_counter()
            self._batched_ok = (t1 - t0) / half < (t2 - t1) / (V.shape[0] - half)
            _BATCHED_CHOICE[self._shape_key()] = self._batched_ok
            return torch.cat([first, rest])
        if use:
            return self._batched(V)
        return torch.stack([self._dbl_matvec(v) for v in V])

    def _shape_key(self) -> tuple[Any, ...]:
        """What the batched-vs-loop timing depends on: architecture, sizes, device, dtype, mode."""
        return (type(self.model).__qualname__, tuple(self.shapes), tuple(len(yb) for _, yb in self.data.batches),
                tuple(self.data.batches[0][0].shape[1:]), str(self.device), self.dtype, self.mode)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def unflatten(self, v: torch.Tensor) -> dict[str, torch.Tensor]:
        """A flat vector as a dict of parameter-shaped tensors."""
        parts = torch.split(v, self.sizes)
        return {n: p.reshape(s) for n, p, s in zip(self.names, parts, self.shapes, strict=True)}

    def flat_params(self) -> torch.Tensor:
        """The current parameter values as one flat vector."""
        return torch.cat([p.detach().reshape(-1) for p in self.params.values()])

    def _count(self, k: int) -> None:
        self.n_hvp += k
        if self.on_products is not None:
            self.on_products(k)

    def release(self) -> None:
        """Free the cached graphs."""
        self._graphs = None
