"""GradSign (Zhang & Jia, ICLR 2022): agreement of per-sample gradient signs at initialisation.

τ = Σ_k |Σ_i sign(∂ℓ(f(x_i), y_i)/∂θ_k)| over one minibatch, where θ are the weights of
the Conv and Linear layers (no biases, no BatchNorm parameters), ℓ is cross-entropy,
sign(0) = 0 and a missing gradient counts as zero. BatchNorm stays in train mode, so each
sample is normalised with its own statistics, as in the reference's batch-of-one loop.

Three implementations with the same integer score:

- ``method="loop"``: the reference — one forward/backward per sample;
- ``method="vmap"``: ``torch.func.vmap(grad(...))`` on a copy whose BatchNorms use batch
  statistics (``replace_all_batch_norm_modules_``), in chunks of samples whose sign sums
  are accumulated, so memory stays O(parameters × chunk);
- ``method="fast"`` (default): one batched forward and input-only backward per chunk with
  per-sample BatchNorm statistics, then per-sample weight gradients as batched matmuls
  (:mod:`nndiag.zerocost._persample`); falls back to ``vmap`` for layers it does not
  cover (Conv3d, string or non-zero padding modes).

The copy runs in train mode, as in the reference; a model with dropout therefore gets
random masks, and its loop and fast scores differ by that randomness.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from nndiag._utils.precision import full_precision
from nndiag.errors import AnalysisError, InputError
from nndiag.zerocost._common import check_batch, scored_weights, working_copy

Method = Literal["fast", "vmap", "loop"]
Reduction = Literal["sum", "mean"]

#: Per-sample gradient memory allowed per chunk of the fast path (bytes).
DEFAULT_CHUNK_BYTES = 256 * 2**20


@dataclass(frozen=True)
class GradSignDetail:
    """GradSign with its ingredients.

    Attributes
    ----------
    score : float
        τ (``reduction="sum"``) or τ / (n_params · n_samples) (``"mean"``).
    tau : int
        The integer score Σ_k |Σ_i sign(g_ik)|.
    n_params : int
        Number of scored weights.
    n_samples : int
        Batch size.
    zero_fraction : float
        Fraction of scored weights whose gradient is zero for every sample.
    per_layer : dict of str to int
        τ restricted to each layer's weight.
    """

    score: float
    tau: int
    n_params: int
    n_samples: int
    zero_fraction: float
    per_layer: dict[str, int]


def _loss_fn(loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None):
    return loss if loss is not None else nn.functional.cross_entropy


def _sign_sums_loop(net: nn.Module, names: list[str], x: torch.Tensor, y: torch.Tensor,
                    loss_fn) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    params = dict(net.named_parameters())
    weights = [params[n] for n in names]
    sums = [torch.zeros_like(w, dtype=torch.float32) for w in weights]
    nz = [torch.zeros_like(w, dtype=torch.bool) for w in weights]
    for i in range(x.shape[0]):
        net.zero_grad(set_to_none=True)
        out = net(x[i:i + 1])
        loss_fn(out, y[i:i + 1]).backward()
        for s, z, w in zip(sums, nz, weights, strict=True):
            if w.grad is None:
                continue
            g = w.grad
            if torch.isnan(g).any():
                raise AnalysisError("GradSign: NaN gradients")
            s += torch.sign(g).float()
            z |= g != 0
    return sums, nz


def _sign_sums_fast(net: nn.Module, names: list[str], x: torch.Tensor, y: torch.Tensor,
                    loss_fn, chunk_size: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    from torch.func import functional_call, grad, replace_all_batch_norm_modules_, vmap

    replace_all_batch_norm_modules_(net)
    params = {n: p.detach() for n, p in net.named_parameters()}
    buffers = {n: b.detach() for n, b in net.named_buffers()}
    fixed = {n: p for n, p in params.items() if n not in set(names)}
    weights = {n: params[n] for n in names}

    def sample_loss(w: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        out = functional_call(net, ({**fixed, **w}, buffers), (xi.unsqueeze(0),))
        return loss_fn(out, yi.unsqueeze(0))

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0), randomness="different")
    sums = [torch.zeros_like(weights[n], dtype=torch.float32) for n in names]
    nz = [torch.zeros_like(weights[n], dtype=torch.bool) for n in names]
    for start in range(0, x.shape[0], chunk_size):
        g = per_sample(weights, x[start:start + chunk_size], y[start:start + chunk_size])
        for s, z, n in zip(sums, nz, names, strict=True):
            gn = g[n]
            if torch.isnan(gn).any():
                raise AnalysisError("GradSign: NaN gradients")
            s += torch.sign(gn).sum(0, dtype=torch.float32)
            z |= (gn != 0).any(0)
        del g
    return sums, nz


def _sign_sums_batched(net: nn.Module, names: list[str], x: torch.Tensor, y: torch.Tensor,
                       loss_fn, chunk_size: int,
                       track_zero: bool = True) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    from nndiag.zerocost import _persample

    modules = dict(net.named_modules())
    layers = [modules[n.removesuffix("weight").removesuffix(".")] for n in names]
    _persample.per_sample_norms(net)
    _persample.fast_pools(net)
    sums = [torch.zeros_like(m.weight, dtype=torch.float32) for m in layers]
    nz = [torch.zeros_like(m.weight, dtype=torch.bool) for m in layers]
    for start in range(0, x.shape[0], chunk_size):
        parts = _persample.per_sample_sign_sums(net, layers, x[start:start + chunk_size],
                                                y[start:start + chunk_size], loss_fn, track_zero)
        for s, z, (si, zi) in zip(sums, nz, parts, strict=True):
            if si is not None:
                s += si
            if zi is not None:
                z |= zi
    return sums, nz


def auto_chunk_size(n_params: int, budget_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Samples per chunk so that per-sample gradients of ``n_params`` floats fit the budget."""
    return max(1, int(budget_bytes // max(1, 4 * n_params)))


@full_precision
def gradsign_detail(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    method: Method = "fast",
    reduction: Reduction = "sum",
    chunk_size: int | None = None,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    dtype: torch.dtype | None = None,
    track_zero: bool = True,
) -> GradSignDetail:
    """GradSign of ``model`` on one batch, with per-layer values. See :func:`gradsign`.

    ``track_zero=False`` skips counting the weights with an all-zero gradient (slightly
    faster; ``zero_fraction`` is then NaN for the fast path).
    """
    check_batch(x, y, what="GradSign")
    if method not in ("fast", "vmap", "loop"):
        raise InputError(f"GradSign method must be 'fast', 'vmap' or 'loop', got {method!r}")
    if reduction not in ("sum", "mean"):
        raise InputError(f"GradSign reduction must be 'sum' or 'mean', got {reduction!r}")
    if chunk_size is not None and chunk_size < 1:
        raise InputError(f"GradSign chunk_size must be >= 1, got {chunk_size}")
    layers = scored_weights(model)
    net = working_copy(model, train=True, dtype=dtype)
    names = [f"{n}.weight" if n else "weight" for n, _ in scored_weights(net)]
    n_params = sum(m.weight.numel() for _, m in layers)
    dev = next(net.parameters()).device
    from nndiag.io.data import model_inputs

    x, y = model_inputs(net, x, device=dev, dtype=next(net.parameters()).dtype), y.to(dev)
    fn = _loss_fn(loss)
    if method == "loop":
        sums, nz = _sign_sums_loop(net, names, x, y, fn)
    else:
        from nndiag.zerocost._persample import supports

        size = chunk_size or auto_chunk_size(n_params)
        modules = dict(net.named_modules())
        scored = [modules[n.removesuffix("weight").removesuffix(".")] for n in names]
        # the fast path backpropagates to the input: token ids (integers) cannot carry a gradient
        if method == "fast" and x.is_floating_point() and supports(net, scored):
            sums, nz = _sign_sums_batched(net, names, x, y, fn, size, track_zero)
        else:
            sums, nz = _sign_sums_fast(net, names, x, y, fn, size)
    per_layer = {n.removesuffix(".weight"): int(s.abs().sum().item()) for n, s in zip(names, sums, strict=True)}
    tau = sum(per_layer.values())
    n = int(x.shape[0])
    zero_fraction = math.nan
    if track_zero or method != "fast":
        zero_fraction = sum(int((~z).sum().item()) for z in nz) / n_params
    score = float(tau) if reduction == "sum" else tau / (n_params * n)
    return GradSignDetail(score=score, tau=tau, n_params=n_params, n_samples=n,
                          zero_fraction=zero_fraction, per_layer=per_layer)


def gradsign(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    method: Method = "fast",
    reduction: Reduction = "sum",
    chunk_size: int | None = None,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    dtype: torch.dtype | None = None,
) -> float:
    """GradSign score of ``model`` on the batch ``(x, y)``; higher predicts better accuracy.

    Parameters
    ----------
    model : nn.Module
        The network, scored at its current weights (use a freshly initialised one for
        the at-initialisation score). It is not modified: a copy is scored.
    x, y : torch.Tensor
        One batch (at least 2 samples) and its integer labels.
    method : {"fast", "vmap", "loop"}
        Batched per-sample gradients in chunks (default), ``torch.func.vmap`` per-sample
        gradients in chunks, or the reference per-sample loop; the same integer τ.
    reduction : {"sum", "mean"}
        ``sum``: τ; ``mean``: τ / (parameters × samples), a size-free agreement in [0, 1].
    chunk_size : int, optional
        Samples per chunk of the fast/vmap paths (default: as many as fit in 256 MiB of
        per-sample gradients).
    loss : callable, optional
        ``loss(logits, labels)``, a mean over the batch; cross-entropy by default.
    dtype : torch.dtype, optional
        Compute in this precision (e.g. ``torch.float64``) on the copy; default: the
        model's. In float32, per-sample gradient entries within rounding of zero can take
        either sign depending on kernel choices, so on deep BatchNorm networks the loop
        and the fast path may differ in a few units out of millions; in float64 they agree.

    Returns
    -------
    float
        The score.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    >>> x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    >>> gradsign(net, x, y) == gradsign(net, x, y, method="loop")
    True
    """
    return gradsign_detail(model, x, y, method=method, reduction=reduction, chunk_size=chunk_size,
                           loss=loss, dtype=dtype, track_zero=False).score
