"""``nndiag data DATA``: what a DATA spec loads (size, shape, classes)."""

from __future__ import annotations

import typer

from nndiag.cli.common import (
    Device,
    DeviceOpt,
    Format,
    FormatOpt,
    NSamplesOpt,
    SeedOpt,
    emit_json,
    handle_errors,
    human_table,
)


def register(app: typer.Typer) -> None:
    @app.command("data")
    @handle_errors
    def data(
        spec: str = typer.Argument(
            ..., help="DATA spec: digits, mnist1d, FILE.npz or an image folder (?split=&normalize=&flatten=)."
        ),
        n_samples: NSamplesOpt = None,
        seed: SeedOpt = 0,
        fmt: FormatOpt = Format.human,
        device: DeviceOpt = Device.auto,
    ) -> int:
        """Describe a data set: examples, input shape, classes and their counts."""
        import torch

        from nndiag._utils.device import resolve_device
        from nndiag.io.data import load_data

        resolve_device(device.value)  # validates the choice; the data stays on the CPU

        d = load_data(spec, n_samples=n_samples, seed=seed)
        counts = torch.bincount(d.y, minlength=d.num_classes).tolist()
        info = {
            "name": d.name,
            "n_samples": len(d),
            "input_shape": list(d.input_shape),
            "x_dtype": str(d.x.dtype).removeprefix("torch."),  # int64: token ids or integer features
            "num_classes": d.num_classes,
            "class_counts": counts,
            "x_min": float(d.x.min()),
            "x_max": float(d.x.max()),
            "meta": d.meta,
        }
        if fmt is Format.json:
            emit_json(info)
            return 0
        human_table([{"item": k, "value": v} for k, v in info.items()], title=f"data: {spec}")
        return 0
