"""TF32 is off while nndiag computes, and the user's settings come back afterwards."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nndiag._utils.precision import ieee_float32


def _flags() -> tuple[bool, bool]:
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


@pytest.fixture
def tf32_on():
    old = _flags()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def test_context_restores_also_on_error(tf32_on):
    with pytest.raises(RuntimeError), ieee_float32():
        assert _flags() == (False, False)
        raise RuntimeError("boom")
    assert _flags() == (True, True)


def test_analyses_run_without_tf32(tf32_on):
    # the loss is called inside the Hessian engine and the GradSign fast path: record the flags
    from nndiag.landscape import hessian_spectrum
    from nndiag.zerocost.gradsign import gradsign

    seen = []

    def loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        seen.append(_flags())
        return nn.functional.cross_entropy(out, y)

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    hessian_spectrum(net, (x, y), loss=loss, top_k=1, device="cpu")
    gradsign(net, x, y, loss=loss)
    assert seen and all(f == (False, False) for f in seen)
    assert _flags() == (True, True)
