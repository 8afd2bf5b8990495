"""Run ``nndiag.demo`` once per test session and share its output folder.

Both the end-to-end demo test and the browser test read the demo's report; the demo
(train four small CNNs and diagnose two of them) runs only once.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DemoRun:
    out: Path
    exit_code: int
    stdout: str
    seconds: float


@functools.lru_cache(maxsize=1)
def demo_run() -> DemoRun:
    """The demo's output folder, exit code and printed text (computed once)."""
    from nndiag.demo import main

    out = Path(tempfile.mkdtemp(prefix="nndiag-demo-test-")) / "nndiag-demo"
    buf = io.StringIO()
    t0 = time.perf_counter()
    old = os.environ.get("NNDIAG_PROGRESS")
    os.environ["NNDIAG_PROGRESS"] = "0"
    try:
        with contextlib.redirect_stdout(buf):
            code = main(str(out))
    finally:
        if old is None:
            os.environ.pop("NNDIAG_PROGRESS", None)
        else:
            os.environ["NNDIAG_PROGRESS"] = old
    return DemoRun(out, code, buf.getvalue(), time.perf_counter() - t0)
