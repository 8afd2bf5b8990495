"""Reading PyTorch checkpoint files safely (``weights_only=True`` only)."""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from nndiag.errors import ModelLoadError

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".th", ".bin", ".ckpt")
NESTED_KEYS = ("state_dict", "model_state_dict", "model_state", "model", "module", "net", "network")
_PREFIXES = ("module.", "_orig_mod.", "model.")


def _is_tensor_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) for k in obj)
        and any(isinstance(v, torch.Tensor) for v in obj.values())
    )


def unwrap_state_dict(obj: Any, path: str = "<object>") -> dict[str, torch.Tensor]:
    """Find the state dict inside a loaded checkpoint object.

    Handles a bare state dict, one nested under a common key (``state_dict``,
    ``model``, ``model_state``...), and ``module.`` / ``_orig_mod.`` prefixes left by
    ``DataParallel`` and ``torch.compile``.

    Raises
    ------
    ModelLoadError
        When no mapping of names to tensors is found.
    """
    sd = None
    if isinstance(obj, Mapping):
        for key in NESTED_KEYS:
            if key in obj and _is_tensor_dict(obj[key]):
                sd = obj[key]
                break
        if sd is None and _is_tensor_dict(obj):
            sd = obj
    if sd is None:
        kind = type(obj).__name__
        keys = ", ".join(list(map(str, obj.keys()))[:6]) if isinstance(obj, Mapping) else ""
        hint = f" (top-level keys: {keys})" if keys else ""
        raise ModelLoadError(f"{path}: no state dict of tensors found in this {kind}{hint}")
    out = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    for prefix in ("module.", "_orig_mod."):
        if out and all(k.startswith(prefix) for k in out):
            out = {k[len(prefix):]: v for k, v in out.items()}
    return out


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a checkpoint file with ``weights_only=True`` and return its state dict.

    Parameters
    ----------
    path : str or Path
        A ``.pt/.pth/.th/.bin/.ckpt`` file (zip or legacy pickle format).

    Raises
    ------
    ModelLoadError
        Empty, truncated or corrupt file, a pickle that needs arbitrary code
        (nndiag never turns ``weights_only`` off), or no tensors inside.
    """
    p = Path(path)
    if not p.is_file():
        raise ModelLoadError(f"{p}: no such file")
    if p.stat().st_size == 0:
        raise ModelLoadError(f"{p}: file is empty")
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        msg = str(exc)
        if "weights_only" in msg or "Weights only" in msg:
            raise ModelLoadError(
                f"{p}: refused: this pickle runs arbitrary code when loaded (not a plain weights file); "
                "save a state_dict instead (torch.save(model.state_dict(), ...))"
            ) from None
        raise ModelLoadError(f"{p}: corrupt checkpoint ({msg.splitlines()[0]})") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, AttributeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelLoadError(f"{p}: truncated or corrupt checkpoint ({first})") from None
    return unwrap_state_dict(obj, str(p))
