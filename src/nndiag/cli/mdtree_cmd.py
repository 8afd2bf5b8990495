"""``nndiag mdtree benchmark|diagnose`` and ``nndiag zoo build``: failure-mode diagnosis."""

from __future__ import annotations

import typer

from nndiag.cli.common import (
    ArchOpt,
    Format,
    FormatOpt,
    SeedOpt,
    emit_json,
    err,
    handle_errors,
    human_table,
)

mdtree_app = typer.Typer(help="MD tree failure-mode diagnosis (Zhou et al., ICML 2024).",
                         no_args_is_help=True)
zoo_app = typer.Typer(help="Model zoos for fitting and validating the MD tree.", no_args_is_help=True)


@mdtree_app.command("benchmark")
@handle_errors
def benchmark(
    directory: str = typer.Argument(
        ..., help="Folder with dataframe_normal_public.csv and dataframe_noise_public.csv."),
    fmt: FormatOpt = Format.human,
) -> int:
    """Reproduce the paper's five cases: MD tree vs validation and hyper-parameter baselines."""
    from nndiag.diagnosis.benchmark import run_benchmark

    res = run_benchmark(directory)
    table = res.table("cases")
    if fmt is Format.json:
        emit_json([
            {"case": int(r["case"]), "name": r["name"], "mdtree": r["mdtree"], "validation": r["validation"],
             "hyperparameter": r["hyperparameter"], "mdtree_improved": r["mdtree_improved"],
             "paper": {"mdtree": r["paper_mdtree"], "validation": r["paper_validation"],
                       "hyperparameter": r["paper_hyperparameter"]}}
            for r in table.to_dict(orient="records")
        ])
        return 0
    rows = [{"case": int(r["case"]), "MD tree": round(r["mdtree"], 2), "paper": r["paper_mdtree"],
             "valid.": round(r["validation"], 2), "paper ": r["paper_validation"],
             "hyper.": round(r["hyperparameter"], 2), "paper  ": r["paper_hyperparameter"],
             "improved": round(r["mdtree_improved"], 2)}
            for r in table.to_dict(orient="records")]
    human_table(rows, title="MD tree reproduction: test accuracy (%), mean of 5 seeds")
    for r in table.to_dict(orient="records"):
        typer.echo(f"case {r['case']}: {r['description']}")
    return 0


def _ints(text: str, what: str) -> tuple[int, ...]:
    from nndiag.errors import InputError

    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise InputError(f"{what} must be comma-separated integers, got '{text}'") from None


def _floats(text: str, what: str) -> tuple[float, ...]:
    from nndiag.errors import InputError

    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise InputError(f"{what} must be comma-separated numbers, got '{text}'") from None


@mdtree_app.command("diagnose")
@handle_errors
def diagnose(
    model: str = typer.Argument(..., help="The model: checkpoint, built-in name or package.module:factory."),
    data: str = typer.Option(..., "--data", help="The model's TRAINING data (DATA spec)."),
    second_seed: str = typer.Option(..., "--second-seed", help="The same model trained from another seed."),
    arch: ArchOpt = None,
    thresholds: str | None = typer.Option(None, "--thresholds", help="Thresholds file (default: the shipped one)."),
    curve: str = typer.Option("bezier", "--curve", help="Connectivity path: bezier, or linear (cheap fallback)."),
    curve_epochs: int = typer.Option(5, "--curve-epochs", help="Bezier curve training epochs."),
    hessian_samples: int = typer.Option(200, "--hessian-samples", help="Examples for the Hessian features."),
    max_samples: int | None = typer.Option(None, "--max-samples", help="Seeded subset for error, CKA and curve."),
    threads: int | None = typer.Option(None, "--threads", help="BLAS/torch threads."),
    fmt: FormatOpt = Format.human,
    seed: SeedOpt = 0,
) -> int:
    """Diagnose a disappointing model: temperature too small/large, model too small or too little data."""
    from nndiag.diagnosis.api import diagnose_failure
    from nndiag.io.data import load_data
    from nndiag.io.models import load_model

    lm = load_model(model, arch=arch, hf_module=True)
    second = load_model(second_seed, arch=arch, hf_module=True)
    bundle = load_data(data)
    res = diagnose_failure(lm, second, bundle, thresholds=thresholds, curve=curve, curve_epochs=curve_epochs,
                           hessian_samples=hessian_samples, max_samples=max_samples, seed=seed, threads=threads)
    if fmt is Format.json:
        emit_json(res.to_dict())
        return 0
    s = res.summary
    typer.echo(f"failure mode:   {s['failure_mode']}")
    typer.echo(f"recommendation: {s['recommendation']}")
    typer.echo(f"confidence:     {s['confidence']:.2f}")
    human_table(res.table("features").to_dict(orient="records"), title="features")
    human_table(res.table("questions").drop(columns=["thresholds", "features"]).to_dict(orient="records"),
                title="MD tree questions")
    for f in res.findings[1:]:
        err(f"{f.code}: {f.message}")
    return 0


