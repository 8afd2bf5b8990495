"""Landscape tests run single-threaded: the CI machine has 2 cores shared by the suite."""

from __future__ import annotations

import pytest

from nndiag._utils.threads import limit_threads


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    monkeypatch.setenv("NNDIAG_THREADS", "1")
    with limit_threads(1):
        yield
