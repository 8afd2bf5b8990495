"""Dense references for the landscape tests: tiny models and their exact Hessians."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from nndiag._utils.threads import limit_threads


def tiny_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 4))


def tiny_cnn(seed: int = 0, bn: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Conv2d(1, 3, 3, padding=1)]
    if bn:
        layers.append(nn.BatchNorm2d(3))
    layers += [nn.Tanh(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(3 * 4 * 4, 4)]
    return nn.Sequential(*layers)


def tiny_data(kind: str, n: int = 48, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g) if kind == "mlp" else torch.randn(n, 1, 8, 8, generator=g)
    y = torch.randint(0, 4, (n,), generator=g)
    return x, y


def tiny_embedding(seed: int = 0, vocab: int = 11, length: int = 3, classes: int = 4) -> nn.Module:
    """A token classifier: integer ids → embedding → linear (its input must stay int64)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Embedding(vocab, 4), nn.Tanh(), nn.Flatten(), nn.Linear(4 * length, classes))


def token_data(n: int = 48, seed: int = 1, vocab: int = 11, length: int = 3,
               classes: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer token ids ``(n, length)`` in ``[0, vocab)`` and labels in ``[0, classes)``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, length), generator=g), torch.randint(0, classes, (n,), generator=g)


def dense_hessian(model: nn.Module, x: torch.Tensor, y: torch.Tensor, train: bool = False) -> np.ndarray:
    """The exact float64 Hessian of mean cross-entropy over the trainable parameters."""
    named = {k: p for k, p in model.named_parameters() if p.requires_grad}
    names = list(named)
    shapes = [p.shape for p in named.values()]
    sizes = [p.numel() for p in named.values()]
    flat0 = torch.cat([p.detach().double().reshape(-1) for p in named.values()])
    buffers = {k: b.detach().clone().double() if b.is_floating_point() else b.detach().clone()
               for k, b in model.named_buffers()}
    was = model.training
    model.train(train)

    def f(flat: torch.Tensor) -> torch.Tensor:
        parts = torch.split(flat, sizes)
        d = {n: p.reshape(s) for n, p, s in zip(names, parts, shapes, strict=True)}
        bufs = {k: v.clone() for k, v in buffers.items()}
        xd = x.double() if x.is_floating_point() else x  # token ids stay integers
        return F.cross_entropy(functional_call(model, {**bufs, **d}, (xd,)), y)

    with limit_threads(1):
        H = torch.autograd.functional.hessian(f, flat0)
    model.train(was)
    return H.numpy()
