"""One BLAS/torch thread for every diagnosis test (the CI machine has two shared cores)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _one_thread():
    from nndiag._utils.threads import limit_threads

    with limit_threads(1):
        yield
