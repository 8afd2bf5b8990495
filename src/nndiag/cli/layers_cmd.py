"""``nndiag layers MODEL``: every weight tensor and whether analyses use it."""

from __future__ import annotations

import re

import typer

from nndiag.cli.common import (
    ArchOpt,
    Device,
    DeviceOpt,
    Format,
    FormatOpt,
    SeedOpt,
    WeightsOpt,
    emit_json,
    handle_errors,
    human_table,
)


def _computed_from(piece: str) -> str:
    """The tensor a parametrisation piece computes: ``A.parametrizations.weight.original0`` and
    (the deprecated ``weight_norm``) ``A.weight_g`` → ``A.weight``."""
    m = re.match(r"(.*)\.parametrizations\.([^.]+)\.original\d*$", piece)
    return f"{m[1]}.{m[2]}" if m else re.sub(r"_[gv]$", "", piece)


def register(app: typer.Typer) -> None:
    @app.command("layers")
    @handle_errors
    def layers(
        model: str = typer.Argument(..., help="Model: file, folder, package.module:factory or built-in name."),
        arch: ArchOpt = None,
        weights: WeightsOpt = None,
        fmt: FormatOpt = Format.human,
        device: DeviceOpt = Device.auto,
        seed: SeedOpt = 0,
    ) -> int:
        """List every weight tensor: name, kind, shape, parameters, used by analyses and why not."""
        from nndiag._utils.device import resolve_device
        from nndiag.io.layers import describe_layers
        from nndiag.io.models import load_model
        from nndiag.report.results import Result, provenance

        dev = resolve_device(device.value)
        lm = load_model(model, weights=weights, arch=arch)
        df = describe_layers(lm)
        # a parametrised tensor is listed as analysed, but its parameters are its pieces
        # (``A.parametrizations.weight.original0/1`` or ``A.weight_g/_v`` hold what ``A.weight``
        # is computed from)
        pieces = df.loc[df["kind"] == "parametrization", "name"] if len(df) else []
        computed = {_computed_from(n) for n in pieces}
        stored = ~df["name"].isin(computed) & (df["kind"] != "buffer") if len(df) else None
        summary = {
            "model": lm.name,
            "origin": lm.origin,
            "tensors": len(df),
            "parameters": int(df.loc[stored, "params"].sum()) if len(df) else 0,
            "used": int(df["used"].sum()) if len(df) else 0,
            "runnable": lm.module is not None,
        }
        result = Result("layers", tables={"layers": df}, summary=summary,
                        params={"model": model, "arch": arch, "weights": weights}, seed=seed,
                        meta=provenance(str(dev)))
        if fmt is Format.json:
            emit_json(result.to_dict())
            return 0
        human_table(df.to_dict(orient="records"), title=f"{lm.name} ({lm.origin})")
        typer.echo(f"{summary['tensors']} tensors, {summary['parameters']:,} parameters, "
                   f"{summary['used']} used by the weight-spectrum analysis")
        return 0
