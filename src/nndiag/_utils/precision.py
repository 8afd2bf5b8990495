"""Full float32 precision on CUDA: TF32 switched off while nndiag computes.

PyTorch lets cuDNN convolutions use TF32 by default (``torch.backends.cudnn.allow_tf32``
is True), which rounds their inputs to a 10-bit mantissa: relative errors near 1e-3,
enough to spoil Hessian eigenvalues, finite differences on a loss surface and exact
gradient-sign counts. Every analysis runs inside :func:`ieee_float32`, which switches TF32
off for cuDNN and cuBLAS and restores the user's settings afterwards, also on error. On
the CPU the flags have no effect.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., Any])


@contextmanager
def ieee_float32() -> Iterator[None]:
    """Context in which float32 matrix products and convolutions on CUDA use no TF32."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    old = (matmul.allow_tf32, cudnn.allow_tf32)
    matmul.allow_tf32, cudnn.allow_tf32 = False, False
    try:
        yield
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = old


def full_precision(fn: F) -> F:
    """Decorator: run ``fn`` inside :func:`ieee_float32`."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with ieee_float32():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
