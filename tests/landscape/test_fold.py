"""BatchNorm folded into convolutions for landscape forwards: same function, model untouched."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

from nndiag._utils.model_state import same_snapshot, snapshot
from nndiag.landscape import surface
from nndiag.landscape.fold import inference_copy

F64 = torch.float64


def _randomise_bn(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(5)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.randn(m.weight.shape, generator=g))
                m.bias.data.copy_(torch.randn(m.bias.shape, generator=g))
    return model.eval()


class _Mixed(nn.Module):
    """Foldable pairs (with and without conv bias, non-affine BN) and pairs that must stay."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.c2, self.b2 = nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6, affine=False)
        self.c3, self.b3 = nn.Conv2d(6, 6, 1), nn.BatchNorm2d(6)  # c3's output is used twice
        self.c4, self.b4 = nn.Conv1d(6, 4, 3, padding=1), nn.BatchNorm1d(4)
        self.fc, self.b5 = nn.Linear(4 * 64, 8), nn.BatchNorm1d(8)  # Linear + BN: not a conv pair
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.b1(self.c1(x)))
        h = torch.relu(self.b2(self.c2(h)))
        c = self.c3(h)
        h = torch.relu(self.b3(c)) + c
        h = torch.relu(self.b4(self.c4(h.flatten(2))))
        return self.out(torch.relu(self.b5(self.fc(h.flatten(1)))))


