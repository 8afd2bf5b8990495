"""Output files: early checks and atomic writes (nndiag._utils.files)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from nndiag._utils.files import (  # noqa: E402
    check_figure_path,
    check_folder,
    check_writable,
    figure_suffixes,
    save_figure,
)
from nndiag.errors import InputError  # noqa: E402


def test_checks_fail_early_with_one_line_and_create_parents(tmp_path):
    (tmp_path / "f.txt").write_text("x")
    assert {".png", ".svg", ".pdf"} <= set(figure_suffixes())
    with pytest.raises(InputError, match=r"must end in .*\.png"):
        check_figure_path(tmp_path / "a.xyz")
    with pytest.raises(InputError, match="cannot write"):
        check_writable(tmp_path / "f.txt" / "a.json")
    with pytest.raises(InputError, match="is a file"):
        check_folder(tmp_path / "f.txt")
    assert check_figure_path(tmp_path / "new" / "deep" / "A.PNG").parent.is_dir()
    assert check_folder(tmp_path / "plots").is_dir()
    assert sorted(p.name for p in (tmp_path / "new" / "deep").iterdir()) == []  # the probe file is gone


def test_save_figure_writes_the_format_its_suffix_names_and_keeps_an_old_file_on_error(tmp_path):
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    svg = save_figure(fig, tmp_path / "sub" / "a.svg")
    png = save_figure(fig, tmp_path / "a.png", dpi=50)
    assert svg.read_text().lstrip().startswith("<?xml") and "<svg" in svg.read_text()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    old = png.read_bytes()
    with pytest.raises(ValueError):
        save_figure(fig, png, dpi=np.nan)  # rendering fails: the previous picture stays whole
    assert png.read_bytes() == old and sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "sub"]
    plt.close(fig)
