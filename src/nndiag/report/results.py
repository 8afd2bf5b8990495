"""Result objects shared by every analysis.

Every analysis returns a :class:`Result` (or a subclass): tidy pandas tables, a
summary dict, findings, the parameters and seed used, timings, and provenance.
``Result.to_dict()`` is the JSON document from which reports render without
recomputation; ``Result.from_dict`` reads it back.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import platform
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd

SCHEMA_VERSION = "1.0"
Severity = Literal["pass", "warn", "fail", "error"]
SEVERITIES: tuple[str, ...] = ("pass", "warn", "fail", "error")


def severity_rank(s: str) -> int:
    """Order of severities: pass < warn < fail < error."""
    return SEVERITIES.index(s)


@dataclass(frozen=True)
class Finding:
    """One statement about the model.

    Attributes
    ----------
    code : str
        Stable identifier, documented in docs/FINDINGS.md (e.g. ``"SPEC-UNDERTRAINED"``).
    severity : str
        ``pass``, ``warn``, ``fail`` or ``error``.
    message : str
        One plain-language sentence.
    evidence : dict
        Metric name, value, threshold, layer... whatever supports the statement.
    recommendation : str
        What to change, in plain language ("" when nothing).
    """

    code: str
    severity: Severity
    message: str
    evidence: dict[str, Any] = field(default_factory=dict)
    recommendation: str = ""

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {SEVERITIES}, got {self.severity!r}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "severity": self.severity,
            "message": self.message,
            "evidence": jsonable(self.evidence),
            "recommendation": self.recommendation,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Finding:
        return cls(d["code"], d["severity"], d["message"], d.get("evidence", {}), d.get("recommendation", ""))


def jsonable(obj: Any) -> Any:
    """Convert numpy/pandas/torch values to JSON-safe Python (NaN/Inf → None)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, pd.DataFrame):
        return table_to_records(obj)
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if hasattr(obj, "detach") and hasattr(obj, "tolist"):  # torch tensor
        return jsonable(obj.detach().cpu().tolist())
    if obj is None or isinstance(obj, (str, int)):
        return obj
    return str(obj)


def table_to_records(df: pd.DataFrame) -> list[dict[str, Any]]:
    """A DataFrame as a list of JSON-safe row objects."""
    return [jsonable(r) for r in df.to_dict(orient="records")]


def provenance(device: str | None = None) -> dict[str, Any]:
    """Versions and machine facts recorded in every result."""
    import torch

    import nndiag

    return {
        "nndiag_version": nndiag.__version__,
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "device": device or "cpu",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


@dataclass(frozen=True)
class Result:
    """The outcome of one analysis.

    Attributes
    ----------
    kind : str
        The analysis family (``"layers"``, ``"spectral"``, ``"hessian"``...).
    tables : dict of str to DataFrame
        Tidy tables, one row per layer / slice / architecture, ``name`` first.
    summary : dict
        Scalar summary values.
    findings : list of Finding
        Statements with severity and recommendation.
    params : dict
        The parameters the analysis ran with.
    seed : int or None
        The seed used by stochastic parts.
    timing : dict
        Seconds spent, by stage.
    meta : dict
        Provenance (:func:`provenance`) and anything else worth keeping.
    """

    kind: str
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None
    timing: dict[str, float] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def table(self, name: str) -> pd.DataFrame:
        """One of the result's tables by name."""
        return self.tables[name]

    def worst_severity(self) -> str:
        """The highest severity among the findings (``pass`` when none)."""
        return max((f.severity for f in self.findings), key=severity_rank, default="pass")

    def to_dict(self) -> dict[str, Any]:
        """The JSON document of the result."""
        return {
            "schema_version": SCHEMA_VERSION,
            "kind": self.kind,
            "summary": jsonable(self.summary),
            "tables": {k: table_to_records(v) for k, v in self.tables.items()},
            "findings": [f.to_dict() for f in self.findings],
            "params": jsonable(self.params),
            "seed": self.seed,
            "timing": jsonable(self.timing),
            "meta": jsonable(self.meta),
        }

    def to_json(self, indent: int | None = 2) -> str:
        """:meth:`to_dict` as a JSON string (strict JSON: no NaN)."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Result:
        """Rebuild a result from :meth:`to_dict` output (tables as DataFrames)."""
        return cls(
            kind=d["kind"],
            tables={k: pd.DataFrame(v) for k, v in d.get("tables", {}).items()},
            summary=d.get("summary", {}),
            findings=[Finding.from_dict(f) for f in d.get("findings", [])],
            params=d.get("params", {}),
            seed=d.get("seed"),
            timing=d.get("timing", {}),
            meta=d.get("meta", {}),
        )