def test_fold_pairs_and_same_forward():
    torch.manual_seed(0)
    model = _randomise_bn(_Mixed()).double()
    before = snapshot(model)
    folded = inference_copy(model)
    assert folded is not None
    assert [(c, b) for c, b, _ in folded.pairs] == [("c1", "b1"), ("c2", "b2"), ("c4", "b4")]
    assert same_snapshot(before, snapshot(model))  # a traced copy was edited, not the model
    x = torch.randn(5, 3, 8, 8, dtype=F64)
    params = {k: p.detach() for k, p in model.named_parameters()}
    buffers = {k: b for k, b in model.named_buffers()}
    out = functional_call(folded.module, {**buffers, **folded.params(params, buffers)}, (x,), strict=False)
    with torch.no_grad():
        ref = model(x)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_untraceable_model_is_not_folded():
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c, self.b, self.fc = nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.Linear(2 * 16, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.b(self.c(x))
            if h.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
                h = -h
            return self.fc(h.flatten(1))

    assert inference_copy(Branchy()) is None
    x, y = torch.randn(6, 1, 4, 4), torch.randint(0, 3, (6,))
    s = surface(Branchy().eval(), (x, y), dim=1, steps=3)
    assert s.params["batchnorm_folded"] == 0 and np.isfinite(s.losses).all()


@pytest.mark.parametrize("one_d", ["zero", "keep"])
def test_folded_resnet_surface_equals_unfolded(one_d):
    from nndiag.models import build_model

    torch.manual_seed(0)
    model = _randomise_bn(build_model("resnet20"))
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(6, 3, 32, 32, generator=g), torch.randint(0, 10, (6,), generator=g)
    before = snapshot(model)
    kw = dict(dim=2, steps=3, seed=1, one_d=one_d, dtype=F64, strategy="loop")
    folded = surface(model, (x, y), fold=True, **kw)
    plain = surface(model, (x, y), fold=False, **kw)
    assert folded.params["batchnorm_folded"] == 19 and plain.params["batchnorm_folded"] == 0
    assert folded.params["in_place_ops"] == 28 and plain.params["in_place_ops"] == 0
    np.testing.assert_allclose(folded.losses, plain.losses, rtol=1e-10)
    assert same_snapshot(before, snapshot(model))


def test_a_rewrite_that_misses_the_origin_is_dropped_and_the_copy_still_bound(monkeypatch):
    # the rewrite and the bound copy share one origin check; when it fails, the rewrite is
    # checked alone and dropped, and the copy of the plain model is bound
    from nndiag.landscape import fold as fold_mod
    from nndiag.models import build_model

    real = fold_mod.inference_copy

    def broken(model, **kw):
        out = real(model, **kw)
        for node in out.module.graph.nodes:  # a ReLU that becomes a tanh: a wrong function
            if node.target is torch.relu_:
                node.target = torch.tanh_
        out.module.recompile()
        return out

    monkeypatch.setattr(fold_mod, "inference_copy", broken)
    torch.manual_seed(0)
    model = _randomise_bn(build_model("digits-cnn", batchnorm=True)).eval()
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
    kw = dict(dim=2, steps=3, seed=1, dtype=F64, strategy="loop")
    s = surface(model, (x, y), **kw)
    plain = surface(model, (x, y), fold=False, **kw)
    assert s.params["batchnorm_folded"] == 0 and s.params["in_place_ops"] == 0 and s.params["bound_copy"]
    np.testing.assert_allclose(s.losses, plain.losses, rtol=1e-10)
    monkeypatch.setattr(fold_mod, "inference_copy", real)
    assert surface(model, (x, y), **kw).params["batchnorm_folded"] == 2


def test_train_mode_is_never_folded():
    from nndiag.models import build_model

    torch.manual_seed(0)
    model = build_model("digits-cnn", batchnorm=True)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    assert surface(model, (x, y), dim=1, steps=3, mode="train").params["batchnorm_folded"] == 0
    assert surface(model.eval(), (x, y), dim=1, steps=3).params["batchnorm_folded"] == 2


class _Views(nn.Module):
    """ReLUs and sums that must stay out of place: on a view, on a tensor used twice, on the input."""

    def __init__(self) -> None:
        super().__init__()
        self.c, self.bn, self.fc = nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2), nn.Linear(2 * 16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.bn(self.c(x))                    # folded; c is used three times below
        v = torch.relu(c.flatten(1))              # input is a view of c: no relu_
        s = c + 1.0                               # c has other users: no add_
        t = torch.relu(x) + s                     # relu of the model input: no relu_
        return self.fc(v) + t.mean((1, 2, 3))[:, None]


def test_in_place_only_on_fresh_single_use_tensors():
    model = _randomise_bn(_Views())
    folded = inference_copy(model)
    assert folded is not None and len(folded.pairs) == 1
    code = folded.module.code
    assert "torch.relu_(" not in code
    # the last sum's first operand is the Linear's output (fresh, single use): it may be in place
    assert folded.in_place == code.count(".add_(") == 1
    x = torch.randn(4, 2, 4, 4)
    params = {k: p.detach() for k, p in model.named_parameters()}
    buffers = dict(model.named_buffers())
    with torch.inference_mode():
        out = functional_call(folded.module, {**buffers, **folded.params(params, buffers)}, (x,), strict=False)
        ref = model(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_resnet_relus_and_residual_sums_run_in_place():
    from nndiag.models import build_model

    folded = inference_copy(build_model("resnet20").eval())
    # 19 ReLUs after folded convolutions or sums, 9 residual sums on the second convolution
    assert folded is not None and folded.in_place == 28 and folded.module.code.count(".add_(") == 9


@pytest.mark.parametrize("strategy", ["vmap", "loop"])
def test_in_place_mlp_grid_equals_plain_model(strategy):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    x, y = torch.randn(20, 6), torch.randint(0, 4, (20,))
    kw = dict(dim=2, steps=4, seed=3, dtype=F64, strategy=strategy)
    fast = surface(model, (x, y), fold=True, **kw)
    plain = surface(model, (x, y), fold=False, **kw)
    assert fast.params["in_place_ops"] == 2 and fast.params["strategy"] == strategy
    np.testing.assert_allclose(fast.losses, plain.losses, rtol=1e-12)


class _Pools(nn.Module):
    """2×2 poolings to rewrite (module and function forms) and poolings that must stay."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(2, 3, 3, padding=1)
        self.norm, self.drop = nn.Identity(), nn.Dropout(0.5)
        self.p1 = nn.MaxPool2d(2)
        self.keep3 = nn.MaxPool2d(3, stride=2)             # 3×3 windows: stays
        self.keep_ceil = nn.MaxPool2d(2, ceil_mode=True)   # ceil mode: stays
        self.fc = nn.Linear(3 * 9 + 3 * 4 + 3 * 9, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.drop(self.norm(self.c(x))))     # Identity and Dropout bypassed: relu_
        a = self.p1(h)                                       # 7×7 → 3×3 (floor: last row/column dropped)
        b = torch.nn.functional.max_pool2d(a, kernel_size=2, stride=2)  # 3×3 → 1×1 ... function form
        c = self.keep3(h)
        d = self.keep_ceil(a)
        e = torch.nn.functional.max_pool2d(h, 2, 2, 1)       # padded: stays
        return self.fc(torch.cat([a.flatten(1), d.flatten(1), c.flatten(1)], 1)) + b.sum() + e.mean()


def test_two_by_two_poolings_rewritten_exactly():
    from nndiag.landscape.fold import pool2x2

    torch.manual_seed(0)
    model = _Pools().eval()
    folded = inference_copy(model)
    assert folded is not None and folded.pools == 2 and folded.in_place >= 1
    code = folded.module.code
    assert code.count("fold_pool2x2(") == 2 and "torch.relu_(" in code and "drop" not in code
    x = torch.randn(6, 2, 7, 7)
    x[0, 0, 0, 0] = float("nan")  # NaN propagates as in max_pool2d
    with torch.inference_mode():
        torch.testing.assert_close(folded.module(x), model(x), rtol=0, atol=0, equal_nan=True)
    for shape in ((4, 3, 8, 8), (2, 5, 9, 6), (3, 5, 5)):
        for fmt in (torch.contiguous_format, torch.channels_last):
            t = torch.randn(shape)
            t = t.contiguous(memory_format=fmt) if t.ndim == 4 else t
            assert torch.equal(pool2x2(t), torch.nn.functional.max_pool2d(t, 2))


def test_a_relu_used_only_by_a_pooling_runs_after_it():
    """conv → ReLU → 2×2 max-pool: the copy pools first and applies the ReLU to a quarter of the
    elements; the outputs are identical (NaN included)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(4 * 9, 3)).eval()
    folded = inference_copy(model)
    assert folded is not None and folded.pools == 1
    code = folded.module.code
    assert code.count("torch.relu_(") == 1 and code.index("fold_pool2x2(") < code.index("torch.relu_(")
    x = torch.randn(5, 2, 7, 7)
    x[0, 0, 2, 2] = float("nan")
    with torch.inference_mode():
        for t in (x, x.contiguous(memory_format=torch.channels_last)):
            torch.testing.assert_close(folded.module(t), model(t), rtol=0, atol=0, equal_nan=True)


class _Flat(nn.Module):
    """Three ways to flatten a (N, C, H, W) activation into a linear layer."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.c = nn.Conv2d(2, 4, 3, padding=1)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(4 * 5 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.c(x))
        if self.how == "module":
            return self.fc(self.flat(h))
        return self.fc(torch.flatten(h, 1) if self.how == "function" else h.flatten(1))


@pytest.mark.parametrize("how", ["module", "function", "method"])
def test_flatten_into_a_linear_layer_reads_channels_last_order(how):
    torch.manual_seed(0)
    model = _Flat(how).double().eval()
    x = torch.randn(6, 2, 5, 6, dtype=torch.float64)
    assert inference_copy(model) is None  # nothing to rewrite without an example (tanh, no pool)
    folded = inference_copy(model, example=x[:2])
    assert folded is not None and folded.flattened == [("fc", (4, 5, 6))]
    assert ".permute(0, 2, 3, 1)" in folded.module.code
    p = {k: v.detach() for k, v in model.named_parameters()}
    with torch.inference_mode():
        for t in (x, x.contiguous(memory_format=torch.channels_last)):
            got = torch.func.functional_call(folded.module, folded.params(p, {}), (t,))
            torch.testing.assert_close(got, model(t), rtol=1e-12, atol=1e-12)
    # a flatten of the model's input, or of a single pixel per channel, is left alone
    flat_in = nn.Sequential(nn.Flatten(), nn.Linear(2 * 5 * 6, 3)).eval()
    assert inference_copy(flat_in, example=x[:2].float()) is None
    pooled = nn.Sequential(nn.Conv2d(2, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    assert inference_copy(pooled, example=x[:2].float()) is None


def test_grid_with_a_channels_last_flatten_equals_the_plain_model():
    torch.manual_seed(0)
    model = _Flat("module").double().eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(20, 2, 5, 6, dtype=torch.float64, generator=g), torch.randint(0, 3, (20,), generator=g)
    kw = dict(dim=2, steps=5, seed=0, dtype=torch.float64, one_d="keep")
    for strategy, threads in (("loop", 1), ("threads", 2), ("vmap", 1)):
        fast = surface(model, (x, y), strategy=strategy, threads=threads, **kw)
        assert fast.params["flattens_channels_last"] == 1
        plain = surface(model, (x, y), fold=False, strategy="loop", threads=1, **kw)
        np.testing.assert_allclose(fast.losses, plain.losses, rtol=1e-12)


class _MathScaled(nn.Module):
    """Calls ``math.sqrt`` on a traced value: fx needs its ``math`` wrapping for this one."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import math

        return self.b(torch.relu(self.a(x)) / math.sqrt(x.shape[-1]))


def test_traced_without_math_wrapping_unless_the_model_needs_it():
    import math

    import torch.fx

    from nndiag.landscape.fold import trace_graph

    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    assert str(trace_graph(plain)) == str(torch.fx.Tracer().trace(plain))
    scaled = _MathScaled()
    with pytest.raises(Exception):  # noqa: B017 - what fx raises for math on a Proxy varies
        torch.fx.Tracer(autowrap_modules=(), autowrap_functions=()).trace(scaled)
    graph = trace_graph(scaled)
    assert any(n.op == "call_function" and n.target is math.sqrt for n in graph.nodes)
    # the landscape of such a model is still exact at the origin, through the rewritten copy
    x, y = torch.randn(20, 6, generator=torch.Generator().manual_seed(1)), torch.arange(20) % 3
    s = surface(scaled, (x, y), dim=1, steps=3, dtype=torch.float64)
    with torch.no_grad():
        ref = float(nn.functional.cross_entropy(scaled.double()(x.double()), y))
    scaled.float()
    assert s.losses[1] == pytest.approx(ref, rel=1e-12) and s.params["bound_copy"]
