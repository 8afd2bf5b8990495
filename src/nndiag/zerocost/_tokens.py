"""Token-id inputs for the proxies that need a continuous input (synflow, jacob_cov, zen).

A model that reads integer ids through an embedding layer has no gradient with respect
to its input, and no all-ones or Gaussian input either. For such a model these proxies
start where the network becomes continuous: at the output of the embedding layer that
reads the ids (:func:`nndiag.io.data.index_layer`). The layer still runs on the ids; a
forward hook replaces what it returns:

- ``synflow``: the all-ones input of the one-hot view of the ids, ``1ᵀ|E|`` (the column
  sums of the absolute embedding table) at every position, so the embedding is the
  network's first linear map, as it is in the path norm SynFlow measures;
- ``jacob_cov``: the embeddings themselves, as a leaf whose gradient is the Jacobian;
- ``zen``: Gaussian "inputs" of the embedding's output shape.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn


def id_reader(net: nn.Module, x: torch.Tensor) -> nn.Embedding | nn.EmbeddingBag | None:
    """The embedding layer of ``net`` that reads ``x`` as token ids, or None for numeric ``x``."""
    from nndiag.io.data import index_layer

    found = index_layer(net, x)
    return None if found is None else found[1]


@contextmanager
def replaced_output(layer: nn.Module, make: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """While inside, ``layer`` returns ``make(its output)`` instead of its output."""
    handle = layer.register_forward_hook(lambda _m, _i, out: make(out))
    try:
        yield
    finally:
        handle.remove()


def ones_embedding(layer: nn.Embedding | nn.EmbeddingBag) -> Callable[[torch.Tensor], torch.Tensor]:
    """SynFlow's all-ones input through ``layer``: ``1ᵀE`` (E already made non-negative)
    at every position, differentiable in ``E``."""
    return lambda out: layer.weight.sum(0).expand_as(out)


class LiftedEmbedding:
    """The embeddings as a leaf that requires grad (:attr:`leaf` after the forward pass)."""

    def __init__(self) -> None:
        self.leaf: torch.Tensor | None = None

    def __call__(self, out: torch.Tensor) -> torch.Tensor:
        self.leaf = out.detach().requires_grad_(True)
        return self.leaf


class GaussianEmbedding:
    """Zen-score's two inputs at the embedding: ``z`` on the first pass, ``z + mixup·ε``
    on the second, both drawn (``z`` then ``ε``) from ``generator`` on the first pass."""

    def __init__(self, generator: torch.Generator, mixup: float) -> None:
        self.generator, self.mixup = generator, mixup
        self.z: torch.Tensor | None = None
        self.eps: torch.Tensor | None = None

    def __call__(self, out: torch.Tensor) -> torch.Tensor:
        if self.z is None or self.eps is None:
            self.z = torch.randn(out.shape, generator=self.generator).to(out.device, out.dtype)
            self.eps = torch.randn(out.shape, generator=self.generator).to(out.device, out.dtype)
            return self.z
        return self.z + self.mixup * self.eps
