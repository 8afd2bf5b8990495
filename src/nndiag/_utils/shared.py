"""Locate the shared offline assets (../shared or ``NNDIAG_SHARED``).

Tests and benchmarks use these; nndiag itself never needs them.
"""

from __future__ import annotations

import os
from pathlib import Path


def shared_dir() -> Path | None:
    """The shared assets folder, or None when it is absent."""
    env = os.environ.get("NNDIAG_SHARED")
    candidates = [Path(env)] if env else []
    here = Path(__file__).resolve()
    candidates += [p.parent / "shared" for p in here.parents]
    candidates.append(Path.cwd().parent / "shared")
    for c in candidates:
        if (c / "ASSETS.md").is_file():
            return c
    return None


def shared_path(*parts: str) -> Path | None:
    """A path inside the shared folder if it exists, else None."""
    base = shared_dir()
    if base is None:
        return None
    p = base.joinpath(*parts)
    return p if p.exists() else None
