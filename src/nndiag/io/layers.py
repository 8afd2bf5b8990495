"""Describe every weight tensor of a model and whether analyses will use it.

The ``used``/``reason`` columns follow the weight-spectrum selection rules
(:func:`classify_tensor`); ``nndiag layers`` prints this table.
"""

from __future__ import annotations

import pandas as pd

from nndiag.io.models import LoadedModel
from nndiag.io.tensors import TensorInfo

_NORM_HINTS = ("norm", "bn", "ln_", ".ln", "layernorm", "batchnorm", "groupnorm")
_NORM_TYPES = ("BatchNorm", "LayerNorm", "GroupNorm", "InstanceNorm", "RMSNorm", "LocalResponseNorm")
_BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")
MIN_EVALS = 8


def tensor_kind(info: TensorInfo) -> str:
    """A short kind for a tensor: ``linear``, ``conv1d/2d/3d``, ``embedding``, ``norm``, ``bias``, ``buffer``..."""
    leaf = info.name.rsplit(".", 1)[-1]
    mt = info.module_type or ""
    if leaf in _BUFFER_SUFFIXES:
        return "buffer"
    if any(mt.startswith(t) for t in _NORM_TYPES):
        return "norm"
    if mt == "Embedding" or (not mt and "embed" in info.name.lower() and len(info.shape) == 2):
        return "embedding"
    if mt == "MultiheadAttention" and leaf == "in_proj_weight":
        return "attention-qkv"
    if len(info.shape) <= 1:
        lname = info.name.lower()
        if not mt and any(h in lname for h in _NORM_HINTS):
            return "norm"
        return "bias" if leaf.endswith("bias") else "vector"
    if mt == "Conv1D":  # Hugging Face GPT-2 style (in, out) matrix
        return "linear"
    if len(info.shape) == 2:
        return "linear"
    if len(info.shape) in (3, 4, 5):
        return f"conv{len(info.shape) - 2}d"
    return f"tensor{len(info.shape)}d"


def classify_tensor(info: TensorInfo, min_evals: int = MIN_EVALS) -> tuple[bool, str]:
    """Whether the weight-spectrum analysis uses a tensor, and why not.

    Returns
    -------
    (used, reason)
        ``reason`` is empty when used.
    """
    kind = tensor_kind(info)
    if kind == "buffer":
        return False, "buffer (not a weight)"
    if kind == "norm":
        return False, "normalisation layer parameter"
    if kind in ("bias", "vector"):
        return False, "1-D tensor"
    if not (info.dtype.startswith("float") or info.dtype.startswith("bfloat")):
        return False, f"non-float dtype {info.dtype}"
    if kind.startswith("tensor"):
        return False, f"unsupported {len(info.shape)}-D tensor"
    m = min(info.shape[0], info.shape[1])
    if kind.startswith("conv"):
        rf = 1
        for s in info.shape[2:]:
            rf *= int(s)
        n_evals = m * rf
    else:
        n_evals = m
    if n_evals < min_evals:
        return False, f"too few eigenvalues ({n_evals} < {min_evals})"
    return True, ""


def describe_layers(model: LoadedModel) -> pd.DataFrame:
    """One row per tensor: ``name, kind, shape, dtype, params, used, reason``."""
    rows = []
    for info in model.tensors.infos():
        used, reason = classify_tensor(info)
        rows.append(
            {
                "name": info.name,
                "kind": tensor_kind(info),
                "shape": "×".join(str(s) for s in info.shape) or "scalar",
                "dtype": info.dtype,
                "params": info.numel,
                "used": used,
                "reason": reason,
            }
        )
    return pd.DataFrame(rows, columns=["name", "kind", "shape", "dtype", "params", "used", "reason"])
