"""Batch blocking: the default batch size of Hessian products and landscape grids."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from nndiag.landscape import HessianOperator, blocking, hessian_spectrum, surface
from nndiag.landscape._setup import default_loss
from tests.landscape._dense import dense_hessian, tiny_cnn, tiny_data

F64 = torch.float64


def test_activation_bytes_is_the_largest_module_output_per_example():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(8 * 5 * 5, 5))
    x, y = torch.randn(6, 3, 10, 10), torch.randint(0, 5, (6,))
    params = dict(model.named_parameters())
    assert blocking.activation_bytes(model, params, x, y, default_loss) == 8 * 10 * 10 * 4  # conv output
    x64 = x.double()
    p64 = {k: p.detach().double() for k, p in params.items()}
    assert blocking.activation_bytes(model.double(), p64, x64, y, default_loss) == 8 * 10 * 10 * 8
    assert not nn.modules.module._global_forward_hooks  # the global hook is gone again


@pytest.mark.parametrize(("n", "per", "size"), [
    (512, 64 << 10, 32),      # ResNet20 on CIFAR: 64 KiB per image → batches of 32 (2 MiB)
    (100, 64 << 10, 25),      # four equal batches rather than 32 + 32 + 32 + 4
    (512, 8 << 10, 256),      # digits CNN: 8 KiB per image
    (512, 4 << 10, 512),      # 2 MiB at 512 examples: one batch
    (40, 1 << 30, 14),        # huge activations: at least MIN_BATCH (16) → 14, 14, 12 equal-ish
    (10, 1 << 30, 10),
])
def test_blocked_size(n, per, size):
    assert blocking.blocked_size(n, per) == size


def test_auto_batches_give_the_dense_hessian(monkeypatch):
    # force a split (every activation "too large"): 40 examples → batches of 14, 14, 12
    monkeypatch.setattr(blocking, "ACTIVATION_LIMIT", 1)
    model = tiny_cnn()
    x, y = tiny_data("cnn", n=40)
    H = dense_hessian(model, x, y)
    op = HessianOperator(model, (x, y), dtype=F64)
    assert [len(b[1]) for b in op.data.batches] == [14, 14, 12]
    assert op.batch_size == 14 and op.activation_bytes == 3 * 8 * 8 * 8
    np.testing.assert_allclose(sum(op.data.weights), 1.0)
    v = torch.randn(op.dim, dtype=F64)
    np.testing.assert_allclose(op.matvec(v).numpy(), H @ v.numpy(), rtol=1e-9, atol=1e-12)


def test_train_mode_and_explicit_sizes_are_kept(monkeypatch):
    monkeypatch.setattr(blocking, "ACTIVATION_LIMIT", 1)
    model = tiny_cnn(bn=True)
    x, y = tiny_data("cnn", n=300)
    op = HessianOperator(model, (x, y), mode="train")  # BatchNorm statistics: the size is the user's
    assert [len(b[1]) for b in op.data.batches] == [128, 128, 44] and op.activation_bytes is None
    op = HessianOperator(model, (x, y), batch_size=100)
    assert [len(b[1]) for b in op.data.batches] == [100, 100, 100]
    r = hessian_spectrum(model, (x, y), top_k=1)
    assert r.params["batch_size"] == 16 and r.params["batch_size_requested"] is None
    assert r.params["activation_bytes_per_example"] == 3 * 8 * 8 * 4


def test_blocked_surface_equals_one_batch(monkeypatch):
    model = tiny_cnn(bn=True).eval()
    x, y = tiny_data("cnn", n=48)
    whole = surface(model, (x, y), dim=2, steps=5, seed=3, dtype=F64)
    assert whole.params["batch_size"] == 48  # tiny activations: one batch
    monkeypatch.setattr(blocking, "ACTIVATION_LIMIT", 1)
    split = surface(model, (x, y), dim=2, steps=5, seed=3, dtype=F64)
    assert split.params["batch_size"] == 16
    np.testing.assert_allclose(split.losses, whole.losses, rtol=1e-12)
    np.testing.assert_allclose(split.origin_loss, whole.origin_loss, rtol=1e-12)
    train = surface(model, (x, y), dim=1, steps=3, mode="train", dtype=F64)
    assert train.params["batch_size"] == 48  # train mode: all at once, as before


def test_non_positive_batch_size_is_refused():
    from nndiag.errors import InputError

    model = tiny_cnn()
    x, y = tiny_data("cnn", n=8)
    with pytest.raises(InputError, match="batch_size"):
        hessian_spectrum(model, (x, y), batch_size=0)
    with pytest.raises(InputError, match="batch_size"):
        surface(model, (x, y), dim=1, steps=3, batch_size=0)
