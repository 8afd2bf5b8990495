"""Writing output files so that a user never gets a half-written one, nor loses a result.

Commands check every output path before their analysis starts (:func:`check_writable`,
:func:`check_figure_path`), so that a bad path costs a second, not the analysis, and
write through a temporary file and a rename (:func:`atomic_write`, :func:`save_figure`).
"""

from __future__ import annotations

import functools
import io
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from nndiag.errors import InputError


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Write ``data`` to ``path`` via a temporary file in the same folder and an atomic rename.

    Parent folders are created; the file is flushed to disk before the rename and readable
    by everyone (0644). On any error the target is left as it was.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> p = atomic_write(pathlib.Path(tempfile.mkdtemp()) / "a" / "x.txt", "hi")
    >>> p.read_text()
    'hi'
    """
    target = Path(path).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    if not isinstance(data, (str, bytes)):
        raise TypeError(f"atomic_write writes str or bytes, got {type(data).__name__}")
    mode = "wb" if isinstance(data, bytes) else "w"
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=str(target.parent))
    try:
        with os.fdopen(fd, mode, **({} if isinstance(data, bytes) else {"encoding": "utf-8"})) as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def check_writable(path: str | Path, suffixes: Iterable[str] | None = None, what: str = "output") -> Path:
    """Fail early, with a one-line :class:`InputError`, when ``path`` cannot be written.

    The parent folder is created; a file is created and removed there to be sure. With
    ``suffixes``, the file name must end in one of them (case-insensitive).
    """
    p = Path(path).expanduser()
    if suffixes is not None:
        allowed = sorted({s.lower() for s in suffixes})
        if p.suffix.lower() not in allowed:
            raise InputError(f"{p}: the {what} must end in {', '.join(allowed)}")
    if p.is_dir():
        raise InputError(f"{p}: is a folder; give a file name for the {what}")
    _writes_in(p.parent, p, what)
    return p


def check_folder(path: str | Path, what: str = "output folder") -> Path:
    """Create ``path`` (a folder) and make sure files can be written in it, else :class:`InputError`."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise InputError(f"{p}: is a file; the {what} must be a folder")
    _writes_in(p, p, what)
    return p


def _writes_in(folder: Path, shown: Path, what: str) -> None:
    """Create ``folder`` and a file in it (removed at once), or raise a one-line :class:`InputError`."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".nndiag.", suffix=".check", dir=folder)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise InputError(f"{shown}: cannot write the {what} there ({exc.strerror or exc})") from None


@functools.cache
def figure_suffixes() -> tuple[str, ...]:
    """File suffixes matplotlib can write a figure as (``.png``, ``.svg``, ``.pdf``, ...)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    return tuple(f".{k}" for k in FigureCanvasAgg(Figure()).get_supported_filetypes())


def check_figure_path(path: str | Path, what: str = "picture") -> Path:
    """:func:`check_writable` for a figure: a suffix matplotlib writes, a writable folder."""
    return check_writable(path, figure_suffixes(), what)


def save_figure(fig: Any, path: str | Path, **savefig: Any) -> Path:
    """Render ``fig`` in memory, in the format its suffix names, and write it atomically."""
    p = Path(path).expanduser()
    buf = io.BytesIO()
    fig.savefig(buf, format=p.suffix.lstrip(".").lower() or "png", **savefig)
    return atomic_write(p, buf.getvalue())
