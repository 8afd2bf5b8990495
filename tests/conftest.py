"""Shared test fixtures: the offline assets in ../shared (skip cleanly when absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("NNDIAG_PROGRESS", "0")
os.environ.setdefault("NNDIAG_THREADS", "2")


def shared_asset(*parts: str) -> Path:
    """Path to a shared asset, or skip the test when it is absent."""
    from nndiag._utils.shared import shared_path

    p = shared_path(*parts)
    if p is None:
        pytest.skip(f"shared asset {'/'.join(parts)} not available")
    return p


@pytest.fixture
def shared():
    """The ``shared_asset`` helper as a fixture."""
    return shared_asset
