"""Human tables: names kept whole, columns left out (and named) when a terminal is too narrow."""

from __future__ import annotations

import io

from rich.console import Console

from nndiag.cli.common import human_table

ROWS = [{"name": f"transformer.h.{i}.attn.c_attn.q", "N": 768, "M": 768, "alpha": 3.25 + i, "D": 0.0412,
         "lambda_max": 12.5, "warning": "under-trained" if i else "", "status": "success"} for i in range(3)]


def test_narrow_terminal_leaves_out_the_least_important_columns():
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=70, color_system=None)
    human_table(ROWS, title="spectra", priority=["name", "alpha", "warning", "status", "D"], console=console)
    text = out.getvalue()
    assert "transformer.h.2.attn.c_attn.q" in text  # the name is never folded
    assert "5.25" in text and "under-trained" in text
    caption = " ".join(text.split("left out")[1].split())
    # out first: the columns not in the priority list, from the end (lambda_max, M, N), then
    # the lowest listed (D); named most important first
    assert caption == "to fit 70 characters: D, N, M, lambda_max (--format json has every value)"
    assert all(len(line) <= 70 for line in text.splitlines())
    header = next(line for line in text.splitlines() if "name" in line)
    assert "lambda_max" not in header and "alpha" in header


def test_pipe_gets_the_whole_table(capsys):
    human_table(ROWS, title="spectra")
    text = capsys.readouterr().out
    header = next(line for line in text.splitlines() if "name" in line)
    for col in ROWS[0]:
        assert col in header
    assert "left out" not in text
    assert any("transformer.h.1.attn.c_attn.q" in line and "4.25" in line for line in text.splitlines())
