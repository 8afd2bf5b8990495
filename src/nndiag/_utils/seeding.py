"""Local random generators: nndiag never touches the global RNG state."""

from __future__ import annotations

import numpy as np
import torch


def torch_generator(seed: int | None, device: str | torch.device = "cpu") -> torch.Generator:
    """A fresh ``torch.Generator`` seeded with ``seed`` (0 when None)."""
    g = torch.Generator(device=device)
    g.manual_seed(0 if seed is None else int(seed))
    return g


def numpy_generator(seed: int | None) -> np.random.Generator:
    """A fresh ``numpy.random.Generator`` seeded with ``seed`` (0 when None)."""
    return np.random.default_rng(0 if seed is None else int(seed))


class fork_rng:  # noqa: N801 - context-manager used like a function
    """Run a block with torch's global RNG forked, so code that must use it
    (e.g. ``nn.Module`` initialisation) leaves the caller's stream untouched.

    Examples
    --------
    >>> with fork_rng(0):
    ...     x = torch.rand(1)
    """

    def __init__(self, seed: int | None) -> None:
        self.seed = seed
        self._ctx = torch.random.fork_rng(devices=[])

    def __enter__(self) -> None:
        self._ctx.__enter__()
        torch.manual_seed(0 if self.seed is None else int(self.seed))

    def __exit__(self, *exc: object) -> None:
        self._ctx.__exit__(*exc)
