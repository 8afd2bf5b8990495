"""``nndiag smooth MODEL --out FILE``: SVD smoothing or sharpening of the weights, written to a new file."""

from __future__ import annotations

from enum import Enum
from typing import Annotated

import typer

from nndiag.cli.common import (
    ArchOpt,
    Device,
    DeviceOpt,
    Format,
    FormatOpt,
    WeightsOpt,
    emit_json,
    err,
    handle_errors,
    human_table,
)
from nndiag.cli.spectral_cmd import Conventions, ConventionsOpt, ConvMode, ConvModeOpt


class Method(str, Enum):
    detx = "detx"
    lambda_min = "lambda_min"
    rmt = "rmt"
    auto = "auto"
    percent = "percent"
    sharpen = "sharpen"


_SHOWN = ["name", "rule", "num_evals", "alpha", "kept", "removed", "energy_kept", "rel_change", "status", "reason"]
_PRIORITY = ["name", "kept", "removed", "rel_change", "status", "rule", "energy_kept", "alpha", "num_evals", "reason"]


def register(app: typer.Typer) -> None:
    @app.command("smooth")
    @handle_errors
    def smooth_cmd(
        model: str = typer.Argument(..., help="Model: file, folder, package.module:factory or built-in name."),
        out: str = typer.Option(..., "--out", help="Write the transformed weights here "
                                                   "(.safetensors, .pt, .pth or .bin)."),
        method: Annotated[Method, typer.Option(
            "--method", help="Components kept per layer: detx (det X = 1), lambda_min (the power-law tail), "
                             "rmt (spikes above the Marchenko–Pastur bulk), auto (rmt where alpha > 6, else "
                             "detx), percent; sharpen clips correlation traps (large entries) instead.")] = Method.detx,
        percent: Annotated[float, typer.Option("--percent", help="Fraction kept by --method percent.")] = 0.8,
        arch: ArchOpt = None,
        weights: WeightsOpt = None,
        conv_mode: ConvModeOpt = ConvMode.ww,
        conventions: ConventionsOpt = Conventions.nndiag,
        fmt: FormatOpt = Format.human,
        device: DeviceOpt = Device.auto,
    ) -> int:
        """Keep the spectrally significant part of each weight matrix (WeightWatcher's SVD smoothing)."""
        from nndiag._utils.device import resolve_device
        from nndiag._utils.files import check_writable
        from nndiag.io.models import load_model
        from nndiag.spectral.smoothing import SAVE_SUFFIXES, smooth

        check_writable(out, SAVE_SUFFIXES, "--out file")  # before any work
        lm = load_model(model, weights=weights, arch=arch)
        res = smooth(lm, method.value, percent=percent, conv_mode=conv_mode.value,
                     conventions=conventions.value, device=resolve_device(device.value))
        path = res.save(out)
        if fmt is Format.json:
            emit_json(res.to_dict())
        else:
            df = res.layers
            human_table(df[_SHOWN].to_dict(orient="records"), title=f"{lm.name}: SVD {method.value}",
                        priority=_PRIORITY)
            s = res.summary
            rel = s["mean_rel_change"]
            typer.echo(f"{s['layers_changed']} layers changed, {s['layers_unchanged']} unchanged, "
                       f"{s['layers_skipped']} skipped"
                       + (f"; mean ‖ΔW‖/‖W‖ {rel:.3f}" if rel is not None else ""))
        err(f"wrote {path}")
        return 0
