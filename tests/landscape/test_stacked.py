"""Landscape points stacked through fully connected models: same losses as one forward per point."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nndiag._utils.model_state import same_snapshot, snapshot
from nndiag.errors import InputError
from nndiag.landscape import surface
from nndiag.landscape.directions import normalize_direction, random_direction
from tests.landscape._dense import tiny_cnn, tiny_data


def _mixed(seed: int = 0) -> nn.Module:
    """Every kind of layer the stacked pass takes, with non-trivial BatchNorm statistics."""
    torch.manual_seed(seed)
    m = nn.Sequential(
        nn.Flatten(), nn.Linear(12, 16), nn.BatchNorm1d(16), nn.GELU(), nn.Dropout(0.3),
        nn.Linear(16, 16, bias=False), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 12), nn.LeakyReLU(0.1),
        nn.Linear(12, 12), nn.SiLU(), nn.Linear(12, 5),
    )
    with torch.no_grad():
        m[2].running_mean.uniform_(-0.5, 0.5)
        m[2].running_var.uniform_(0.5, 2.0)
        m[2].weight.uniform_(0.5, 1.5)
        m[6].weight.uniform_(0.5, 1.5)
        m[6].bias.uniform_(-0.2, 0.2)
    m[10].weight.requires_grad_(False)  # a frozen layer: fixed weight, moving bias
    return m.eval()


def _data(n: int = 40, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 4, generator=g), torch.randint(0, 5, (n,), generator=g)


def _loss_at(model: nn.Module, x: torch.Tensor, y: torch.Tensor, shift: dict[str, torch.Tensor],
             loss=F.cross_entropy) -> float:
    """Independent reference: a float64 deep copy with the shifted weights written in."""
    m = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        for k, p in m.named_parameters():
            if k in shift:
                p.add_(shift[k])
        return float(loss(m(x.double()), y))


def _check_cells(s, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, seed: int, one_d: str,
                 cells: list[tuple[int, int]]) -> None:
    """Grid cells of ``s`` against a deep copy with the weights shifted in place (no nndiag code
    on that side but the directions' draw)."""
    w = {k: p.detach().double() for k, p in model.named_parameters() if p.requires_grad}
    gen = torch.Generator().manual_seed(seed)
    d1, d2 = (normalize_direction(random_direction(w, generator=gen), w, one_d=one_d) for _ in range(2))
    for i, j in cells:
        a, b = s.alphas[i], s.betas[j]
        shift = {k: a * d1[k] + b * d2[k] for k in w}
        assert s.losses[i, j] == pytest.approx(_loss_at(model, x, y, shift), rel=1e-10)


def test_stacked_equals_one_forward_per_point_on_a_mixed_network():
    model = _mixed()
    x, y = _data()
    before = snapshot(model)
    # one_d="keep": biases and the norms' affine parameters move too
    kw = dict(dim=2, steps=7, seed=3, dtype=torch.float64, one_d="keep")
    stacked = surface(model, (x, y), strategy="stacked", **kw)
    loop = surface(model, (x, y), strategy="loop", **kw)
    assert stacked.params["strategy"] == "stacked" and loop.params["strategy"] == "loop"
    assert stacked.params["points_stacked"] > 1 and loop.params["points_stacked"] is None
    np.testing.assert_allclose(stacked.losses, loop.losses, rtol=1e-12, atol=0)
    assert float(np.ptp(stacked.losses)) > 0.05  # the plane is not flat: the layers do move
    _check_cells(stacked, model, x, y, seed=3, one_d="keep", cells=[(0, 6), (3, 3), (5, 1)])
    assert same_snapshot(before, snapshot(model))


def test_stacked_in_float32_and_with_a_custom_loss():
    model = _mixed(seed=5)
    x, y = _data(seed=6)
    s32 = surface(model, (x, y), dim=2, steps=5, strategy="stacked", seed=1)
    ref = surface(model, (x, y), dim=2, steps=5, strategy="loop", seed=1)
    np.testing.assert_allclose(s32.losses, ref.losses, rtol=2e-5)

    def soft_hinge(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.multi_margin_loss(logits, target)

    kw = dict(dim=1, steps=9, seed=2, loss=soft_hinge, dtype=torch.float64)
    st = surface(model, (x, y), strategy="stacked", **kw)
    lp = surface(model, (x, y), strategy="loop", **kw)
    np.testing.assert_allclose(st.losses, lp.losses, rtol=1e-12)
    assert st.origin_loss == pytest.approx(_loss_at(model, x, y, {}, loss=soft_hinge), rel=1e-12)


def test_stacked_takes_features_with_leading_axes_and_several_batches():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(30, 6, generator=g)
    y = torch.randint(0, 3, (30,), generator=g)
    kw = dict(dim=2, steps=5, seed=0, dtype=torch.float64, batch_size=7)  # 5 batches, last one short
    a = surface(model, (x, y), strategy="stacked", **kw)
    b = surface(model, (x, y), strategy="loop", **kw)
    np.testing.assert_allclose(a.losses, b.losses, rtol=1e-12)

    def seq_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # (N, T, C) outputs
        return F.cross_entropy(out.mean(1), target)

    xs = torch.randn(10, 4, 6, generator=g)
    ys = torch.randint(0, 3, (10,), generator=g)
    kw = dict(dim=1, steps=5, seed=1, dtype=torch.float64, loss=seq_loss)
    a = surface(model, (xs, ys), strategy="stacked", **kw)
    b = surface(model, (xs, ys), strategy="loop", **kw)
    np.testing.assert_allclose(a.losses, b.losses, rtol=1e-12)


class _LogSoftmaxNet(nn.Module):
    """The PyTorch MNIST example's ending: log-probabilities out (for nll_loss)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.a, self.b, self.how = nn.Linear(6, 16), nn.Linear(16, 4), how
        self.out = nn.LogSoftmax(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.b(F.relu(self.a(x)))
        if self.how == "module":
            return self.out(z)
        if self.how == "function":
            return F.log_softmax(z, dim=-1)
        return z.softmax(1).log()  # a softmax, then an element-wise log


@pytest.mark.parametrize("how", ["module", "function", "method"])
def test_stacked_takes_softmax_endings(how):
    torch.manual_seed(0)
    model = _LogSoftmaxNet(how).eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(40, 6, generator=g), torch.randint(0, 4, (40,), generator=g)
    kw = dict(dim=2, steps=5, seed=0, dtype=torch.float64)
    if how == "method":  # .log() is a method outside the supported set: the grid falls back
        with pytest.raises(InputError, match="fully connected"):
            surface(model, (x, y), strategy="stacked", **kw)
        return
    a = surface(model, (x, y), strategy="stacked", **kw)
    b = surface(model, (x, y), strategy="loop", **kw)
    np.testing.assert_allclose(a.losses, b.losses, rtol=1e-12)
    # nll of log-probabilities is the cross-entropy of their logits
    nll = surface(model, (x, y), strategy="stacked", loss=F.nll_loss, **kw)
    np.testing.assert_allclose(nll.losses, b.losses, rtol=1e-12)


def test_stacked_is_refused_where_it_does_not_apply():
    x, y = tiny_data("cnn", n=8)
    before = snapshot(model := tiny_cnn())
    with pytest.raises(InputError, match="fully connected"):
        surface(model, (x, y), dim=1, steps=3, strategy="stacked")
    assert same_snapshot(before, snapshot(model))
    xm, ym = _data(n=8)
    with pytest.raises(InputError, match="mode='eval'"):
        surface(_mixed(), (xm, ym), dim=1, steps=3, strategy="stacked", mode="train")

    class Skip(nn.Module):  # a residual sum: two tensors meet, not a chain of layers
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.relu(self.a(x)) + x)

    xs = torch.randn(8, 4)
    with pytest.raises(InputError, match="fully connected"):
        surface(Skip(), (xs, ym[:8] % 2), dim=1, steps=3, strategy="stacked")
    # auto falls back to its other strategies there, with the same values
    s = surface(Skip(), (xs, ym[:8] % 2), dim=1, steps=3)
    assert s.params["strategy"] in ("vmap", "loop", "threads")


def test_parametrised_layers_are_never_stacked_at_fixed_weights():
    # weight_norm's moving parameters are g and v; the stacked pass reads a Linear's weight, which
    # would stay at its origin value: the landscape was flat along those layers (0.6 off in loss)
    import warnings

    from torch.nn.utils import parametrizations as P

    torch.manual_seed(0)
    model = nn.Sequential(P.weight_norm(nn.Linear(6, 16)), nn.ReLU(), P.spectral_norm(nn.Linear(16, 3))).eval()
    x, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    with pytest.raises(InputError, match="fully connected"):
        surface(model, (x, y), dim=1, steps=3, strategy="stacked")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (vmap's "no batching rule" notice is not passed on)
        auto = surface(model, (x, y), dim=2, steps=5, dtype=torch.float64)
        ref = surface(model, (x, y), dim=2, steps=5, strategy="vmap", dtype=torch.float64)
    assert auto.params["strategy"] != "stacked"
    np.testing.assert_allclose(auto.losses, ref.losses, rtol=1e-12)
    assert np.ptp(ref.losses) > 0.1  # the plane is not flat


def test_a_last_layer_with_a_frozen_weight_and_a_moving_bias():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).eval()
    model[2].weight.requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(30, 5, generator=g), torch.randint(0, 3, (30,), generator=g)
    kw = dict(dim=2, steps=5, seed=0, dtype=torch.float64, one_d="keep")  # biases move too
    a = surface(model, (x, y), strategy="stacked", **kw)
    b = surface(model, (x, y), strategy="loop", **kw)
    np.testing.assert_allclose(a.losses, b.losses, rtol=1e-12)


@pytest.mark.parametrize("strategy", ["loop", "vmap", "threads"])
def test_tied_weights_move_together_in_every_strategy(strategy):
    """One Parameter under two names. The bound copy used to give each name its own Parameter:
    ``vmap`` (functional_call no longer saw the tie) and ``threads`` (worker copies bound one
    name only) then evaluated points with the second name's weight left elsewhere."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3)).eval()
    model[2].weight = model[0].weight
    x = torch.randn(12, 4)
    y = torch.randint(0, 3, (12,))
    with pytest.raises(InputError, match="fully connected"):  # stacked leaves ties to the others
        surface(model, (x, y), dim=1, steps=3, strategy="stacked")
    s = surface(model, (x, y), dim=1, steps=5, seed=1, dtype=torch.float64, strategy=strategy, threads=2)
    assert s.params["strategy"] == strategy
    w = {k: p.detach().double() for k, p in model.named_parameters()}
    d = normalize_direction(random_direction(w, generator=torch.Generator().manual_seed(1)), w)
    for i in range(5):
        shift = {k: s.alphas[i] * d[k] for k in w}
        assert s.losses[i] == pytest.approx(_loss_at(model, x, y, shift), rel=1e-10)


def test_passes_reuse_their_buffers_without_stale_values(monkeypatch):
    """Many short passes (3 points, then 1 at the end of each 16-point chunk) write into the
    same buffers; every point must still equal the loop's value."""
    import nndiag.landscape.stacked as stacked_mod

    monkeypatch.setattr(stacked_mod, "MAX_POINTS", 3)
    model = _mixed(seed=2)
    x, y = _data(seed=4)
    kw = dict(dim=2, steps=7, seed=5, dtype=torch.float64, one_d="keep")
    st = surface(model, (x, y), strategy="stacked", **kw)
    assert st.params["points_stacked"] == 3
    lp = surface(model, (x, y), strategy="loop", **kw)
    np.testing.assert_allclose(st.losses, lp.losses, rtol=1e-12, atol=0)


def test_points_per_pass_is_bounded_by_the_moving_weights():
    """A wide layer on a few examples: the activations are tiny, but each point's copy of the
    256×256 weight is 256 KiB, so a pass holds at most STACK_BYTES of them (it used to stack
    MAX_POINTS = 64 such copies, 16 MiB, sized by the activations alone)."""
    from nndiag.landscape.stacked import STACK_BYTES

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 3)).eval()
    x, y = torch.randn(4, 8), torch.randint(0, 3, (4,))
    st = surface(model, (x, y), dim=1, steps=9, seed=0, strategy="stacked")
    assert st.params["points_stacked"] == STACK_BYTES // (256 * 256 * 4)
    lp = surface(model, (x, y), dim=1, steps=9, seed=0, strategy="loop")
    np.testing.assert_allclose(st.losses, lp.losses, rtol=2e-5)


