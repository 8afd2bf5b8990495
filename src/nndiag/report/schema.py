"""The JSON Schema of the report document and its validation.

``schema.json`` (JSON Schema draft 2020-12) describes :meth:`Report.to_dict`. Validation
needs ``jsonschema`` (``pip install 'nndiag[report]'``).

Examples
--------
>>> schema = load_schema()
>>> schema["properties"]["kind"]
{'const': 'nndiag-report'}
"""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Any

from nndiag.errors import require


@functools.lru_cache(maxsize=1)
def load_schema() -> dict[str, Any]:
    """The report's JSON Schema as a dict."""
    text = resources.files("nndiag.report").joinpath("schema.json").read_text(encoding="utf-8")
    return json.loads(text)


def schema_errors(doc: Any) -> list[str]:
    """Every way ``doc`` breaks the schema, as ``path: message`` lines (empty when valid)."""
    jsonschema = require("jsonschema", "report", "validating report JSON")
    validator = jsonschema.Draft202012Validator(load_schema())  # type: ignore[attr-defined]
    out = []
    for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path))):
        where = "/".join(str(p) for p in e.absolute_path) or "(root)"
        out.append(f"{where}: {e.message}")
    return out


def validate_report(doc: Any) -> None:
    """Raise :class:`~nndiag.report.report.ReportError` naming the first schema violation."""
    from nndiag.report.report import ReportError

    errors = schema_errors(doc)
    if errors:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise ReportError(f"report does not match its schema: {errors[0][:300]}{more}")
