"""Architectures nndiag builds itself, addressable by name (see :func:`build_model`)."""

from nndiag.models.registry import available_models, build_model, register_model

__all__ = ["available_models", "build_model", "register_model"]