def test_auto_picks_stacked_for_a_fully_connected_model():
    model = _mixed(seed=1)
    x, y = _data(seed=2)
    s = surface(model, (x, y), dim=1, steps=21, seed=0, threads=2)
    assert s.params["strategy"] == "stacked"
    # whole passes per call: a small network stacks 64 points, more than the default chunk of 16
    assert s.params["points_stacked"] == 64 and s.params["chunk"] == 64
    ref = surface(model, (x, y), dim=1, steps=21, seed=0, strategy="loop", threads=2)
    np.testing.assert_allclose(s.losses, ref.losses, rtol=2e-5)


def _relu_chain(seed: int = 0) -> nn.Module:
    """Linear layers joined by activations that map 1 to 1: biases ride in the products."""
    torch.manual_seed(seed)
    m = nn.Sequential(
        nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 16, bias=False),
        nn.LeakyReLU(0.1), nn.Linear(16, 12), nn.ELU(), nn.Identity(), nn.Linear(12, 12), nn.ReLU6(),
        nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 5),
    )
    m[9].bias.requires_grad_(False)  # a fixed bias beside a moving weight
    return m.eval()


@pytest.mark.parametrize("one_d", ["zero", "keep"])
def test_biases_as_a_ones_row_equal_one_forward_per_point(monkeypatch, one_d):
    import sys

    surface_mod = sys.modules[surface.__module__]
    built = []
    real = surface_mod.build_stacked

    def spy(*a, **k):
        out = real(*a, **k)
        built.append(out[0] if out is not None else None)
        return out

    monkeypatch.setattr(surface_mod, "build_stacked", spy)
    model = _relu_chain()
    x, y = _data(seed=4)
    before = snapshot(model)
    kw = dict(dim=2, steps=5, seed=2, dtype=torch.float64, one_d=one_d)
    stacked = surface(model, (x, y), strategy="stacked", **kw)
    loop = surface(model, (x, y), strategy="loop", **kw)
    st = built[0]
    # the first layer and the 16→16, 16→12 and 12→12 layers write a ones row; the 12→10 layer
    # reads one (ReLU6 keeps it), the 10→5 layer after the tanh does not
    assert st._aug_first and st._aug_in == {"4", "6", "9", "11"} and st._aug_out == {"4", "6", "9"}
    np.testing.assert_allclose(stacked.losses, loop.losses, rtol=1e-12)
    assert float(np.ptp(stacked.losses)) > 0.05
    _check_cells(stacked, model, x, y, seed=2, one_d=one_d, cells=[(0, 4), (2, 2), (4, 1)])
    assert same_snapshot(before, snapshot(model))


