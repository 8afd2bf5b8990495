"""Render a :class:`~nndiag.report.report.Report` as one self-contained HTML file.

No network is needed to view it: the CSS is inline, every figure is an inline
base64 PNG drawn by the probe's own ``figures(result)`` from the result's tables,
and the report's JSON is embedded in ``<script type="application/json"
id="nndiag-report">`` so that ``nndiag report report.html --html out.html`` (or the
``.json``) re-renders without recomputing. The page has no script of its own.

Examples
--------
>>> from nndiag.report.report import ModelReport, Report
>>> page = render_html(Report([ModelReport("m")]))
>>> page.startswith("<!DOCTYPE html>") and 'id="nndiag-report"' in page
True
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
import sys
from importlib import resources
from typing import Any

from nndiag.report.report import ProbeRun, Report, ReportError

_JSON_RE = re.compile(
    r'<script type="application/json" id="nndiag-report">(.*?)</script>', re.DOTALL)
_TITLES = {
    "evaluation": "Accuracy on the data",
    "spectral": "Weight spectra (heavy-tailed self-regularisation)",
    "hessian": "Hessian spectrum and curvature",
    "landscape": "Loss landscape",
    "mdtree": "Failure mode (MD tree)",
    "zerocost": "Zero-cost proxies",
    "slices": "Error slices",
}
_MAX_ROWS = 60
_DPI = 90


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if not math.isfinite(v):
            return "—"
        return f"{v:,.0f}" if abs(v) >= 1e5 else f"{v:.4g}"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt(x) for x in v[:12]) + (" …" if len(v) > 12 else "")
    if isinstance(v, dict):
        return "; ".join(f"{k}={_fmt(x)}" for k, x in list(v.items())[:12])
    return str(v)


def _slug(*parts: str) -> str:
    return "-".join(re.sub(r"[^a-z0-9]+", "-", p.lower()).strip("-") or "x" for p in parts)


def _badge(severity: str) -> str:
    return f'<span class="sev sev-{_e(severity)}">{_e(severity)}</span>'


def _status(status: str) -> str:
    return f'<span class="status status-{_e(status)}">{_e(status)}</span>'


def _table(rows: list[dict[str, Any]], columns: list[str], cls: str = "",
           raw: tuple[str, ...] = ()) -> str:
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    body = []
    for r in rows:
        cells = []
        for c in columns:
            v = r.get(c)
            num = isinstance(v, (int, float)) and not isinstance(v, bool)
            content = v if c in raw else _e(_fmt(v))
            cells.append(f'<td class="num">{content}</td>' if num else f"<td>{content}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<table class="{cls}"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table>')


def figure_png(fig: Any) -> str:
    """A matplotlib figure as a base64 PNG ``data:`` URI (the figure is closed)."""
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=_DPI)
    finally:
        plt = sys.modules.get("matplotlib.pyplot")
        if plt is not None:
            plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _figures_html(run: ProbeRun) -> str:
    from nndiag.report.probes import load_probe

    try:
        mod = load_probe(run.probe)
    except Exception as exc:  # pragma: no cover - a broken probe module
        return f'<p class="figure-error">figures unavailable: {_e(exc)}</p>'
    if mod is None or not hasattr(mod, "figures"):
        return ""
    try:
        figs = mod.figures(run.result) or {}
    except Exception as exc:
        return (f'<p class="figure-error">the figures could not be drawn: '
                f'{_e(type(exc).__name__)}: {_e(str(exc).splitlines()[0] if str(exc) else "")}</p>')
    out = []
    for name, fig in figs.items():
        try:
            uri = figure_png(fig)
        except Exception as exc:
            out.append(f'<p class="figure-error">{_e(name)}: {_e(type(exc).__name__)}: {_e(exc)}</p>')
            continue
        label = name.replace("_", " ")
        out.append(f'<figure><img src="{uri}" alt="{_e(run.probe)}: {_e(label)}">'
                   f"<figcaption>{_e(label)}</figcaption></figure>")
    return f'<div class="figures">{"".join(out)}</div>' if out else ""


def _findings_list(findings: list[Any]) -> str:
    if not findings:
        return '<p class="muted">No findings.</p>'
    items = []
    for f in sorted(findings, key=lambda f: -["pass", "warn", "fail", "error"].index(f.severity)):
        ev = f"<div class=\"evidence\">evidence: {_e(_fmt(f.evidence))}</div>" if f.evidence else ""
        rec = (f'<div class="rec">→ {_e(f.recommendation)}</div>' if f.recommendation else "")
        items.append(f'<li class="finding">{_badge(f.severity)} <code>{_e(f.code)}</code> '
                     f"{_e(f.message)}{rec}{ev}</li>")
    return f'<ul class="findings">{"".join(items)}</ul>'


def _run_section(model: str, run: ProbeRun, figures: bool) -> str:
    sid = _slug(model, run.probe)
    title = _TITLES.get(run.probe, run.probe)
    # a finished analysis shows its findings' worst severity (a green "ok" beside WARN findings
    # read as "this analysis found nothing"); one that did not finish shows why
    mark = _badge(run.result.worst_severity()) if run.status == "ok" else _status(run.status)
    head = (f'<h3>{_e(title)} <span class="probe-name">{_e(run.probe)}</span> '
            f'{mark} <span class="muted">{run.seconds:.2f} s</span></h3>')
    if run.status == "skipped":
        how = next((f.recommendation for f in run.findings if f.recommendation), "")
        return (f'<section class="probe probe-skipped" id="{sid}" data-probe="{_e(run.probe)}">'
                f'<p><b>{_e(title)}</b> <span class="probe-name">{_e(run.probe)}</span> '
                f'{_status(run.status)} not run: {_e(run.message)}'
                + (f' <span class="rec">→ {_e(how)}</span>' if how else "") + "</p></section>")
    if run.status != "ok":
        return (f'<section class="probe probe-{_e(run.status)}" id="{sid}" data-probe="{_e(run.probe)}">'
                f'{head}{_findings_list(run.findings)}</section>')
    res = run.result
    scalars = {k: v for k, v in res.summary.items()}
    summary = ("<dl class=\"summary\">" + "".join(
        f"<div><dt>{_e(k)}</dt><dd>{_e(_fmt(v))}</dd></div>" for k, v in scalars.items()) + "</dl>") if scalars else ""
    tables = []
    for tname, df in res.tables.items():
        rows = df.head(_MAX_ROWS).to_dict(orient="records")
        more = f" (first {_MAX_ROWS} of {len(df)} rows)" if len(df) > _MAX_ROWS else f" ({len(df)} rows)"
        tables.append(f"<details><summary>table <b>{_e(tname)}</b>{_e(more)}</summary>"
                      f'<div class="scroll">{_table(rows, [str(c) for c in df.columns], "data")}</div>'
                      "</details>")
    figs = _figures_html(run) if figures else ""
    params = (f'<p class="muted small">parameters: {_e(_fmt(res.params))}; seed {_e(_fmt(res.seed))}</p>'
              if res.params else "")
    return (f'<section class="probe probe-ok" id="{sid}" data-probe="{_e(run.probe)}">{head}'
            f"{_findings_list(run.findings)}{summary}{figs}{''.join(tables)}{params}</section>")


def _summary_section(report: Report) -> str:
    st = report.summary_table()
    rows = st.to_dict(orient="records")
    for r, m in zip(rows, report.models, strict=True):
        r["name"] = f'<a href="#{_slug("model", m.name)}">{_e(m.name)}</a>'
        r["worst"] = _badge(str(r["worst"]))
        top = next((f for f in report.findings("warn") if f["model"] == m.name), None)
        r["top finding"] = _e(top["message"]) if top else '<span class="muted">nothing to fix</span>'
    cols = [c for c in ["name", "parameters", "accuracy", "loss", "worst", "fail", "warn", "errors",
                        "ok", "skipped", "top finding"]
            if c in ("name", "top finding") or st[c].notna().any()] if len(st) else []
    return ('<section id="summary" class="block"><h2>Summary</h2>'
            + _table(rows, cols, "summary-table", raw=("name", "worst", "top finding")) + "</section>")


def _findings_section(report: Report) -> str:
    rows = report.top_findings(n=50)
    if not rows:
        body = '<p class="ok-note">No warnings or failures: nothing to fix.</p>'
    else:
        for r in rows:
            r["severity"] = _badge(r["severity"])
            r["code"] = f"<code>{_e(r['code'])}</code>"
            r["evidence"] = _e(_fmt(r["evidence"]))
            for k in ("message", "recommendation", "model", "probe"):
                r[k] = _e(r[k])
        cols = ["severity", "model", "probe", "code", "message", "recommendation", "evidence"]
        if len(report.models) == 1:
            cols.remove("model")
        body = _table(rows, cols, "findings-table", raw=tuple(cols))
    return f'<section id="findings" class="block"><h2>What to fix</h2>{body}</section>'


def _comparison_section(report: Report) -> str:
    if len(report.models) < 2:
        return ""
    cmp = report.comparison()
    if not len(cmp):
        return ""
    names = [m.name for m in report.models]
    rows = cmp.to_dict(orient="records")
    for r in rows:
        vals = {n: r[n] for n in names if r[n] is not None and math.isfinite(r[n])}
        order = {n: i + 1 for i, n in enumerate(sorted(vals, key=lambda n: vals[n]))}
        for n in names:
            r[n] = (f"{_e(_fmt(r[n]))} <span class=\"rank\">#{order[n]}</span>" if n in order else "—")
        r["name"] = f"<code>{_e(r['name'])}</code>"
        r["rho_accuracy"] = _e(_fmt(r["rho_accuracy"]))
        r["ranking"] = _e(r["ranking"])
    note = ("<p class=\"muted\">Each metric's value per model with its rank (#1 = lowest). "
            "ρ: Spearman correlation of the metric with accuracy across the models "
            "(shown when at least three models have an accuracy).</p>")
    return ('<section id="comparison" class="block"><h2>Models side by side</h2>' + note
            + '<div class="scroll">'
            + _table(rows, ["name", *names, "rho_accuracy"], "compare-table",
                     raw=("name", *names, "rho_accuracy")) + "</div></section>")


def _status_section(report: Report) -> str:
    rows = []
    for m in report.models:
        for r in m.runs:
            rows.append({"model": _e(m.name), "analysis": f'<a href="#{_slug(m.name, r.probe)}">'
                                                           f"{_e(r.probe)}</a>",
                         "status": _status(r.status), "seconds": f"{r.seconds:.2f}",
                         "note": _e(r.message) if r.message else ""})
    cols = ["model", "analysis", "status", "seconds", "note"]
    return ('<section id="runs" class="block"><h2>Analyses run</h2>'
            + _table(rows, cols, "runs-table", raw=tuple(cols)) + "</section>")


def _embedded_json(report: Report) -> str:
    text = json.dumps(report.to_dict(), allow_nan=False, separators=(",", ":"))
    # keep the HTML parser out of the JSON: no "</script", no "<!--"
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return f'<script type="application/json" id="nndiag-report">{text}</script>'


def extract_json(page: str, source: str = "HTML") -> str:
    """The report JSON embedded in an HTML report page.

    Raises
    ------
    ReportError
        The page holds no embedded nndiag report.
    """
    m = _JSON_RE.search(page)
    if m is None:
        raise ReportError(f"{source}: no embedded nndiag report (is it an nndiag HTML report?)")
    return m.group(1)


def _css() -> str:
    return resources.files("nndiag.report").joinpath("templates/report.css").read_text(encoding="utf-8")


def render_html(report: Report, *, figures: bool = True) -> str:
    """The report as one self-contained HTML page.

    Parameters
    ----------
    report : Report
        What to render.
    figures : bool
        Draw each analysis' figures (needs matplotlib: ``pip install 'nndiag[report]'``).
    """
    if figures:
        from nndiag.errors import require

        require("matplotlib", "report", "the figures of the HTML report")
    names = ", ".join(m.name for m in report.models)
    meta = report.meta or {}
    data = report.data
    data_txt = (f"{data['name']} ({data['n_samples']:,} examples)" if data else "none (data-free analyses only)")
    if data and isinstance(data.get("train"), dict):
        data_txt += f"; training data {data['train']['name']} ({data['train']['n_samples']:,} examples)"
    incomplete = ("" if report.complete else
                  '<p class="incomplete">This report is incomplete: the run was interrupted or is '
                  "still going.</p>")
    nav = ['<a href="#summary">Summary</a>', '<a href="#findings">What to fix</a>']
    if len(report.models) > 1:
        nav.append('<a href="#comparison">Side by side</a>')
    nav += [f'<a href="#{_slug("model", m.name)}">{_e(m.name)}</a>' for m in report.models]
    nav.append('<a href="#runs">Analyses run</a>')
    models_html = []
    for m in report.models:
        info = ", ".join(f"{k} {_fmt(v)}" for k, v in m.info.items() if v is not None and k != "path")
        sections = "".join(_run_section(m.name, r, figures) for r in m.runs)
        models_html.append(
            f'<section class="model block" id="{_slug("model", m.name)}" data-model="{_e(m.name)}">'
            f'<h2>Model {_e(m.name)} {_badge(m.worst_severity())}</h2>'
            f'<p class="muted">{_e(info)}</p>{sections}</section>')
    worst = report.worst_severity()
    return "".join([
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">",
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>nndiag report: {_e(names)}</title><style>{_css()}</style></head><body>",
        f'<header><h1>nndiag report {_badge(worst)}</h1>',
        f'<p><b>Model{"s" if len(report.models) > 1 else ""}:</b> {_e(names)} · <b>Data:</b> '
        f"{_e(data_txt)} · <b>Created:</b> {_e(meta.get('created', '?'))}</p>",
        f'<nav>{" · ".join(nav)}</nav>{incomplete}</header><main>',
        _summary_section(report), _findings_section(report), _comparison_section(report),
        "".join(models_html), _status_section(report),
        "</main><footer>",
        f"nndiag {_e(meta.get('nndiag_version', '?'))} · torch {_e(meta.get('torch_version', '?'))} · "
        f"python {_e(meta.get('python_version', '?'))} · device {_e(meta.get('device', '?'))}. "
        "Re-render without recomputing: <code>nndiag report THIS.html --html OUT.html</code>.",
        "</footer>", _embedded_json(report), "</body></html>\n",
    ])
