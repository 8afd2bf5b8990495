"""The diagnosis report: every probe's result for one or several models.

A :class:`Report` holds one :class:`ModelReport` per model; each keeps one
:class:`ProbeRun` per analysis (``ok``, ``skipped`` or ``error``) wrapping the
analysis' :class:`~nndiag.report.results.Result`. ``Report.to_dict()`` is the JSON
document (validated by ``schema.json``) from which the HTML re-renders without
recomputation; :meth:`Report.from_dict` reads it back.

Examples
--------
>>> from nndiag.report.results import Finding, Result
>>> run = ProbeRun("demo", "ok", 0.1, Result("demo", summary={"x": 1.0},
...                findings=[Finding("PROBE-ERROR", "error", "broken")]))
>>> rep = Report([ModelReport("m", {}, [run])])
>>> rep.worst_severity()
'error'
>>> Report.from_dict(rep.to_dict()).models[0].runs[0].result.summary
{'x': 1.0}
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from nndiag._utils.files import atomic_write
from nndiag.errors import InputError
from nndiag.report.results import Finding, Result, jsonable, provenance, severity_rank

REPORT_SCHEMA_VERSION = "1.0"
REPORT_KIND = "nndiag-report"
STATUSES = ("ok", "skipped", "error")


class ReportError(InputError):
    """A report document cannot be read (bad JSON, wrong schema, no embedded report)."""


@dataclass
class ProbeRun:
    """One analysis run on one model.

    Attributes
    ----------
    probe : str
        The probe's name (``"spectral"``, ``"hessian"``...).
    status : str
        ``ok`` (``result`` holds the analysis), ``skipped`` (it does not apply, e.g.
        it needs data) or ``error`` (it raised; ``result`` holds a ``PROBE-ERROR``).
    seconds : float
        Wall time spent.
    result : Result
        The analysis result; for ``skipped``/``error`` a result holding only the
        ``PROBE-SKIPPED``/``PROBE-ERROR`` finding.
    message : str
        Why it was skipped or what went wrong ("" when ok).
    """

    probe: str
    status: str
    seconds: float
    result: Result
    message: str = ""

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")

    @property
    def findings(self) -> list[Finding]:
        return list(self.result.findings)

    def to_dict(self) -> dict[str, Any]:
        return {
            "probe": self.probe,
            "status": self.status,
            "seconds": _finite(self.seconds),
            "message": self.message,
            "result": self.result.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ProbeRun:
        return cls(d["probe"], d["status"], float(d.get("seconds") or 0.0),
                   Result.from_dict(d["result"]), d.get("message", ""))


@dataclass
class ModelReport:
    """Every probe run on one model.

    Attributes
    ----------
    name : str
        Display name of the model (unique within a report).
    info : dict
        Facts about the model: origin, path, parameters, tensors, runnable.
    runs : list of ProbeRun
        One entry per analysis, in report order.
    """

    name: str
    info: dict[str, Any] = field(default_factory=dict)
    runs: list[ProbeRun] = field(default_factory=list)

    def run(self, probe: str) -> ProbeRun | None:
        """The run of ``probe`` (None when it was not asked for)."""
        return next((r for r in self.runs if r.probe == probe), None)

    def result(self, probe: str) -> Result | None:
        """The result of ``probe`` when it ran successfully, else None."""
        r = self.run(probe)
        return r.result if r is not None and r.status == "ok" else None

    def findings(self) -> list[tuple[str, Finding]]:
        """``(probe, finding)`` pairs of every run."""
        return [(r.probe, f) for r in self.runs for f in r.result.findings]

    def worst_severity(self) -> str:
        return max((f.severity for _, f in self.findings()), key=severity_rank, default="pass")

    def counts(self) -> dict[str, int]:
        """Number of findings by severity."""
        out = {"pass": 0, "warn": 0, "fail": 0, "error": 0}
        for _, f in self.findings():
            out[f.severity] += 1
        return out

    def metrics(self) -> dict[str, float]:
        """The summary metrics worth comparing across models, as ``probe.key``.

        A probe may list them in a module attribute ``COMPARE`` (summary keys); otherwise
        every finite float in its summary counts, except standard errors (integers are
        mostly counts and settings: iterations, points, examples).
        """
        from nndiag.report.probes import load_probe

        out: dict[str, float] = {}
        for r in self.runs:
            if r.status != "ok":
                continue
            try:
                chosen = getattr(load_probe(r.probe), "COMPARE", None)
            except Exception:  # a broken probe module: fall back to the heuristic
                chosen = None
            for k, v in r.result.summary.items():
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    continue
                if chosen is not None:
                    if k not in chosen:
                        continue
                elif isinstance(v, int) or k.endswith(("_stderr", "_seconds")):
                    continue
                if math.isfinite(float(v)):
                    out[f"{r.probe}.{k}"] = float(v)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "info": jsonable(self.info), "probes": [r.to_dict() for r in self.runs]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelReport:
        return cls(d["name"], dict(d.get("info", {})), [ProbeRun.from_dict(r) for r in d.get("probes", [])])


@dataclass
class Report:
    """The outcome of :func:`nndiag.diagnose` for one or several models.

    Attributes
    ----------
    models : list of ModelReport
        One entry per model, in the order given.
    data : dict or None
        The data set used (name, examples, classes, input shape), None when data-free.
    options : dict
        What was asked for (probes, seed, device, per-probe options).
    meta : dict
        Provenance (versions, machine, time).
    complete : bool
        False while probes are still running or when the run was interrupted.
    """

    models: list[ModelReport]
    data: dict[str, Any] | None = None
    options: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=provenance)
    complete: bool = True

    # -- questions ---------------------------------------------------------------------------
    def findings(self, min_severity: str = "pass") -> list[dict[str, Any]]:
        """Every finding as a flat record (``model``, ``probe`` + the finding), worst first.

        Parameters
        ----------
        min_severity : str
            Keep findings at least this severe.
        """
        level = severity_rank(min_severity)
        rows = []
        order = 0
        for m in self.models:
            for probe, f in m.findings():
                if severity_rank(f.severity) >= level:
                    rows.append((-severity_rank(f.severity), order,
                                 {"model": m.name, "probe": probe, **f.to_dict()}))
                    order += 1
        return [r for *_, r in sorted(rows, key=lambda t: (t[0], t[1]))]

    def top_findings(self, n: int = 10) -> list[dict[str, Any]]:
        """The ``n`` most severe findings that are not ``pass``."""
        return self.findings("warn")[:n]

    def worst_severity(self) -> str:
        return max((m.worst_severity() for m in self.models), key=severity_rank, default="pass")

    def severities(self) -> list[str]:
        return [f["severity"] for f in self.findings()]

    def model(self, name: str) -> ModelReport:
        """The model entry called ``name``."""
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(f"{name}: no such model in the report; have {', '.join(m.name for m in self.models)}")

    def summary_table(self) -> pd.DataFrame:
        """One row per model: size, accuracy, findings by severity, probe statuses."""
        rows = []
        for m in self.models:
            c = m.counts()
            ev = m.result("evaluation")
            rows.append({
                "name": m.name,
                "parameters": m.info.get("parameters"),
                "accuracy": ev.summary.get("accuracy") if ev else None,
                "loss": ev.summary.get("loss") if ev else None,
                "worst": m.worst_severity(),
                "fail": c["fail"],
                "warn": c["warn"],
                "errors": c["error"],
                "ok": sum(r.status == "ok" for r in m.runs),
                "skipped": sum(r.status == "skipped" for r in m.runs),
            })
        return pd.DataFrame(rows, columns=["name", "parameters", "accuracy", "loss", "worst", "fail",
                                           "warn", "errors", "ok", "skipped"])

    def comparison(self) -> pd.DataFrame:
        """The models' scalar metrics side by side (one row per metric).

        Columns: ``name`` (``probe.metric``), one column per model, ``rho_accuracy``
        (Spearman correlation of the metric with accuracy across models, when at
        least three models have an accuracy) and ``ranking`` (the models from the
        lowest to the highest value).
        """
        per_model = {m.name: m.metrics() for m in self.models}
        names = [m.name for m in self.models]
        keys: list[str] = []
        for m in self.models:
            keys += [k for k in per_model[m.name] if k not in keys]
        acc = pd.Series({n: per_model[n].get("evaluation.accuracy") for n in names}, dtype=float)
        rows = []
        for k in keys:
            vals = pd.Series({n: per_model[n].get(k) for n in names}, dtype=float)
            if len(names) > 1 and vals.notna().all() and vals.nunique() == 1:
                continue  # the same for every model (e.g. the number of examples): no comparison
            row: dict[str, Any] = {"name": k, **{n: vals[n] for n in names}}
            both = pd.concat([vals, acc], axis=1).dropna()
            rho = None
            if k != "evaluation.accuracy" and len(both) >= 3 and both.iloc[:, 0].nunique() > 1 \
                    and both.iloc[:, 1].nunique() > 1:
                r = both.rank().corr().iloc[0, 1]
                rho = float(r) if math.isfinite(r) else None
            row["rho_accuracy"] = rho
            row["ranking"] = " < ".join(vals.dropna().sort_values(kind="stable").index)
            rows.append(row)
        return pd.DataFrame(rows, columns=["name", *names, "rho_accuracy", "ranking"])

    # -- serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The JSON document of the report (see ``nndiag/report/schema.json``)."""
        return {
            "schema_version": REPORT_SCHEMA_VERSION,
            "kind": REPORT_KIND,
            "complete": bool(self.complete),
            "meta": jsonable(self.meta),
            "options": jsonable(self.options),
            "data": jsonable(self.data),
            "models": [m.to_dict() for m in self.models],
            "findings": jsonable(self.findings()),
            "comparison": jsonable(self.comparison().to_dict(orient="records")),
        }

    def to_json(self, indent: int | None = 2) -> str:
        """:meth:`to_dict` as strict JSON."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, validate: bool = True) -> Report:
        """Rebuild a report from :meth:`to_dict` output (derived fields are recomputed)."""
        if not isinstance(d, dict) or d.get("kind") != REPORT_KIND:
            raise ReportError("not an nndiag report: the document's kind is not 'nndiag-report'")
        if validate:
            from nndiag.errors import MissingDependencyError
            from nndiag.report.schema import validate_report

            try:
                validate_report(d)
            except MissingDependencyError:  # jsonschema absent: read it unvalidated
                pass
        if not isinstance(d.get("models"), list) or not d["models"]:
            raise ReportError("not an nndiag report: it lists no models")
        return cls(
            models=[ModelReport.from_dict(m) for m in d["models"]],
            data=d.get("data"),
            options=d.get("options", {}),
            meta=d.get("meta", {}),
            complete=bool(d.get("complete", True)),
        )

    @classmethod
    def from_json(cls, text: str) -> Report:
        try:
            doc = json.loads(text)
        except ValueError as exc:
            raise ReportError(f"invalid JSON ({exc})") from None
        return cls.from_dict(doc)

    @classmethod
    def load(cls, path: str | Path) -> Report:
        """Read a report from its ``.json`` file or from an HTML report that embeds it."""
        p = Path(path)
        if not p.is_file():
            raise ReportError(f"{p}: no such report file")
        text = p.read_text(encoding="utf-8")
        if p.suffix.lower() in (".html", ".htm"):
            from nndiag.report.html import extract_json

            text = extract_json(text, str(p))
        try:
            return cls.from_json(text)
        except ReportError as exc:
            raise ReportError(f"{p}: {exc}") from None

    def save_json(self, path: str | Path) -> Path:
        """Write :meth:`to_json` atomically (a reader never sees half a file)."""
        return atomic_write(path, self.to_json() + "\n")

    def to_html(self) -> str:
        """The self-contained HTML report (figures drawn by each probe's ``figures``)."""
        from nndiag.report.html import render_html

        return render_html(self)

    def save_html(self, path: str | Path) -> Path:
        """Write :meth:`to_html` atomically."""
        return atomic_write(path, self.to_html())


def _finite(x: float) -> float | None:
    return float(x) if x is not None and math.isfinite(float(x)) else None
