"""The bound model copy of landscape loops and the CPU cross-entropy: same values, model untouched."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from nndiag._utils.model_state import same_snapshot, snapshot
from nndiag.landscape import surface
from nndiag.landscape._setup import FEW_CLASSES, cpu_cross_entropy
from nndiag.landscape.bound import BoundCopy
from nndiag.landscape.fold import inference_copy

F64 = torch.float64


class _Net(nn.Module):
    """Convolutions (one followed by BatchNorm), a frozen layer and a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.frozen = nn.Linear(4 * 16, 8)
        self.frozen.requires_grad_(False)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.b1(self.c1(x)))
        h = torch.relu(self.c2(h))
        return self.fc(torch.relu(self.frozen(h.flatten(1))))


def _setup(model: nn.Module) -> tuple[dict, list[dict], dict]:
    g = torch.Generator().manual_seed(1)
    base = {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}
    dirs = [{k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in base.items()} for _ in range(2)]
    buffers = {k: b.detach().clone() for k, b in model.named_buffers()}
    buffers |= {k: p.detach().clone() for k, p in model.named_parameters() if not p.requires_grad}
    return base, dirs, buffers


@pytest.mark.parametrize("fold", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_bound_copy_matches_functional_call(fold, channels_last):
    torch.manual_seed(0)
    model = _Net().double().eval()
    with torch.no_grad():
        model.b1.running_mean.uniform_(-1, 1)
        model.b1.running_var.uniform_(0.5, 2)
    before = snapshot(model)
    base, dirs, buffers = _setup(model)
    folded = inference_copy(model) if fold else None
    assert (folded is not None and len(folded.pairs) == 1) or not fold
    bound = BoundCopy(model, base, dirs, buffers, folded=folded, channels_last=channels_last)
    x = torch.randn(7, 2, 4, 4, dtype=F64)
    for c in ([0.0, 0.0], [0.3, -1.2], [-2.0, 0.5]):
        bound.set_point(torch.tensor(c, dtype=F64))
        params = {k: base[k] + c[0] * dirs[0][k] + c[1] * dirs[1][k] for k in base}
        with torch.inference_mode():
            out = bound(x)
            ref = functional_call(model, {**buffers, **params}, (x,))
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    if channels_last:
        assert bound.views["c1.weight"].is_contiguous(memory_format=torch.channels_last)
    assert same_snapshot(before, snapshot(model))  # only a copy was bound and written


def test_cpu_cross_entropy_equals_cross_entropy():
    g = torch.Generator().manual_seed(0)
    for n, c in ((512, 10), (3, 2), (64, FEW_CLASSES), (40, FEW_CLASSES + 1)):
        logits = torch.randn(n, c, generator=g) * 4
        y = torch.randint(0, c, (n,), generator=g)
        torch.testing.assert_close(cpu_cross_entropy(logits, y), F.cross_entropy(logits, y),
                                   rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(cpu_cross_entropy(logits.double(), y), F.cross_entropy(logits.double(), y),
                                   rtol=1e-13, atol=1e-14)
    probs = torch.softmax(torch.randn(8, 5, generator=g), 1)  # class probabilities as targets
    logits = torch.randn(8, 5, generator=g)
    torch.testing.assert_close(cpu_cross_entropy(logits, probs), F.cross_entropy(logits, probs))


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_surface_with_bound_copy_equals_plain_path(mode):
    torch.manual_seed(0)
    model = _Net()
    model.train(mode == "train")
    before = snapshot(model)
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(12, 2, 4, 4, generator=g), torch.randint(0, 5, (12,), generator=g)
    kw = dict(dim=2, steps=3, seed=2, dtype=F64, strategy="loop", mode=mode)
    fast = surface(model, (x, y), **kw)
    plain = surface(model, (x, y), fold=False, **kw)
    assert fast.params["bound_copy"] is True and plain.params["bound_copy"] is False
    assert fast.params["batchnorm_folded"] == (1 if mode == "eval" else 0)
    np.testing.assert_allclose(fast.losses, plain.losses, rtol=1e-10)
    assert same_snapshot(before, snapshot(model))


def test_tied_weights_move_together():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3, bias=False)
            self.b.weight = nn.Parameter(torch.randn(3, 4))
            self.c = nn.Linear(4, 3, bias=False)
            self.c.weight = self.b.weight  # one tensor registered under two names

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.relu(self.a(x))) + self.c(x.flip(1)) * 0.5

    torch.manual_seed(0)
    model = Tied().double()
    base, dirs, buffers = _setup(model)
    assert "c.weight" not in base  # named_parameters() lists a tied tensor once
    bound = BoundCopy(model, base, dirs, buffers)
    x = torch.randn(5, 4, dtype=F64)
    bound.set_point(torch.tensor([0.7, -0.4], dtype=F64))
    params = {k: base[k] + 0.7 * dirs[0][k] - 0.4 * dirs[1][k] for k in base}
    with torch.inference_mode():
        torch.testing.assert_close(bound(x), functional_call(model, params, (x,)), rtol=1e-12, atol=1e-12)
    assert bound.module.c.weight.data_ptr() == bound.module.b.weight.data_ptr()


def test_points_side_by_side_equal_the_loop():
    torch.manual_seed(0)
    model = _Net().eval()
    before = snapshot(model)
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(12, 2, 4, 4, generator=g), torch.randint(0, 5, (12,), generator=g)
    kw = dict(dim=2, steps=5, seed=2, dtype=F64, threads=2)
    side = surface(model, (x, y), strategy="threads", **kw)
    loop = surface(model, (x, y), strategy="loop", **kw)
    assert side.params["strategy"] == "threads"
    np.testing.assert_allclose(side.losses, loop.losses, rtol=1e-12)
    alone = surface(model, (x, y), strategy="threads", **(kw | {"threads": 1}))
    assert alone.params["strategy"] == "loop"  # one thread: nothing to put side by side
    np.testing.assert_allclose(alone.losses, loop.losses, rtol=1e-12)
    assert same_snapshot(before, snapshot(model))


@pytest.mark.parametrize(("mode", "fold"), [("train", True), ("eval", False)])
def test_points_side_by_side_refused_without_eval_bound_copy(mode, fold):
    from nndiag.errors import InputError

    model = _Net().train(mode == "train")
    x, y = torch.randn(6, 2, 4, 4), torch.randint(0, 5, (6,))
    with pytest.raises(InputError, match="strategy='threads'"):
        surface(model, (x, y), dim=1, steps=3, strategy="threads", mode=mode, fold=fold, threads=2)
