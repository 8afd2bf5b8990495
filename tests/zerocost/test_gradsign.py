"""GradSign: reference semantics, loop == fast == vmap, chunking, model left as it was."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from nndiag._utils.model_state import same_snapshot, snapshot
from nndiag.errors import AnalysisError, InputError
from nndiag.models.nb201 import nb201
from nndiag.zerocost.gradsign import gradsign, gradsign_detail


def _data(n=12, shape=(3, 8, 8), k=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *shape), generator=g), torch.randint(0, k, (n,), generator=g)


def _cnn(bn: bool, seed=0):
    torch.manual_seed(seed)
    norm = nn.BatchNorm2d if bn else (lambda c: nn.Identity())
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), norm(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2), norm(8), nn.ReLU(),
                         nn.Conv2d(8, 6, 1, bias=False), nn.Flatten(), nn.Linear(6 * 16, 5))


def test_matches_numpy_softmax_regression():
    # independent reference: per-sample CE gradient of a linear softmax model is (p - e_y) x^T
    torch.manual_seed(1)
    net = nn.Linear(6, 4)
    x, y = torch.randn(10, 6), torch.randint(0, 4, (10,))
    w, b = net.weight.detach().double().numpy(), net.bias.detach().double().numpy()
    xs = x.double().numpy()
    logits = xs @ w.T + b
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[np.arange(10), y.numpy()] -= 1
    per_sample = p[:, :, None] * xs[:, None, :]
    expected = int(np.abs(np.sign(per_sample).sum(0)).sum())
    for method in ("fast", "vmap", "loop"):
        assert gradsign(net, x, y, method=method) == expected
    mean = gradsign(net, x, y, reduction="mean")
    assert mean == pytest.approx(expected / (24 * 10))


@pytest.mark.parametrize("bn", [False, True])
def test_loop_fast_vmap_identical_on_small_cnns(bn):
    net = _cnn(bn)
    x, y = _data()
    scores = {m: gradsign_detail(net, x, y, method=m) for m in ("loop", "fast", "vmap")}
    assert scores["loop"].tau == scores["fast"].tau == scores["vmap"].tau
    assert scores["loop"].per_layer == scores["fast"].per_layer
    assert scores["loop"].zero_fraction == scores["fast"].zero_fraction
    assert 0 < scores["fast"].tau <= scores["fast"].n_params * len(x)


def test_batchnorm_uses_each_samples_own_statistics():
    # the batch-of-one loop written out independently (train-mode BN on one sample)
    net = _cnn(True)
    x, y = _data()
    tau = gradsign_detail(net, x, y).tau
    ref = sum(int(torch.sign(torch.stack([
        torch.autograd.grad(nn.functional.cross_entropy(net(x[i:i + 1]), y[i:i + 1]),
                            [m.weight for m in net if isinstance(m, (nn.Conv2d, nn.Linear))])[j]
        for i in range(len(x))])).sum(0).abs().sum()) for j in range(4))
    assert tau == ref


@pytest.mark.parametrize("arch", [
    "|nor_conv_3x3~0|+|nor_conv_1x1~0|skip_connect~1|+|avg_pool_3x3~0|none~1|nor_conv_3x3~2|",
    "|skip_connect~0|+|nor_conv_3x3~0|avg_pool_3x3~1|+|nor_conv_1x1~0|skip_connect~1|nor_conv_3x3~2|",
    "|avg_pool_3x3~0|+|none~0|nor_conv_1x1~1|+|nor_conv_3x3~0|none~1|skip_connect~2|",
])
def test_loop_and_fast_identical_on_nb201_cells(arch):
    torch.manual_seed(0)
    net = nb201(arch, channels=4, cells_per_stage=1, num_classes=5)
    x, y = _data(8, (3, 16, 16))
    a = gradsign_detail(net, x, y, method="loop")
    b = gradsign_detail(net, x, y, method="fast")
    assert a.tau == b.tau and a.per_layer == b.per_layer


def test_full_nb201_identical_in_float64():
    # float32 per-sample gradients of the full 17-cell network have entries within rounding of
    # zero whose sign depends on kernel choices; in float64 loop and fast agree exactly
    torch.manual_seed(0)
    net = nb201("|nor_conv_3x3~0|+|nor_conv_1x1~0|skip_connect~1|+|avg_pool_3x3~0|none~1|nor_conv_3x3~2|",
                channels=4)
    x, y = _data(4, (3, 32, 32), k=10)
    a = gradsign(net, x, y, method="loop", dtype=torch.float64)
    b = gradsign(net, x, y, method="fast", dtype=torch.float64)
    assert a == b
    c = gradsign(net, x, y, method="fast")
    assert abs(c - a) / a < 1e-3  # float32: the same up to a few sign flips


def test_chunking_and_shared_layers_and_conv1d():
    x, y = _data(9, (3, 8, 8))
    net = _cnn(True)
    full = gradsign(net, x, y)
    assert gradsign(net, x, y, chunk_size=2) == full == gradsign(net, x, y, chunk_size=1)

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv1d(4, 4, 3, padding=1)
            self.fc = nn.Linear(4 * 6, 3)

        def forward(self, t):
            return self.fc(torch.relu(self.c(torch.relu(self.c(t)))).flatten(1))

    torch.manual_seed(0)
    s = Shared()
    xs, ys = torch.randn(7, 4, 6), torch.randint(0, 3, (7,))
    assert gradsign(s, xs, ys) == gradsign(s, xs, ys, method="loop") == gradsign(s, xs, ys, method="vmap")


def test_model_left_exactly_as_it_was():
    net = _cnn(True)
    net.eval()
    net[0].weight.requires_grad_(False)
    net[3].weight.grad = torch.ones_like(net[3].weight)
    net[0].register_forward_hook(lambda *a: None)
    x, y = _data()
    before = snapshot(net)
    for m in ("fast", "loop", "vmap"):
        gradsign(net, x, y, method=m)
    assert same_snapshot(before, snapshot(net))


def test_bad_input():
    net = _cnn(False)
    x, y = _data()
    with pytest.raises(InputError, match="at least 2"):
        gradsign(net, x[:1], y[:1])
    with pytest.raises(InputError, match="method"):
        gradsign(net, x, y, method="fastest")
    with pytest.raises(AnalysisError, match="no Conv or Linear"):
        gradsign(nn.Sequential(nn.Flatten(), nn.ReLU()), x, y)
    bad = _cnn(False)
    with torch.no_grad():
        bad[0].weight[0, 0, 0, 0] = float("nan")
    for m in ("fast", "loop"):
        with pytest.raises(AnalysisError, match="NaN"):
            gradsign(bad, x, y, method=m)


@pytest.mark.parametrize("kw", [dict(kernel_size=3, stride=1, padding=1, count_include_pad=False),
                                dict(kernel_size=3, stride=1, padding=1, count_include_pad=True),
                                dict(kernel_size=2, stride=2),
                                dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 0), count_include_pad=False)])
def test_fast_pools_equal_avg_pool(kw):
    # the fast path's depthwise-convolution pooling against PyTorch's avg_pool2d, values and gradients
    from nndiag.zerocost._persample import fast_pools

    ref, mine = nn.AvgPool2d(**kw), nn.AvgPool2d(**kw)
    fast_pools(mine)
    x = torch.randn(3, 4, 9, 10, dtype=torch.float64, requires_grad=True)
    a, b = ref(x), mine(x)
    torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(a)
    ga, = torch.autograd.grad(a, x, g)
    gb, = torch.autograd.grad(b, x, g)
    torch.testing.assert_close(gb, ga, rtol=1e-12, atol=1e-12)
