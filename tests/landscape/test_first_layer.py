"""The precomputed first layer of landscape grids: the same losses, and only where it is exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

from nndiag._utils.model_state import same_snapshot, snapshot
from nndiag.landscape import surface
from nndiag.landscape.bound import BoundCopy
from nndiag.landscape.first_layer import install, uninstall
from nndiag.landscape.fold import inference_copy

F64 = torch.float64


class _Skip(nn.Module):
    """The input is used twice (a skip connection around the first layer): not precomputable."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)) + x)


class _Reshaped(nn.Module):
    """A reshape by method between the input and a convolution, and a frozen bias."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv1d(2, 4, 3, padding=1, padding_mode="circular")
        self.c.bias.requires_grad_(False)
        self.fc = nn.Linear(4 * 5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.c(x.view(x.shape[0], 2, 5))).flatten(1))


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 3))


def _cnn_bn() -> nn.Module:  # the first convolution has BatchNorm folded into it: not affine
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(3 * 9, 3))


def _cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(3, 3))


def _cnn_flat() -> nn.Module:  # a (N, 3, 2, 2) activation flattened into the classifier: channels-last order
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(12, 3))


CASES = {  # model, input shape, the layer precomputed (None: must be refused)
    "mlp": (_mlp, (40, 2, 5), "1"),
    "cnn": (_cnn, (40, 1, 3, 3), "0"),
    "cnn-flattened-channels-last": (_cnn_flat, (40, 2, 4, 4), "0"),
    "reshaped-conv1d-frozen-bias": (_Reshaped, (40, 10), "c"),
    "skip": (_Skip, (40, 6), None),
    "cnn-bn-folded": (_cnn_bn, (40, 1, 3, 3), None),
}


@pytest.mark.parametrize("name", list(CASES))
def test_surface_losses_equal_without_the_precomputed_layer(name):
    make, shape, expected = CASES[name]
    torch.manual_seed(0)
    model = make().double().eval()
    x, y = torch.randn(*shape, dtype=F64), torch.randint(0, 3, (shape[0],))
    before = snapshot(model)
    ref = surface(model, (x, y), steps=5, fold=False, dtype=F64, strategy="loop", threads=1)
    for strategy, threads in (("loop", 1), ("threads", 2), ("vmap", 1)):  # (vmap on a CPU CNN used to raise)
        s = surface(model, (x, y), steps=5, dtype=F64, strategy=strategy, threads=threads, batch_size=16)
        assert s.params["first_layer_precomputed"] == expected
        np.testing.assert_allclose(s.losses, ref.losses, rtol=1e-12)
    assert same_snapshot(before, snapshot(model))


def test_bound_copy_computes_live_outside_its_own_calls_and_for_unseen_inputs():
    torch.manual_seed(1)
    model = _mlp().double().eval()
    g = torch.Generator().manual_seed(2)
    base = {k: p.detach().clone() for k, p in model.named_parameters()}
    dirs = [{k: torch.randn(v.shape, generator=g, dtype=F64) for k, v in base.items()} for _ in range(2)]
    bound = BoundCopy(model, base, dirs, {}, folded=inference_copy(model))
    x = torch.randn(9, 2, 5, dtype=F64)
    assert install(bound, [x]) == "1"
    c = torch.tensor([0.3, -0.7], dtype=F64)
    point = {k: base[k] + c[0] * dirs[0][k] + c[1] * dirs[1][k] for k in base}
    expected = functional_call(model, point, (x,))
    bound.set_point(c)
    torch.testing.assert_close(bound(x), expected, rtol=1e-12, atol=1e-12)  # the cache
    other = x.clone()  # same values, another tensor: not in the cache, computed live
    torch.testing.assert_close(bound(other), expected, rtol=1e-12, atol=1e-12)
    # called through functional_call (as the grid's vmap path does), the module computes live
    torch.testing.assert_close(functional_call(bound.module, point, (x,)), expected, rtol=1e-12, atol=1e-12)
    copy = bound.copy()
    copy.set_point(-c)
    minus = {k: base[k] - c[0] * dirs[0][k] - c[1] * dirs[1][k] for k in base}
    torch.testing.assert_close(copy(x), functional_call(model, minus, (x,)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bound(x), expected, rtol=1e-12, atol=1e-12)  # each copy its own point
    assert copy.first_layer[1] is bound.first_layer[1]  # one cache for both


def test_memory_cap_leaves_the_layer_live():
    torch.manual_seed(1)
    model = _mlp().eval()
    base = {k: p.detach().clone() for k, p in model.named_parameters()}
    dirs = [{k: torch.randn_like(v) for k, v in base.items()}]
    bound = BoundCopy(model, base, dirs, {})
    x = torch.randn(100, 2, 5)
    assert install(bound, [x], max_bytes=100 * 8 * 4 * 2 - 1) is None  # two (100, 8) float32 outputs
    assert bound.first_layer is None and "forward" not in bound.module.get_submodule("1").__dict__
    assert install(bound, [x], max_bytes=100 * 8 * 4 * 2) == "1"
    assert "forward" in bound.module.get_submodule("1").__dict__
    uninstall(bound)
    assert bound.first_layer is None and "forward" not in bound.module.get_submodule("1").__dict__


@pytest.mark.parametrize("row_bytes", [64 << 20, 0])
def test_a_grid_row_shares_its_partial_sum_with_the_same_values(monkeypatch, row_bytes):
    """Points in plane order (last coordinate fastest) on two batches: each point's output is
    bit for bit ``(Y₀ + a·Y₁) + b·Y₂`` — from the row's kept partial sum, or, with no room for it
    (``ROW_BYTES`` 0), computed whole."""
    import nndiag.landscape.first_layer as fl
    from nndiag.landscape.bound import input_key

    monkeypatch.setattr(fl, "ROW_BYTES", row_bytes)
    torch.manual_seed(1)
    model = _mlp().eval()
    g = torch.Generator().manual_seed(2)
    base = {k: p.detach().clone() for k, p in model.named_parameters()}
    dirs = [{k: torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(2)]
    bound = BoundCopy(model, base, dirs, {})
    xs = [torch.randn(9, 2, 5), torch.randn(7, 2, 5)]
    assert install(bound, xs) == "1"
    first = bound.module.get_submodule("1").forward
    for a in (0.3, -0.2):
        for b in (0.5, -1.25, 2.0):
            bound.set_point(torch.tensor([a, b]))
            for x in xs:
                _, y0, (y1, y2) = bound.first_layer[1][input_key(x)]
                bound.input_key = input_key(x)
                got = first(x.flatten(1))
                bound.input_key = None
                expected = torch.add(y0, y1, alpha=a).add_(y2, alpha=b)
                assert torch.equal(got, expected)
                got.add_(1.0)  # the caller may write into what it got: the kept sum must not change
    assert (len(first._rows) == 2) == (row_bytes > 0)
