"""Pieces shared by the zero-cost proxies: input checks, weight selection, model copies."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from nndiag.errors import AnalysisError, InputError

#: Layers whose ``.weight`` the gradient-based proxies score.
SCORED_LAYERS: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def check_batch(x: torch.Tensor, y: torch.Tensor | None = None, *, min_size: int = 2,
                what: str = "this proxy") -> None:
    """Raise :class:`InputError` unless ``x`` (and ``y``) form a batch of at least ``min_size``."""
    if not isinstance(x, torch.Tensor) or x.ndim < 1:
        raise InputError(f"{what}: x must be a tensor with a batch axis")
    if x.shape[0] < min_size:
        raise InputError(f"{what} needs a batch of at least {min_size} samples, got {x.shape[0]}")
    if y is not None and (y.ndim != 1 or y.shape[0] != x.shape[0]):
        raise InputError(f"{what}: y must be 1-D with one label per sample "
                         f"(x has {x.shape[0]}, y has shape {tuple(y.shape)})")
    if not torch.isfinite(x).all():
        raise InputError(f"{what}: x contains NaN or Inf")


def scored_weights(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` of every Conv/Linear layer with a weight, in module order.

    Raises
    ------
    AnalysisError
        When the model has none.
    """
    layers = [(n, m) for n, m in model.named_modules()
              if isinstance(m, SCORED_LAYERS) and isinstance(getattr(m, "weight", None), torch.Tensor)]
    if not layers:
        raise AnalysisError(f"{type(model).__name__} has no Conv or Linear weights to score")
    return layers


def working_copy(model: nn.Module, *, train: bool = True, dtype: torch.dtype | None = None) -> nn.Module:
    """A deep copy of ``model`` with gradients enabled and no grads, in train or eval mode,
    whose output is the tensor of logits (:func:`nndiag.landscape._setup.logits_of`).

    The user's model is never touched: every proxy works on such a copy.
    """
    try:
        net = copy.deepcopy(model)
    except Exception as exc:  # e.g. modules holding non-copyable handles
        raise AnalysisError(f"cannot copy {type(model).__name__} to score it: {exc}") from exc
    # hooks of the user's model are not part of the scored function
    for m in net.modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                     "_backward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                     "_forward_pre_hooks_with_kwargs"):
            d = getattr(m, attr, None)
            if isinstance(d, dict):
                d.clear()
    # outputs as a classifier's logits: a dict's or ModelOutput's ``logits``, a tuple's first
    # element (the rule of every nndiag analysis; the copy's own hook, not the user's model)
    from nndiag.landscape._setup import logits_of

    net.register_forward_hook(lambda _m, _i, out: logits_of(out))
    if dtype is not None:
        net = net.to(dtype)
    for p in net.parameters():
        p.requires_grad_(True)
        p.grad = None
    net.train(train)
    return net


def check_finite(value: float, what: str) -> float:
    """Raise :class:`AnalysisError` when a score is NaN (Inf is kept: it carries rank)."""
    if value != value:
        raise AnalysisError(f"{what}: NaN gradients or activations")
    return value


def default_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy."""
    return nn.functional.cross_entropy(out, y)
