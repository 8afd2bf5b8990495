"""Batch blocking: how many examples per forward pass keep a CPU pass fast.

A Hessian-vector product or a landscape grid point is one pass over the same fixed
examples; the loss is a size-weighted sum of batch means, so any split of the examples
gives the same value up to float rounding. On a CPU the split can change the time a lot.
The cause, measured on the 2-core development VM (glibc): an activation tensor of a large
batch is an allocation glibc serves with a fresh ``mmap`` once it exceeds its dynamic
threshold (at most 32 MiB) and unmaps again when freed, so every pass page-faults that
memory anew. ResNet20 on 512 CIFAR images (16×32×32 floats = 64 KiB per image and
layer, 32 MiB per batch) took 0.90 s per forward and 5.3 s per double-backward
Hessian-vector product whole, 0.40 s and 2.6 s in batches of 64/128. The digits CNN on
512 examples (4 MiB activations) took 2,400 minor page faults and 15.9 ms per forward whole
against none and 11.1 ms in batches of 128 in one measurement, but end to end (traces,
landscapes) gained nothing: glibc raises its threshold after the first frees of blocks that
size. Smaller batches also keep activations in cache.

So the rule is by size, not by a timing trial (which was noisy and cost more than it
saved on small models): :func:`activation_bytes` measures the largest activation per
example with one forward of two examples, and :func:`blocked_size` cuts batches so that no
single activation exceeds :data:`ACTIVATION_LIMIT`. Only for ``mode="eval"`` on a CPU: in train mode BatchNorm
normalises with batch statistics, so the batch size is part of the loss and stays the
user's choice; GPUs want large batches.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from nndiag.landscape._setup import Batches, LossFn, checked_loss

#: Largest single activation tensor of one batch, in bytes.
ACTIVATION_LIMIT = 2 << 20
#: Fewest examples per batch the rule goes down to (per-batch overhead).
MIN_BATCH = 16


def activation_bytes(model: nn.Module, tensors: dict[str, torch.Tensor], x: torch.Tensor,
                     y: torch.Tensor, loss_fn: LossFn) -> int:
    """Bytes per example of the largest tensor any submodule outputs (one checked forward
    of up to two examples; a global forward hook, removed again, so the model's own hooks
    are untouched)."""
    k = min(2, int(x.shape[0]))
    largest = 0

    def hook(_module: nn.Module, _args: object, out: object) -> None:
        nonlocal largest
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                largest = max(largest, t.numel() * t.element_size())

    handle = nn.modules.module.register_module_forward_hook(hook)
    try:
        with torch.inference_mode():
            checked_loss(model, tensors, x[:k], y[:k], loss_fn, check=True)
    finally:
        handle.remove()
    return -(-largest // k)


def blocked_size(n: int, per_example: int) -> int:
    """Examples per batch: equal batches, each activation at most :data:`ACTIVATION_LIMIT`
    (but at least :data:`MIN_BATCH` examples)."""
    cap = max(MIN_BATCH, ACTIVATION_LIMIT // max(per_example, 1))
    if n <= cap:
        return n
    return -(-n // math.ceil(n / cap))


def auto_batches(
    model: nn.Module,
    tensors: dict[str, torch.Tensor],
    batches: Batches,
    loss_fn: LossFn,
    *,
    mode: str,
    fallback: int,
) -> tuple[Batches, int | None]:
    """Re-split ``batches`` (eval mode on a CPU: by :func:`blocked_size`; otherwise at
    ``fallback`` examples). Returns the batches and the measured activation bytes per
    example (None when not measured)."""
    x, y = batches.batches[0]
    if mode != "eval" or x.device.type != "cpu":
        return split_batches(batches, fallback), None
    per = activation_bytes(model, tensors, x, y, loss_fn)
    return split_batches(batches, blocked_size(batches.n, per)), per


def split_batches(batches: Batches, size: int) -> Batches:
    """The same examples and weights in batches of at most ``size``."""
    out, weights = [], []
    for (xb, yb), w in zip(batches.batches, batches.weights, strict=True):
        n = len(yb)
        for xs, ys in zip(xb.split(size), yb.split(size), strict=True):
            out.append((xs, ys))
            weights.append(w * len(ys) / n)
    return Batches(out, weights, batches.n, batches.name)
