"""Spectral tests run single-threaded: the CI machine has 2 cores shared with other jobs."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    from threadpoolctl import threadpool_limits

    monkeypatch.setenv("NNDIAG_THREADS", "1")
    with threadpool_limits(limits=1):
        yield
