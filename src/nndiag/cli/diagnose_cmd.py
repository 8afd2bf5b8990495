"""``nndiag diagnose MODEL [MODEL...]`` and ``nndiag report REPORT --html OUT``.

``diagnose`` runs every analysis that applies and writes one report (HTML and/or
JSON); ``report`` re-renders a saved report (its ``.json`` or an HTML report that
embeds it) without recomputing. Requested files are written atomically; the JSON is
refreshed after every analysis, and on Ctrl-C what was done so far is still written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from nndiag.cli.common import (
    DataOpt,
    Device,
    DeviceOpt,
    FailOn,
    FailOnOpt,
    Format,
    FormatOpt,
    InputsOpt,
    NSamplesOpt,
    SeedOpt,
    WeightsOpt,
    emit_json,
    err,
    fail_exit_code,
    handle_errors,
)

HtmlOpt = Annotated[Path | None, typer.Option("--html", help="Write the self-contained HTML report here.")]
JsonOpt = Annotated[Path | None, typer.Option("--json", help="Write the report's JSON here.")]
ProbesOpt = Annotated[str | None, typer.Option(
    "--probes", help="Comma-separated analyses to run (default: all that apply): evaluation, "
    "spectral, hessian, landscape, mdtree, zerocost, slices.")]
SecondSeedOpt = Annotated[list[str] | None, typer.Option(
    "--second-seed", help="The same model trained from another seed (repeat once per MODEL), "
    "for the failure-mode diagnosis.")]
ArchesOpt = Annotated[list[str] | None, typer.Option(
    "--arch", help="Architecture for weights files (built-in name or package.module:factory): "
    "once for every MODEL, or once per MODEL in order.")]
ThreadsOpt = Annotated[int | None, typer.Option("--threads", help="BLAS/torch threads (default: all usable cores).")]
TrainDataOpt = Annotated[str | None, typer.Option(
    "--train-data", help="The model's training data (DATA spec), for the analyses that read it "
    "(hessian, landscape, mdtree); they use --data without it.")]
OptionOpt = Annotated[list[str] | None, typer.Option(
    "--option", "-o", help="An analysis option as PROBE.KEY=VALUE (VALUE read as JSON when it "
    "parses, else as text), e.g. -o hessian.n_samples=256; repeatable.")]
TopOpt = Annotated[int, typer.Option("--top", help="Findings to print.")]


#: What a narrow terminal keeps of the summary table, most important first.
_PRIORITY = ["name", "accuracy", "loss", "worst", "fail", "warn", "errors", "ok", "skipped"]


def _print_human(report: Any, top: int) -> None:
    from rich.console import Console

    from nndiag.cli.common import human_table

    console = Console()
    st = report.summary_table()
    cols = [c for c in st.columns if c in ("name", "worst", "fail", "warn", "errors", "ok", "skipped")
            or st[c].notna().any()]
    rows = [{c: _cell(r[c]) for c in cols} for r in st.to_dict(orient="records")]
    human_table(rows, title="nndiag diagnose", columns=cols, priority=_PRIORITY, console=console)
    if len(report.models) > 1:
        cmp = report.comparison()
        if len(cmp):
            names = [m.name for m in report.models]
            rows = [{"metric": r["name"], **{n: _cell(r[n]) for n in names}, "ρ vs accuracy": _cell(r["rho_accuracy"])}
                    for r in cmp.to_dict(orient="records")]
            human_table(rows, title="side by side (value, rank 1 = lowest)",
                        columns=["metric", *names, "ρ vs accuracy"], console=console)
    findings = report.top_findings(top)
    if not findings:
        console.print("no warnings or failures")
        return
    console.print(f"top findings ({len(findings)} of {len(report.findings('warn'))}):")
    multi = len(report.models) > 1
    for f in findings:
        where = f"{f['model']}/{f['probe']}" if multi else f["probe"]
        console.print(f"  [{f['severity'].upper()}] {f['code']} ({where}): {f['message']}", markup=False,
                      highlight=False)
        if f["recommendation"]:
            console.print(f"      → {f['recommendation']}", markup=False, highlight=False)


def _cell(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return "—" if v != v else f"{v:.4g}"
    return str(v)


def _arches(arch: list[str] | None, n: int) -> str | list[str] | None:
    from nndiag.errors import InputError

    if not arch:
        return None
    if len(arch) == 1:
        return arch[0]
    if len(arch) != n:
        raise InputError(f"got {len(arch)} --arch values for {n} models; give one for all or one per model")
    return list(arch)


def parse_options(items: list[str] | None) -> dict[str, dict[str, Any]]:
    """``["hessian.n_samples=256", ...]`` → ``{"hessian": {"n_samples": 256}}``.

    Examples
    --------
    >>> parse_options(["hessian.n_samples=256", "slices.method=spotlight"])
    {'hessian': {'n_samples': 256}, 'slices': {'method': 'spotlight'}}
    """
    import json

    from nndiag.errors import InputError

    out: dict[str, dict[str, Any]] = {}
    for item in items or []:
        key, eq, raw = item.partition("=")
        probe, dot, name = key.strip().partition(".")
        if not eq or not dot or not probe or not name.isidentifier():
            raise InputError(f"--option {item!r}: expected PROBE.KEY=VALUE, e.g. hessian.n_samples=256")
        try:
            value: Any = json.loads(raw)
        except ValueError:
            value = raw
        out.setdefault(probe, {})[name] = value
    return out


def _write_outputs(report: Any, html: Path | None, json_path: Path | None) -> list[str]:
    """Write the JSON first (cheap, no figures), then the HTML; return what failed."""
    problems = []
    if json_path is not None:
        try:
            report.save_json(json_path)
            err(f"wrote {json_path}")
        except OSError as exc:
            problems.append(f"{json_path}: {exc}")
    if html is not None:
        try:
            report.save_html(html)
            err(f"wrote {html}")
        except Exception as exc:  # figures or disk: the JSON above is already safe
            problems.append(f"{html}: {type(exc).__name__}: {exc}")
    return problems


def _finish(report: Any, html: Path | None, json_out: Path | None, fmt: Format, top: int, fail_on: FailOn) -> int:
    """Write the requested files, print the report, and return the exit code."""
    problems = _write_outputs(report, html, json_out)
    if fmt is Format.json:
        emit_json(report.to_dict())
    else:
        _print_human(report, top)
    for p in problems:
        err(f"nndiag: error: could not write {p}")
    return 2 if problems else fail_exit_code(report.severities(), fail_on)


def register(app: typer.Typer) -> None:
    @app.command("diagnose")
    @handle_errors
    def diagnose_cmd(
        models: list[str] = typer.Argument(..., help="One or more models (file, folder, factory or "
                                           "built-in name); several are compared side by side."),
        data: DataOpt = None,
        train_data: TrainDataOpt = None,
        n_samples: NSamplesOpt = None,
        probes: ProbesOpt = None,
        html: HtmlOpt = None,
        json_out: JsonOpt = None,
        second_seed: SecondSeedOpt = None,
        arch: ArchesOpt = None,
        weights: WeightsOpt = None,
        fail_on: FailOnOpt = FailOn.never,
        fmt: FormatOpt = Format.human,
        device: DeviceOpt = Device.auto,
        seed: SeedOpt = 0,
        threads: ThreadsOpt = None,
        option: OptionOpt = None,
        top: TopOpt = 10,
        inputs: InputsOpt = "auto",
    ) -> int:
        """Run every analysis that applies and write one report: what is wrong, how sure, what to change."""
        from nndiag._utils.files import check_writable
        from nndiag.errors import InputError
        from nndiag.report.diagnose import diagnose, parse_probes
        from nndiag.report.input_scale import INPUTS

        parse_probes(probes)  # bad names fail before any work
        if inputs not in INPUTS:
            raise InputError(f"--inputs {inputs}: choose one of {', '.join(INPUTS)}")
        options = parse_options(option)
        for p in (html, json_out):
            if p is not None:
                check_writable(p)
        latest: dict[str, Any] = {}

        def on_update(rep: Any) -> None:
            latest["report"] = rep
            if json_out is not None:
                try:
                    rep.save_json(json_out)
                except OSError:  # pragma: no cover - reported when the final write fails
                    pass

        try:
            report = diagnose(models, data=data, train_data=train_data, probes=probes, arch=_arches(arch, len(models)),
                              weights=weights,
                              second_seed=second_seed or None, n_samples=n_samples, seed=seed,
                              device=device.value, threads=threads, options=options,
                              on_update=on_update, inputs=inputs)
        except KeyboardInterrupt:
            partial = latest.get("report")
            if partial is not None:
                err("interrupted: writing the report of what finished")
                _write_outputs(partial, html, json_out)
            raise typer.Exit(130) from None
        return _finish(report, html, json_out, fmt, top, fail_on)

    @app.command("report")
    @handle_errors
    def report_cmd(
        source: Path = typer.Argument(..., help="A report saved by `nndiag diagnose` (.json, or an "
                                      "HTML report, which embeds its JSON)."),
        html: HtmlOpt = None,
        json_out: JsonOpt = None,
        fail_on: FailOnOpt = FailOn.never,
        fmt: FormatOpt = Format.human,
        top: TopOpt = 10,
    ) -> int:
        """Re-render a saved report (HTML and/or JSON) without recomputing anything."""
        from nndiag._utils.files import check_writable
        from nndiag.report.report import Report

        for p in (html, json_out):
            if p is not None:
                check_writable(p)
        report = Report.load(source)
        return _finish(report, html, json_out, fmt, top, fail_on)
