"""A small, deterministic training loop for the demo, tests, zoos and benchmarks."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nndiag._utils.progress import progress_bar
from nndiag.io.data import DataBundle, model_inputs
from nndiag.landscape._setup import logits_of


@dataclass(frozen=True)
class TrainLog:
    """Per-epoch training loss and the final train accuracy."""

    losses: list[float]
    train_accuracy: float
    steps: int


def train_classifier(
    model: nn.Module,
    data: DataBundle,
    *,
    epochs: int = 10,
    batch_size: int = 64,
    lr: float = 0.05,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    optimizer: str = "sgd",
    max_steps: int | None = None,
    seed: int = 0,
    progress: bool | None = None,
    description: str = "training",
) -> TrainLog:
    """Train ``model`` in place with cross-entropy; deterministic given ``seed``.

    Parameters
    ----------
    model : nn.Module
        The network (trained in place, left in eval mode).
    data : DataBundle
        Training data.
    epochs, batch_size, lr, momentum, weight_decay : training hyper-parameters.
    optimizer : {"sgd", "adam"}
    max_steps : int, optional
        Stop after this many optimiser steps.
    seed : int
        Seeds the shuffling.
    progress : bool, optional
        Show a progress bar (default: when stderr is a terminal).

    Returns
    -------
    TrainLog
    """
    x = model_inputs(model, data.x, name=data.name)
    g = torch.Generator().manual_seed(seed)
    if optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    n = len(data)
    per_epoch = (n + batch_size - 1) // batch_size
    total = per_epoch * epochs if max_steps is None else min(max_steps, per_epoch * epochs)
    losses: list[float] = []
    steps = 0
    model.train()
    with progress_bar(total, description, enabled=progress) as bar:
        for _ in range(epochs):
            perm = torch.randperm(n, generator=g)
            running, count = 0.0, 0
            for i in range(0, n, batch_size):
                if max_steps is not None and steps >= max_steps:
                    break
                idx = perm[i:i + batch_size]
                xb, yb = x[idx], data.y[idx]
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(logits_of(model(xb)), yb)
                loss.backward()
                opt.step()
                running += loss.item() * len(idx)
                count += len(idx)
                steps += 1
                bar.advance()
            if count:
                losses.append(running / count)
            if max_steps is not None and steps >= max_steps:
                break
    model.eval()
    opt.zero_grad(set_to_none=True)
    return TrainLog(losses, accuracy(model, data), steps)


@torch.no_grad()
def accuracy(model: nn.Module, data: DataBundle, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``model`` (in its current mode) on ``data``."""
    x, correct = model_inputs(model, data.x, name=data.name), 0
    for i in range(0, len(data), batch_size):
        correct += int((model(x[i:i + batch_size]).argmax(1) == data.y[i:i + batch_size]).sum())
    return correct / max(1, len(data))


@torch.no_grad()
def evaluate(model: nn.Module, data: DataBundle, batch_size: int = 512) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` in its current mode."""
    x, total, correct = model_inputs(model, data.x, name=data.name), 0.0, 0
    for i in range(0, len(data), batch_size):
        xb, yb = x[i:i + batch_size], data.y[i:i + batch_size]
        out = logits_of(model(xb))
        total += float(F.cross_entropy(out, yb, reduction="sum"))
        correct += int((out.argmax(1) == yb).sum())
    n = max(1, len(data))
    return total / n, correct / n