def test_a_fully_connected_model_is_not_rewritten_and_its_activations_run_in_place():
    # the stacked evaluator reads the plain copy's graph (fold skipped); nn.ReLU modules there
    # overwrite the pass's own buffers, never a cached first layer
    model = _relu_chain(seed=1)
    x, y = _data(seed=5)
    s = surface(model, (x, y), dim=2, steps=5, seed=0, threads=1)
    assert s.params["strategy"] == "stacked" and s.params["in_place_ops"] == 0
    assert s.params["first_layer_precomputed"] == "1"
    again = surface(model, (x, y), dim=2, steps=5, seed=0, threads=1)
    np.testing.assert_array_equal(s.losses, again.losses)  # the cached first layer was not overwritten
    ref = surface(model, (x, y), dim=2, steps=5, seed=0, strategy="loop", fold=False, threads=1)
    np.testing.assert_allclose(s.losses, ref.losses, rtol=2e-5)


def test_a_first_layer_that_misses_the_origin_is_dropped_and_the_grid_still_stacked(monkeypatch):
    # when the grid is stacked, the stacked pass's origin check also stands for the precomputed
    # first layer; when it fails, the precomputation is checked alone, dropped, and stacking retried
    from nndiag.landscape import first_layer as fl

    real = fl.install

    def broken(bound, inputs, **kw):
        name = real(bound, inputs, **kw)
        with torch.inference_mode():
            for _, y0, _ in bound.first_layer[1].values():
                y0.add_(0.5)  # a wrong cached output
        return name

    monkeypatch.setattr(fl, "install", broken)
    model = _relu_chain(seed=2)
    x, y = _data(seed=6)
    kw = dict(dim=2, steps=5, seed=1, dtype=torch.float64, threads=1)
    s = surface(model, (x, y), **kw)
    assert s.params["strategy"] == "stacked" and s.params["first_layer_precomputed"] is None
    monkeypatch.setattr(fl, "install", real)
    ref = surface(model, (x, y), strategy="loop", **kw)
    assert ref.params["first_layer_precomputed"] == "1"
    np.testing.assert_allclose(s.losses, ref.losses, rtol=1e-12)


class _SharedValues(nn.Module):
    """Activations on values another node reads too: a ReLU whose result is dropped, and one
    after a dropout that passes on a value the next layer also reads."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.act, self.l2 = nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8)
        self.drop, self.l3, self.l4 = nn.Dropout(0.1), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.l1(x)
        self.act(h)  # read, result unused
        g = self.l2(h)
        torch.relu(self.drop(g))  # the dropout passes g itself on
        return self.l4(torch.relu(self.l3(g)))


def test_activations_never_overwrite_a_value_another_node_reads():
    torch.manual_seed(0)
    model = _SharedValues().eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(30, 6, generator=g), torch.randint(0, 3, (30,), generator=g)
    kw = dict(dim=2, steps=5, seed=0, dtype=torch.float64, threads=1)
    s = surface(model, (x, y), **kw)
    ref = surface(model, (x, y), strategy="loop", **kw)
    assert s.params["strategy"] == "stacked"  # (an overwritten value would miss the origin: no stacking)
    np.testing.assert_allclose(s.losses, ref.losses, rtol=1e-12)
