"""The common shape of every slice-discovery method's output.

A method fits on embeddings (and losses, labels, predictions) and returns a
:class:`Slices`: one membership weight in [0, 1] per (slice, example) on the data it was
fitted on, a flag per slice saying whether it failed, and a ``scorer`` that computes
the same weights on new data (fit on one split, score on another).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from nndiag.errors import InputError


@dataclass(frozen=True)
class Slices:
    """Slices found by one method.

    Attributes
    ----------
    method : str
        ``spotlight``, ``loss_rank``, ``gmm`` or ``domino``.
    weights : ndarray, shape (k, N)
        Membership weight of each example in each slice (fit data), in [0, 1].
    support : ndarray of bool, shape (k, N)
        Examples counted as members (e.g. the spotlight's kernel support).
    failed : tuple of bool
        Per slice: the method could not honour the size (e.g. a collapsed spotlight).
    scorer : callable
        ``scorer(embeddings) -> (weights, support)`` on new data.
    params : dict
        Parameters of the fit (JSON-safe).
    info : list of dict
        Per-slice diagnostics (total weight, objective, learning rate, restart...).
    """

    method: str
    weights: np.ndarray
    support: np.ndarray
    failed: tuple[bool, ...]
    scorer: Callable[[Any], tuple[np.ndarray, np.ndarray]]
    params: dict[str, Any] = field(default_factory=dict)
    info: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.weights.shape[0])

    def score(self, embeddings: Any) -> tuple[np.ndarray, np.ndarray]:
        """Weights and support of every slice on new embeddings."""
        return self.scorer(embeddings)


def resolve_size(size: float, n: int) -> float:
    """A spotlight size given as a fraction (< 1) or a count, as a count of examples.

    Raises
    ------
    InputError
        Non-positive size, or not fewer than the number of examples.
    """
    if not np.isfinite(size) or size <= 0:
        raise InputError(f"size must be a positive fraction (< 1) or count, got {size}")
    s = float(size) * n if size < 1 else float(size)
    if s < 1:
        raise InputError(f"size {size} of {n} examples is less than one example; use a larger size")
    if s >= n:
        raise InputError(f"size {s:g} needs more than the {n} examples given; use a smaller size "
                         "or more data")
    return s


def check_losses(losses: np.ndarray) -> float:
    """The loss range; raises when the losses are constant (nothing to find)."""
    rng = float(np.max(losses) - np.min(losses))
    if not rng > 1e-12 * max(1.0, float(np.max(np.abs(losses)))):
        raise InputError(f"the losses are constant ({float(losses[0]):.4g} for every example): "
                         "there is no high-loss region to find")
    return rng
