"""``nndiag layers MODEL``: every weight tensor and whether analyses use it."""

from __future__ import annotations

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
        summary = {
            "model": lm.name,
            "origin": lm.origin,
            "tensors": len(df),
            "parameters": int(df.loc[df["kind"] != "buffer", "params"].sum()) if len(df) else 0,
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