@zoo_app.command("build")
@handle_errors
def zoo_build(
    directory: str = typer.Argument(..., help="Output folder (a rerun resumes it)."),
    dataset: str = typer.Option("digits", "--dataset", help="digits or mnist1d."),
    widths: str = typer.Option("4,8,16,32,64", "--widths", help="MLP hidden widths."),
    batch_sizes: str = typer.Option("8,16,32,64,128,256,512", "--batch-sizes", help="SGD batch sizes."),
    data_fractions: str = typer.Option("0.25,0.5,1.0", "--data-fractions", help="Fractions of the train split."),
    seeds: str = typer.Option("0,1", "--seeds", help="Training seeds (two or more)."),
    epochs: int = typer.Option(30, "--epochs"),
    lr: float = typer.Option(0.1, "--lr"),
    momentum: float = typer.Option(0.9, "--momentum"),
    label_noise: float = typer.Option(0.0, "--label-noise", help="Fraction of training labels flipped."),
    jobs: int = typer.Option(1, "--jobs", help="Worker processes (one thread each)."),
    limit: int | None = typer.Option(None, "--limit", help="Train at most this many new configurations."),
    fmt: FormatOpt = Format.human,
) -> int:
    """Train a grid of small models (batch size x width x data, >= 2 seeds) with MD tree features."""
    import json
    from pathlib import Path

    from nndiag.diagnosis.zoo import CONFIG, ZooConfig, build_zoo

    existing = Path(directory) / CONFIG
    cfg = None
    if not existing.is_file():
        cfg = ZooConfig(dataset=dataset, widths=_ints(widths, "--widths"),
                        batch_sizes=_ints(batch_sizes, "--batch-sizes"),
                        data_fractions=_floats(data_fractions, "--data-fractions"),
                        seeds=_ints(seeds, "--seeds"), epochs=epochs, lr=lr, momentum=momentum,
                        label_noise=label_noise)
    else:
        err(f"resuming the zoo in {directory} with its stored configuration")
    df = build_zoo(directory, cfg, jobs=jobs, limit=limit)
    total = len(ZooConfig.from_dict(json.loads(existing.read_text())).grid())
    if fmt is Format.json:
        from nndiag.report.results import table_to_records

        emit_json({"directory": directory, "done": len(df), "total": total, "rows": table_to_records(df)})
        return 0
    typer.echo(f"{len(df)} of {total} configurations done in {directory}")
    if "bs_failure" in df.columns:
        for col in ("bs_failure", "width_vs_batch", "data_vs_batch"):
            counts = df[col].value_counts().to_dict()
            typer.echo(f"{col}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return 0


@zoo_app.command("fit")
@handle_errors
def zoo_fit(
    directory: str = typer.Argument(..., help="A complete zoo folder."),
    out: str = typer.Option(..., "--out", help="Where to write the thresholds JSON."),
    method: str = typer.Option("exact", "--method", help="paper (bounded Brent) or exact."),
    fmt: FormatOpt = Format.human,
) -> int:
    """Fit MD tree thresholds on a zoo (for mdtree diagnose --thresholds)."""
    from nndiag.diagnosis.shipped import fit_threshold_set
    from nndiag.diagnosis.zoo import zoo_frame
    from nndiag.errors import DataError

    df = zoo_frame(directory)
    if "bs_failure" not in df.columns:
        raise DataError(f"{directory}: the zoo grid is incomplete; finish it with 'nndiag zoo build'")
    ts = fit_threshold_set(df, method=method, meta={"zoo": directory})
    ts.save(out)
    if fmt is Format.json:
        emit_json(ts.to_dict())
        return 0
    for q, tree in ts.trees.items():
        typer.echo(f"{q}: thresholds {[round(t, 4) for t in tree.thresholds]} "
                   f"(train accuracy {100 * tree.train_accuracy:.1f}%)")
    typer.echo(f"written to {out}")
    return 0


def register(app: typer.Typer) -> None:
    """Add ``mdtree`` and ``zoo`` to the root app."""
    app.add_typer(mdtree_app, name="mdtree")
    app.add_typer(zoo_app, name="zoo")

