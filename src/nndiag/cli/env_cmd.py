"""``nndiag env``: versions, threads and devices."""

from __future__ import annotations

import importlib.metadata as md
from typing import Any

import typer

from nndiag.cli.common import Device, DeviceOpt, Format, FormatOpt, SeedOpt, emit_json, handle_errors, human_table

_PACKAGES = ("torch", "numpy", "scipy", "pandas", "scikit-learn", "matplotlib", "safetensors",
             "onnx", "transformers", "mnist1d", "typer", "rich", "threadpoolctl")


def environment() -> dict[str, Any]:
    """Versions of nndiag and its dependencies, thread settings and devices."""
    import os
    import platform

    import torch

    import nndiag
    from nndiag._utils.threads import default_threads

    versions = {}
    for p in _PACKAGES:
        try:
            versions[p] = md.version(p)
        except md.PackageNotFoundError:
            versions[p] = None
    try:
        from threadpoolctl import threadpool_info

        blas = [{"api": i.get("internal_api"), "threads": i.get("num_threads")} for i in threadpool_info()]
    except Exception:  # pragma: no cover
        blas = []
    cuda = torch.cuda.is_available()
    return {
        "nndiag": nndiag.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": versions,
        "threads": {
            "cpu_count": os.cpu_count(),
            "nndiag_default": default_threads(),
            "torch_intra_op": torch.get_num_threads(),
            "blas": blas,
        },
        "devices": {
            "cuda_available": cuda,
            "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        },
    }


def register(app: typer.Typer) -> None:
    @app.command("env")
    @handle_errors
    def env(fmt: FormatOpt = Format.human, device: DeviceOpt = Device.auto, seed: SeedOpt = 0) -> int:
        """Print versions, thread settings and available devices."""
        from nndiag._utils.device import resolve_device

        info = environment()
        info["device"] = str(resolve_device(device.value))
        if fmt is Format.json:
            emit_json(info)
            return 0
        rows = [{"item": "nndiag", "value": info["nndiag"]}, {"item": "python", "value": info["python"]}]
        rows += [{"item": k, "value": v or "not installed"} for k, v in info["packages"].items()]
        t = info["threads"]
        rows += [{"item": "cpu count", "value": t["cpu_count"]},
                 {"item": "threads used", "value": t["nndiag_default"]},
                 {"item": "cuda", "value": ", ".join(info["devices"]["cuda_devices"]) or "not available"}]
        human_table(rows, title="nndiag environment")
        return 0
