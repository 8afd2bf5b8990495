"""Progress bars on stderr (rich), silent when stderr is not a terminal."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any


def progress_enabled(enabled: bool | None = None) -> bool:
    """Whether to show progress: explicit flag, else ``NNDIAG_PROGRESS``, else stderr is a TTY."""
    if enabled is not None:
        return enabled
    env = os.environ.get("NNDIAG_PROGRESS")
    if env is not None:
        return env not in ("0", "false", "no", "")
    return sys.stderr.isatty()


class _Bar:
    def __init__(self, progress: Any, task: Any) -> None:
        self._p, self._t = progress, task

    def advance(self, n: float = 1, **fields: Any) -> None:
        if self._p is not None:
            self._p.update(self._t, advance=n, **fields)

    def update(self, **fields: Any) -> None:
        if self._p is not None:
            self._p.update(self._t, **fields)


@contextlib.contextmanager
def progress_bar(total: float | None, description: str, enabled: bool | None = None) -> Iterator[_Bar]:
    """A rich progress bar with elapsed and remaining time, on stderr.

    Examples
    --------
    >>> with progress_bar(3, "work", enabled=False) as bar:
    ...     for _ in range(3):
    ...         bar.advance()
    """
    if not progress_enabled(enabled):
        yield _Bar(None, None)
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    cols = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*cols, console=Console(stderr=True), transient=False) as p:
        yield _Bar(p, p.add_task(description, total=total))
