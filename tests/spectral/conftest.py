"""Spectral tests run single-threaded (the CI machine has 2 cores shared with other jobs); the
``ww`` fixture gives WeightWatcher 0.7.7 for parity tests."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    from threadpoolctl import threadpool_limits

    monkeypatch.setenv("NNDIAG_THREADS", "1")
    with threadpool_limits(limits=1):
        yield


@pytest.fixture(scope="session")
def ww():
    """weightwatcher, imported without letting it change logging/warnings for the suite."""
    if torch.cuda.is_available():
        # seen on an H100: at import WW 0.7.7 swaps in float32 GPU SVDs and half-precision
        # eigenvalue thresholds (EVALS_HALF_THRESH), so its results depend on whether a GPU
        # is present; parity is defined against its CPU path
        pytest.skip("WeightWatcher 0.7.7 changes its numerics when CUDA is present")
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    filters = list(warnings.filters)
    try:
        mod = pytest.importorskip("weightwatcher")
    finally:
        root.setLevel(level)
        root.handlers[:] = handlers
        warnings.filters[:] = filters
        warnings._filters_mutated()  # type: ignore[attr-defined]
    if mod.__version__ != "0.7.7":
        pytest.skip(f"parity is pinned to weightwatcher 0.7.7, found {mod.__version__}")
    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    return mod
