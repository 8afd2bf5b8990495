"""``nndiag spectral MODEL``: data-free weight-spectrum diagnosis (WeightWatcher's metrics)."""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Any

import typer

from nndiag.cli.common import (
    ArchOpt,
    Device,
    DeviceOpt,
    FailOn,
    FailOnOpt,
    Format,
    FormatOpt,
    SeedOpt,
    WeightsOpt,
    emit_json,
    err,
    fail_exit_code,
    handle_errors,
    human_table,
)


class ConvMode(str, Enum):
    ww = "ww"
    unfold = "unfold"


class Conventions(str, Enum):
    nndiag = "nndiag"
    ww = "ww"


class FixFingers(str, Enum):
    none = "none"
    xmin_peak = "xmin_peak"
    clip_xmax = "clip_xmax"


ConvModeOpt = Annotated[ConvMode, typer.Option(
    "--conv-mode", help="Conv kernels: per kernel position, pooled (ww) or unfolded out×(in·k·k).")]
ConventionsOpt = Annotated[Conventions, typer.Option(
    "--conventions", help="ww reproduces WeightWatcher 0.7.7's numbers (conv2d eigenvalues ×0.5).")]
MPOpt = Annotated[bool, typer.Option("--mp-fit", help="Add the Marchenko–Pastur fit columns.")]
RandomizeOpt = Annotated[bool, typer.Option(
    "--randomize", help="Compare with element-shuffled weights (rand_distance, num_traps).")]
FixFingersOpt = Annotated[FixFingers, typer.Option("--fix-fingers", help="Finite-size tail fix.")]
TPLOpt = Annotated[bool, typer.Option("--tpl", help="Also fit a truncated power law.")]
MinEvalsOpt = Annotated[int, typer.Option("--min-evals", help="Skip layers with fewer eigenvalues.")]
MaxEvalsOpt = Annotated[int, typer.Option("--max-evals", help="Skip layers with more eigenvalues (0 = no limit).")]

_SHOWN = ["name", "N", "M", "num_evals", "alpha", "D", "xmin", "lambda_max", "log_norm",
          "stable_rank", "entropy", "warning", "status"]
#: Most important first: what a narrow terminal keeps.
_PRIORITY = ["name", "alpha", "warning", "status", "D", "lambda_max", "log_norm", "stable_rank", "N", "M",
             "xmin", "entropy", "num_evals"]


_COMPARED = ["name", "alpha_base", "alpha_other", "delta_alpha", "rel_change", "alpha_delta",
             "log_spectral_norm_delta"]


def _compare(base: Any, other: Any, options: dict[str, Any], fmt: Format) -> int:
    """``nndiag spectral BASE --compare OTHER``: the layers sorted by how much alpha moved."""
    from nndiag.spectral.compare import compare

    res = compare(base, other, **options)
    if fmt is Format.json:
        emit_json(res.to_dict())
        return 0
    df = res.tables["layers"]
    order = df["delta_alpha"].abs().sort_values(ascending=False, na_position="last").index
    human_table(df.loc[order, _COMPARED].to_dict(orient="records"),
                title=f"{base.name} → {other.name}: weight spectra compared (largest alpha shifts first)",
                priority=["name", "delta_alpha", "rel_change"])
    s = res.summary
    mean = s.get("mean_delta_alpha")
    typer.echo(f"{s['num_layers']} layers in both; mean Δalpha {mean:+.3f}; {s['num_unchanged']} unchanged"
               if mean is not None else f"{s['num_layers']} layers in both; no valid fits to compare")
    return 0


def register(app: typer.Typer) -> None:
    @app.command("spectral")
    @handle_errors
    def spectral(
        model: str = typer.Argument(..., help="Model: file, folder, package.module:factory or built-in name."),
        arch: ArchOpt = None,
        weights: WeightsOpt = None,
        conv_mode: ConvModeOpt = ConvMode.ww,
        conventions: ConventionsOpt = Conventions.nndiag,
        mp: MPOpt = False,
        randomize: RandomizeOpt = False,
        fix_fingers: FixFingersOpt = FixFingers.none,
        tpl: TPLOpt = False,
        min_evals: MinEvalsOpt = 8,
        max_evals: MaxEvalsOpt = 15000,
        plots: Annotated[str | None, typer.Option("--plots", help="Write PNG figures to this folder.")] = None,
        fmt: FormatOpt = Format.human,
        device: DeviceOpt = Device.auto,
        seed: SeedOpt = 0,
        fail_on: FailOnOpt = FailOn.never,
        other: Annotated[str | None, typer.Option(
            "--compare", help="Another checkpoint or folder of the same architecture (e.g. the fine-tuned "
                              "model): per-layer alpha shifts and the spectra of ΔW.")] = None,
    ) -> int:
        """Judge each layer from the eigenvalue spectrum of its weights, without data."""
        from nndiag._utils.device import resolve_device
        from nndiag.io.models import load_model
        from nndiag.spectral.analyze import analyze

        dev = resolve_device(device.value)
        lm = load_model(model, weights=weights, arch=arch)
        options = dict(
            conv_mode=conv_mode.value, conventions=conventions.value, mp_fit=mp,
            randomize=randomize,
            fix_fingers=None if fix_fingers is FixFingers.none else fix_fingers.value,
            fit="TPL" if tpl else "PL", min_evals=min_evals, max_evals=max_evals or None,
            seed=seed, device=dev,
        )
        if other is not None:
            return _compare(lm, load_model(other), options, fmt)
        if plots:
            from nndiag._utils.files import check_folder

            check_folder(plots, "--plots folder")
        res = analyze(lm, **options)
        if plots:
            from nndiag.spectral.probe import save_figures

            written = save_figures(res, plots)
            err(f"wrote {len(written)} figures to {plots}")
        if fmt is Format.json:
            emit_json(res.to_dict())
        else:
            df = res.layers
            cols = [c for c in _SHOWN if c in df.columns]
            human_table(df[cols].to_dict(orient="records"), title=f"{lm.name}: weight spectra",
                        priority=_PRIORITY)
            s = res.summary
            alpha = s.get("alpha")
            typer.echo(
                f"{s['layers_analysed']} layers analysed, {s['layers_skipped']} tensors skipped; "
                f"mean alpha {alpha:.3f} over {s['layers_analysed'] - s['num_fits_failed']} fits"
                if alpha is not None else f"{s['layers_analysed']} layers analysed, no valid fit")
            for f in res.findings:
                typer.echo(f"[{f.severity}] {f.code}: {f.message}")
        return fail_exit_code([f.severity for f in res.findings], fail_on)
