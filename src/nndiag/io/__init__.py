"""Turn what the user has (modules, files, folders, data specs) into tensors and modules."""

from nndiag.io.data import DataBundle, as_data, load_data, model_inputs
from nndiag.io.models import LoadedModel, load_model
from nndiag.io.tensors import TensorInfo, TensorSource

__all__ = [
    "DataBundle",
    "LoadedModel",
    "TensorInfo",
    "TensorSource",
    "as_data",
    "load_data",
    "load_model",
    "model_inputs",
]
