"""Device selection."""

from __future__ import annotations

import torch

from nndiag.errors import InputError

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """Turn ``"auto" | "cpu" | "cuda[:i]"`` into a ``torch.device``.

    ``auto`` picks CUDA when it is available, else the CPU.
    """
    if isinstance(device, torch.device):
        return device
    spec = (device or "auto").lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError(f"device '{device}' requested but CUDA is not available; use cpu or auto")
        return torch.device(spec)
    raise InputError(f"unknown device '{device}'; choose one of {', '.join(DEVICES)}")


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of a model's first parameter or buffer (CPU when it has none)."""
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")
