"""Shared CLI pieces: options, output, exit codes and error handling.

Exit codes: 0 ok, 1 findings at or above ``--fail-on``, 2 bad input or error.
JSON goes to stdout only; logs, progress and hints go to stderr.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable, Iterable
from enum import Enum
from typing import Annotated, Any, TypeVar

import typer

from nndiag.errors import NNDiagError

F = TypeVar("F", bound=Callable[..., Any])


class Format(str, Enum):
    human = "human"
    json = "json"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class FailOn(str, Enum):
    never = "never"
    warn = "warn"
    fail = "fail"
    error = "error"


FormatOpt = Annotated[Format, typer.Option("--format", help="Output format: human tables or JSON on stdout.")]
DeviceOpt = Annotated[Device, typer.Option("--device", help="Where to compute (auto = CUDA when present).")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed for every stochastic step.")]
FailOnOpt = Annotated[FailOn, typer.Option("--fail-on", help="Exit 1 when a finding is at least this severe.")]
DataOpt = Annotated[str | None, typer.Option("--data", help="DATA spec: digits, mnist1d, FILE.npz, image folder.")]
NSamplesOpt = Annotated[int | None, typer.Option("--n-samples", help="Use a seeded subset of this many examples.")]
InputsOpt = Annotated[str, typer.Option(
    "--inputs", help="auto: when the model does much better on the data divided by 255, normalised or "
    "with colour channels reversed (EVAL-INPUT-SCALE), analyse the data so rescaled; as-given: keep the "
    "data as given (the finding only warns).")]
BatchOpt = Annotated[int, typer.Option("--batch-size", help="Batch size for forward/backward passes.")]
ArchOpt = Annotated[
    str | None,
    typer.Option("--arch", help="Architecture for a weights file: built-in name or package.module:factory."),
]
WeightsOpt = Annotated[str | None, typer.Option("--weights", help="Weights to load into a factory or built-in model.")]


def err(message: str) -> None:
    """Print a line to stderr."""
    print(message, file=sys.stderr)


def emit_json(doc: Any) -> None:
    """Write one JSON document to stdout (strict JSON)."""
    sys.stdout.write(json.dumps(doc, indent=2, allow_nan=False) + "\n")
    sys.stdout.flush()


def fail_exit_code(severities: Iterable[str], fail_on: FailOn | str) -> int:
    """1 when any severity reaches ``fail_on``, else 0."""
    from nndiag.report.results import severity_rank

    level = fail_on.value if isinstance(fail_on, FailOn) else str(fail_on)
    if level == "never":
        return 0
    return int(any(severity_rank(s) >= severity_rank(level) for s in severities))


def handle_errors(fn: F) -> F:
    """Turn nndiag errors into one stderr line and exit code 2 (traceback with NNDIAG_DEBUG=1)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            code = fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except NNDiagError as exc:
            if os.environ.get("NNDIAG_DEBUG") == "1":
                raise
            err(f"nndiag: error: {exc}")
            raise typer.Exit(2) from None
        except Exception as exc:  # unexpected: still one line unless debugging
            if os.environ.get("NNDIAG_DEBUG") == "1":
                raise
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            err(f"nndiag: error: {type(exc).__name__}: {msg} (set NNDIAG_DEBUG=1 for the traceback)")
            raise typer.Exit(2) from None
        if isinstance(code, int) and code:
            raise typer.Exit(code)
        return None

    return wrapper  # type: ignore[return-value]


#: Widest table written when stdout is not a terminal (a pipe or a log file has no width).
PIPE_WIDTH_MAX = 240


def human_table(rows: list[dict[str, Any]], title: str | None = None, columns: list[str] | None = None,
                priority: list[str] | None = None, console: Any = None) -> None:
    """Print rows as a rich table on stdout.

    Numeric cells never wrap; names fold only beyond 32 characters (the first column keeps
    the width of its longest value up to that), other text folds. When stdout is not a
    terminal the table gets the width it needs (up to :data:`PIPE_WIDTH_MAX`); in a terminal
    too narrow for every column, columns are left out, least important first (the reverse of
    ``priority``, default: the column order; the first column always stays), and the caption
    names them — rather than folding names and numbers into three-letter slivers.
    """
    from rich.console import Console
    from rich.measure import Measurement
    from rich.table import Table

    cols = columns or (list(rows[0]) if rows else [])
    cells = [{c: _fmt(r.get(c)) for c in cols} for r in rows]
    numeric = {c for c in cols if all(_numeric(row[c]) for row in cells)}

    def build(shown: list[str]) -> Table:
        table = Table(title=title, show_lines=False)
        for i, c in enumerate(shown):
            if i == 0:
                longest = max([len(c)] + [len(row[c]) for row in cells])
                table.add_column(c, overflow="fold", min_width=min(longest, 32))
            else:
                table.add_column(c, no_wrap=c in numeric, overflow="fold")
        for row in cells:
            table.add_row(*[row[c] for c in shown])
        return table

    wide = Console(width=PIPE_WIDTH_MAX)

    def need(table: Table) -> int:
        return Measurement.get(wide, wide.options, table).maximum

    console = console or Console()
    shown = list(cols)
    table = build(shown)
    if not console.is_terminal:
        console = Console(width=max(console.width, min(need(table), PIPE_WIDTH_MAX)))
    else:
        rest = cols[1:]
        order = [c for c in (priority or []) if c in rest] + [c for c in rest if c not in (priority or [])]
        dropped = []
        while need(table) > console.width and len(shown) > 2:
            victim = next(c for c in reversed(order) if c in shown)
            shown.remove(victim)
            dropped.append(victim)
            table = build(shown)
        if dropped:
            table.caption = (f"{len(dropped)} column(s) left out to fit {console.width} characters: "
                             f"{', '.join(reversed(dropped))} (--format json has every value)")
    console.print(table)


def _numeric(text: str) -> bool:
    if text in ("—", "", "nan", "inf", "-inf"):
        return True
    try:
        float(text.replace(",", ""))
    except ValueError:
        return False
    return True


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if v is None:
        return "—"
    return str(v)
