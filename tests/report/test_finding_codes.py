"""Every finding code used anywhere in the code base is documented in docs/FINDINGS.md."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src" / "nndiag"
DOC = ROOT / "docs" / "FINDINGS.md"
CODE_RE = re.compile(r"^[A-Z][A-Z0-9]*(?:-[A-Z0-9]+)+$")


def documented_codes() -> set[str]:
    """Codes in the first column of FINDINGS.md's tables."""
    return set(re.findall(r"^\|\s*`([A-Z][A-Z0-9]*(?:-[A-Z0-9]+)+)`\s*\|", DOC.read_text(), re.M))


def code_prefixes() -> set[str]:
    """Families named in FINDINGS.md's headings, e.g. ``SPEC`` from ``(`SPEC-*`)``, plus PROBE."""
    return set(re.findall(r"`([A-Z][A-Z0-9]*)-\*`", DOC.read_text())) | {"PROBE"}


def source_codes() -> dict[str, list[str]]:
    """String constants in src/nndiag shaped like a finding code of a known family."""
    prefixes = tuple(f"{p}-" for p in code_prefixes())
    found: dict[str, list[str]] = {}
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                s = node.value
                if s.startswith(prefixes) and CODE_RE.match(s):
                    found.setdefault(s, []).append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def test_prefixes_cover_every_family():
    assert {"SPEC", "HESS", "LAND", "MDT", "ZC", "SLICE", "PROBE"} <= code_prefixes()


def test_the_scan_finds_the_report_codes():
    # guards against a scan that silently finds nothing
    codes = source_codes()
    assert "PROBE-ERROR" in codes and "PROBE-SKIPPED" in codes


def test_every_code_in_the_source_is_documented():
    missing = {c: where for c, where in source_codes().items() if c not in documented_codes()}
    assert not missing, "finding codes missing from docs/FINDINGS.md: " + "; ".join(
        f"{c} ({', '.join(w[:2])})" for c, w in sorted(missing.items()))
