"""Describe every weight tensor of a model and whether analyses will use it.

The ``used``/``reason`` columns come from the weight-spectrum selection rules
(:func:`nndiag.spectral.matrices.plan_layers`, the single source of truth, also used by
:func:`nndiag.spectral.analyze`); ``nndiag layers`` prints this table.
"""

from __future__ import annotations

import pandas as pd

from nndiag.io.models import LoadedModel, hf_config
from nndiag.io.tensors import TensorInfo
from nndiag.spectral.matrices import MIN_EVALS, grouped_qkv, plan_layers, tensor_kind

__all__ = ["MIN_EVALS", "classify_tensor", "describe_layers", "tensor_kind"]


def classify_tensor(info: TensorInfo, min_evals: int = MIN_EVALS, conv_mode: str = "ww",
                    context: list[TensorInfo] | None = None) -> tuple[bool, str]:
    """Whether the weight-spectrum analysis uses a tensor, and why not.

    Parameters
    ----------
    info : TensorInfo
        The tensor.
    min_evals : int
        Smallest number of eigenvalues analysed.
    conv_mode : {"ww", "unfold"}
        Convolution layout (changes the eigenvalue count of conv kernels).
    context : list of TensorInfo, optional
        The model's other tensors (needed to pair LoRA factors).

    Returns
    -------
    (used, reason)
        ``reason`` is empty when used.
    """
    infos = list(context) if context is not None else [info]
    if all(i.name != info.name for i in infos):
        infos.append(info)
    specs, reasons = plan_layers(infos, conv_mode=conv_mode, min_evals=min_evals)
    if info.name in reasons:
        return False, reasons[info.name]
    return any(s.tensor == info.name for s in specs), ""


def describe_layers(model: LoadedModel, conv_mode: str = "ww") -> pd.DataFrame:
    """One row per tensor: ``name, kind, shape, dtype, params, used, reason``."""
    infos = model.tensors.infos()
    # (the same plan as the spectral analysis, fused Q/K/V layout from the config included)
    specs, reasons = plan_layers(infos, conv_mode=conv_mode,
                                 qkv_layout=grouped_qkv(hf_config(model.module, model.meta)))
    used_tensors = {s.tensor for s in specs}
    rows = []
    for info in infos:
        rows.append(
            {
                "name": info.name,
                "kind": tensor_kind(info),
                "shape": "×".join(str(s) for s in info.shape) or "scalar",
                "dtype": info.dtype,
                "params": 0 if info.computed else info.numel,  # (a parametrised weight: its pieces hold them)
                "used": info.name in used_tensors,
                "reason": reasons.get(info.name, ""),
            }
        )
    return pd.DataFrame(rows, columns=["name", "kind", "shape", "dtype", "params", "used", "reason"])
