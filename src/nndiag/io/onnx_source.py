"""ONNX initializers as a tensor source (optional extra ``nndiag[onnx]``)."""

from __future__ import annotations

from pathlib import Path

import torch

from nndiag.errors import ModelLoadError, require
from nndiag.io.tensors import TensorInfo, TensorSource, _dtype_name


class OnnxSource(TensorSource):
    """The initializers (weights) of an ONNX model.

    Weight matrices of ``Gemm``/``MatMul`` nodes are reported with module type
    ``"Linear"``, those of ``Conv`` nodes with ``"Conv"``.
    """

    def __init__(self, path: str | Path) -> None:
        onnx = require("onnx", "onnx", "reading ONNX files")
        from onnx import numpy_helper

        p = Path(path)
        if p.stat().st_size == 0:
            raise ModelLoadError(f"{p}: file is empty")
        try:
            model = onnx.load(str(p), load_external_data=False)
            onnx.checker.check_model(model)
        except Exception as exc:  # onnx raises DecodeError, ValidationError, ...
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ModelLoadError(f"{p}: not a valid ONNX model ({first[:200]})") from None
        kinds: dict[str, str] = {}
        for node in model.graph.node:
            kind = {"Gemm": "Linear", "MatMul": "Linear", "Conv": "Conv"}.get(node.op_type)
            if kind:
                for name in node.input[1:2]:
                    kinds[name] = kind
        self._tensors: dict[str, torch.Tensor] = {}
        self._kinds = kinds
        for init in model.graph.initializer:
            try:
                arr = numpy_helper.to_array(init)
            except Exception as exc:
                raise ModelLoadError(f"{p}: cannot read initializer '{init.name}' ({exc})") from None
            self._tensors[init.name] = torch.from_numpy(arr.copy())

    def infos(self) -> list[TensorInfo]:
        return [
            TensorInfo(k, tuple(v.shape), _dtype_name(v.dtype), self._kinds.get(k))
            for k, v in self._tensors.items()
        ]

    def get(self, name: str) -> torch.Tensor:
        return self._tensors[name]
