"""Shared set-up for the Hessian and landscape analyses: data, loss, parameters, checks.

Everything here works on *copies* of the user's parameters and buffers, so the model
itself is never edited; :func:`nndiag._utils.model_state.preserved` guards the rest
(mode, flags, grads, hooks).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nndiag.errors import AnalysisError, DataError, InputError

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
MODES = ("eval", "train")


@contextlib.contextmanager
def differentiable_attention() -> Iterator[None]:
    """Scaled-dot-product attention through PyTorch's math kernel inside the block.

    The fused kernels (flash and memory-efficient attention, on CUDA and on the CPU) have no
    derivative of their backward and no forward-mode rule (pytorch/pytorch#116350), so a
    Hessian-vector product through a transformer that uses ``F.scaled_dot_product_attention``
    (every Hugging Face model by default) fails with "derivative for
    aten::_scaled_dot_product_..._backward is not implemented". The math kernel is the same
    function written in differentiable operations.
    """
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - torch < 2.3
        yield
        return
    with sdpa_kernel([SDPBackend.MATH]):
        yield


def with_differentiable_attention(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``fn`` inside :func:`differentiable_attention`."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with differentiable_attention():
            return fn(*args, **kwargs)

    return wrapper


def logits_of(out: Any) -> torch.Tensor:
    """The logits in a model's output: the tensor itself, a Hugging Face ``ModelOutput``'s
    (or a dict's) ``logits``, else its (or a tuple's) first element."""
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, dict):
        logits = out.get("logits")
    if logits is None and hasattr(out, "to_tuple"):  # a ModelOutput without logits: its first field
        fields = out.to_tuple()
        logits = fields[0] if fields else None
    if logits is None and isinstance(out, (tuple, list)) and out:
        logits = out[0]
    if not isinstance(logits, torch.Tensor):
        raise AnalysisError(f"the model returned {type(out).__name__}; the loss needs a tensor of logits "
                            "(or an output with .logits)")
    return logits


def default_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy, the default loss of every Hessian/landscape analysis (logits as
    :func:`logits_of` finds them)."""
    return F.cross_entropy(logits_of(logits), y)


def lm_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of a causal language model.

    Parameters
    ----------
    logits : Tensor or model output
        ``(batch, T, vocabulary)`` (as :func:`logits_of` finds them).
    tokens : Tensor
        The input token ids ``(batch, T)``: position ``t`` predicts token ``t + 1``, so the
        data are ``(x, x)`` (``nndiag`` token files: an ``.npz`` with ``x`` alone).

    Returns
    -------
    Tensor
        The mean over the ``batch · (T − 1)`` predicted tokens (equal-length sequences, so
        batches weighted by their number of sequences give the mean over all tokens).
    """
    z = logits_of(logits)
    if z.ndim != 3 or tokens.ndim != 2 or tuple(z.shape[:2]) != tuple(tokens.shape):
        raise DataError(f"the next-token loss needs (batch, T, vocabulary) logits for (batch, T) token ids; "
                        f"got {tuple(z.shape)} and {tuple(tokens.shape)}")
    if tokens.shape[1] < 2:
        raise DataError("the next-token loss needs sequences of at least 2 tokens")
    return F.cross_entropy(z[:, :-1].reshape(-1, z.shape[-1]), tokens[:, 1:].reshape(-1))


#: Losses by the names the command line takes.
LOSSES: dict[str, LossFn] = {"ce": default_loss, "lm": lm_loss}


#: Tokens per pass the ``diagnose`` probes (Hessian, landscape) use on token sequences unless
#: told otherwise: 256 sequences of 512 tokens would make every Hessian-vector product of even
#: a small GPT-2 a minute on a CPU (a 4.4M-parameter one took ~2 s per product on 64×64 tokens).
PROBE_TOKENS = 4096


def probe_samples(n: int | None, data: Any, given: bool) -> int | None:
    """Examples a ``diagnose`` probe takes: ``n`` (None = all), all when ``n`` exceeds the data,
    and on token sequences at most :data:`PROBE_TOKENS` tokens unless ``n`` was ``given``."""
    if data is None or not n:
        return n
    meta = getattr(data, "meta", None) or {}
    if not given and meta.get("tokens"):
        n = max(1, min(n, PROBE_TOKENS // max(1, int(data.x.shape[1]))))
    return None if n > len(data) else n


#: Classes up to which :func:`cpu_cross_entropy` normalises along the batch axis.
FEW_CLASSES = 32


def cpu_cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """:func:`default_loss` for forward-only CPU passes, the same values, faster for few classes.

    PyTorch's CPU ``log_softmax`` over a short last axis (10 classes) took ~165 ns per row
    (84 µs for 512×10 logits, one thread, torch 2.13), more than the linear layer before
    it in a small MLP; over the first axis of the transposed logits it took 23 µs. Same
    arithmetic per row (max, subtract, exp, sum, log), so the loss agrees to rounding.
    """
    logits = logits_of(logits)
    if (logits.ndim == 2 and logits.shape[1] <= FEW_CLASSES and logits.device.type == "cpu"
            and y.ndim == 1 and not y.is_floating_point()):  # class indices, not probabilities
        return F.nll_loss(F.log_softmax(logits.T, dim=0).T, y)
    return F.cross_entropy(logits, y)


@dataclass(frozen=True)
class Batches:
    """Data cut into batches, moved to the compute device and dtype.

    Attributes
    ----------
    batches : list of (x, y)
        Input and label tensors.
    weights : list of float
        ``len(batch) / n`` — the weight of each batch's mean loss in the full-data loss.
    n : int
        Number of examples.
    name : str
        Where the data came from.
    """

    batches: list[tuple[torch.Tensor, torch.Tensor]]
    weights: list[float]
    n: int
    name: str

    @property
    def batch_size(self) -> int:
        """Examples in the largest batch."""
        return max(len(yb) for _, yb in self.batches)


def resolve_mode(mode: str) -> str:
    """Validate a train/eval mode name."""
    if mode not in MODES:
        raise InputError(f"unknown mode '{mode}'; choose one of {', '.join(MODES)}")
    return mode


def make_batches(
    data: Any,
    *,
    model: nn.Module,
    n_samples: int | None,
    batch_size: int,
    seed: int,
    device: torch.device,
    dtype: torch.dtype,
) -> Batches:
    """Coerce ``data`` (DataBundle, (x, y), spec, DataLoader) to device batches for ``model``.

    Inputs go through :func:`nndiag.io.data.model_inputs`: numeric inputs take ``dtype``,
    token ids for an embedding layer stay int64.

    Raises
    ------
    DataError
        When the data cannot be used (token ids out of the embedding's range included).
    InputError
        When ``batch_size`` is not positive.
    """
    from nndiag.io.data import as_data, model_inputs

    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1, got {batch_size}")
    bundle = as_data(data, n_samples=n_samples, seed=seed)
    x = model_inputs(model, bundle.x, device=device, dtype=dtype, name=bundle.name)
    y = bundle.y.to(device)
    n = int(x.shape[0])
    out, weights = [], []
    for i in range(0, n, batch_size):
        xb, yb = x[i:i + batch_size], y[i:i + batch_size]
        out.append((xb, yb))
        weights.append(len(yb) / n)
    return Batches(out, weights, n, bundle.name)


def trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's parameters that require grad, by name (the Hessian's coordinates).

    Raises
    ------
    AnalysisError
        When no parameter requires grad.
    """
    named = {k: p for k, p in model.named_parameters() if p.requires_grad}
    if not named:
        raise AnalysisError(
            f"{type(model).__name__} has no parameters with requires_grad=True; "
            "the Hessian and the loss landscape are taken over trainable parameters"
        )
    return named


def param_copies(
    named: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Detached copies of parameters on ``device`` in ``dtype`` (leaves requiring grad)."""
    return {
        k: p.detach().to(device=device, dtype=dtype).clone().requires_grad_(True)
        for k, p in named.items()
    }


def buffer_copies(model: nn.Module, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Copies of the model's buffers and frozen parameters, so running statistics stay put.

    Floating buffers take ``dtype``; integer buffers (``num_batches_tracked``) keep theirs.
    """
    out: dict[str, torch.Tensor] = {}
    for k, b in model.named_buffers():
        t = b.detach().to(device)
        out[k] = (t.to(dtype) if t.is_floating_point() else t).clone()
    for k, p in model.named_parameters():
        if not p.requires_grad:
            out[k] = p.detach().to(device=device, dtype=dtype).clone()
    return out


def checked_loss(
    model: nn.Module,
    tensors: dict[str, torch.Tensor],
    xb: torch.Tensor,
    yb: torch.Tensor,
    loss_fn: LossFn,
    *,
    check: bool = False,
) -> torch.Tensor:
    """The loss of ``model`` with ``tensors`` swapped in (``functional_call``) on one batch.

    With ``check`` the forward error, label range and loss value are validated and
    turned into one-line nndiag errors.
    """
    from torch.func import functional_call

    if not check:
        return loss_fn(functional_call(model, tensors, (xb,), strict=False), yb)
    try:
        out = functional_call(model, tensors, (xb,), strict=False)
    except (RuntimeError, ValueError, IndexError) as exc:
        from nndiag.io.data import misfit

        raise misfit(model, xb, exc) from None
    if loss_fn in (default_loss, lm_loss):
        out = logits_of(out)  # (a loss of the user's own gets the output as the model returns it)
    if loss_fn is lm_loss and (int(yb.max()) >= out.shape[-1] or int(yb.min()) < 0):
        raise DataError(f"token ids must lie in [0, {out.shape[-1] - 1}] for a vocabulary of {out.shape[-1]} "
                        f"(found {int(yb.min())}..{int(yb.max())})")
    if loss_fn is default_loss:
        if out.ndim != 2:
            hint = " (a language model's logits: use the next-token loss, --loss lm, on token ids)" if (
                out.ndim == 3 and not xb.is_floating_point()) else ""
            raise DataError(f"model output has shape {tuple(out.shape)}; cross-entropy needs (batch, classes){hint}")
        if int(yb.max()) >= out.shape[1] or int(yb.min()) < 0:
            raise DataError(
                f"labels must lie in [0, {out.shape[1] - 1}] for a model with {out.shape[1]} outputs "
                f"(found {int(yb.min())}..{int(yb.max())})"
            )
    try:
        loss = loss_fn(out, yb)
    except (RuntimeError, ValueError, IndexError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DataError(f"the loss cannot be computed on this data: {first}") from None
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise AnalysisError("the loss must return a scalar tensor")
    if not torch.isfinite(loss):
        raise AnalysisError(f"the loss is {float(loss.detach())} on this data; the Hessian is undefined there")
    return loss.reshape(())
