"""Second-order forward passes and the split trace against dense Hessians."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev

from nndiag.errors import InputError
from nndiag.landscape import hessian_spectrum
from nndiag.landscape.hvp import HessianOperator
from nndiag.landscape.split_trace import GaussNewtonProbes, split_trace
from nndiag.landscape.taylor import QuadraticForms, Unsupported

from ._dense import dense_hessian, tiny_cnn, tiny_data, tiny_mlp

F64 = torch.float64


class _Shortcut(nn.Module):
    """A residual block with ResNet20's option-A shortcut (strided slice + channel padding)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        short = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 1, 1))
        return F.relu(self.bn(self.conv(x)) + short)


class _ResNetLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 2, 3, padding=1)
        self.block = _Shortcut()
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(F.relu(self.stem(x), inplace=True))
        out = F.adaptive_avg_pool2d(out, 1).view(out.size(0), -1)
        return self.head(self.drop(out))


def _relu_cnn() -> nn.Module:
    """In-place ReLU after BatchNorm: the primal pass must keep BatchNorm's output for the mask."""
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Dropout(0.2), nn.Linear(3 * 4 * 4, 4))


def _smooth_mlp() -> nn.Module:
    torch.manual_seed(4)
    # SiLU in place: its derivative needs the pre-activation, which the primal pass must keep
    return nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 8), nn.SiLU(inplace=True), nn.Linear(8, 6),
                         nn.Sigmoid(), nn.Linear(6, 5), nn.LeakyReLU(0.1), nn.Linear(5, 4))


class _Twice(nn.Module):
    """One linear layer applied twice: the output is quadratic in its weights."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.inp, self.mid, self.out = nn.Linear(6, 5), nn.Linear(5, 5), nn.Linear(5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.mid(torch.relu(self.mid(torch.relu(self.inp(x)))))))


class _Pads(nn.Module):
    """Reflect padding, constant padding with a non-zero value, a slice, a scalar offset and a
    functional leaky ReLU with its own slope."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(7)
        self.conv, self.head = nn.Conv2d(1, 2, 3), nn.Linear(2 * 8 * 8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv(F.pad(x, (1, 1, 1, 1), mode="reflect")))
        h = F.pad(h, (1, 1, 1, 1), value=0.5)
        return self.head(F.leaky_relu(h[:, :, 1:-1, 1:-1].flatten(1) + 1.0, 0.2))


def _resnet_like() -> nn.Module:
    torch.manual_seed(6)
    return _ResNetLike()


MODELS = {
    "tanh-mlp": (lambda: tiny_mlp(), "mlp"),
    "tanh-bn-cnn": (lambda: tiny_cnn(bn=True), "cnn"),
    "relu-bn-maxpool-cnn": (_relu_cnn, "cnn"),
    "resnet-shortcut": (_resnet_like, "cnn"),
    "gelu-silu-sigmoid-leaky-mlp": (_smooth_mlp, "mlp"),
    "shared-layer": (_Twice, "mlp"),
    "pad-modes": (_Pads, "cnn"),
}


def _setup(name: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor, HessianOperator]:
    make, kind = MODELS[name]
    model = make().double()
    x, y = tiny_data(kind, n=40)
    with torch.no_grad():  # non-trivial BatchNorm statistics
        model.train()
        model(x.double())
    model.eval()
    op = HessianOperator(model, (x, y), dtype=F64, batch_size=16)  # three batches: weights matter
    return model, x, y, op


def _dense_gauss_newton(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """``Σ_n J_nᵀ Λ_n J_n`` from the dense Jacobian of the logits and the loss's logit Hessian."""
    named = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
    buffers = dict(model.named_buffers())

    def logits(params: dict[str, torch.Tensor]) -> torch.Tensor:
        return functional_call(model, {**buffers, **params}, (x.double(),))

    jac = jacrev(logits)(named)
    n, c = len(y), 4
    J = torch.cat([jac[k].reshape(n * c, -1) for k in named], dim=1)
    z = logits(named).detach()
    lam = torch.autograd.functional.hessian(lambda v: F.cross_entropy(v.reshape(n, c), y), z.reshape(-1))
    return (J.T @ lam @ J).numpy()


@pytest.mark.parametrize("name", list(MODELS))
def test_quadratic_forms_equal_dense_hessian(name):
    model, x, y, op = _setup(name)
    H = dense_hessian(model, x, y)
    qf = QuadraticForms(model, op.params, op.buffers, op.data, op.loss_fn)
    g = torch.Generator().manual_seed(0)
    Z = (torch.randint(0, 2, (5, op.dim), generator=g) * 2 - 1).to(F64)
    got = qf(Z).numpy()
    want = np.einsum("ki,ij,kj->k", Z.numpy(), H, Z.numpy())
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12 * np.abs(H).max())


@pytest.mark.parametrize("name", list(MODELS))
def test_parts_are_gauss_newton_and_residual(name):
    model, x, y, op = _setup(name)
    H = dense_hessian(model, x, y)
    G = _dense_gauss_newton(model, x, y)
    qf = QuadraticForms(model, op.params, op.buffers, op.data, op.loss_fn)
    g = torch.Generator().manual_seed(1)
    Z = (torch.randint(0, 2, (4, op.dim), generator=g) * 2 - 1).to(F64)
    r, gn = qf.parts(Z)
    Zn = Z.numpy()
    np.testing.assert_allclose(gn.numpy(), np.einsum("ki,ij,kj->k", Zn, G, Zn), rtol=1e-9)
    np.testing.assert_allclose(r.numpy(), np.einsum("ki,ij,kj->k", Zn, H - G, Zn), rtol=1e-7,
                               atol=1e-10 * np.abs(H).max())
    r1, gn1 = qf.parts(Z, second_order=False)  # first derivatives only: same Gauss–Newton part
    np.testing.assert_allclose(gn1.numpy(), gn.numpy(), rtol=1e-12)
    assert np.all(r1.numpy() == 0)


@pytest.mark.parametrize("name, vanishes", [("relu-bn-maxpool-cnn", True), ("resnet-shortcut", True),
                                            ("tanh-mlp", False), ("gelu-silu-sigmoid-leaky-mlp", False),
                                            ("shared-layer", False)])
def test_residual_trace_vanishes_exactly_when_claimed(name, vanishes):
    model, x, y, op = _setup(name)
    H, G = dense_hessian(model, x, y), _dense_gauss_newton(model, x, y)
    qf = QuadraticForms(model, op.params, op.buffers, op.data, op.loss_fn)
    assert qf.residual_vanishes is vanishes
    gap = abs(np.trace(H) - np.trace(G)) / abs(np.trace(H))
    if vanishes:
        assert gap < 1e-10
    else:  # the structural rule is needed: these models have a real residual trace
        assert gap > 1e-4


@pytest.mark.parametrize("name", ["relu-bn-maxpool-cnn", "tanh-mlp"])
def test_gauss_newton_probes_are_unbiased(name):
    model, x, y, op = _setup(name)
    G = _dense_gauss_newton(model, x, y)
    gn = GaussNewtonProbes(model, op.params, op.buffers, op.data, op.loss_fn, chunk=32)
    assert [len(lg) for lg, _ in gn.graphs] == [32, 8]  # batches of 16, 16, 8 joined up to 32
    start = 0
    for logits, a in gn.graphs:  # A_n A_nᵀ is the logit Hessian of the chunk's share of the loss
        m = len(logits)
        yc = y[start:start + m]
        start += m
        lam = torch.autograd.functional.hessian(lambda v, yc=yc, m=m: F.cross_entropy(v, yc) * m / len(y),
                                                logits.detach())
        blocks = torch.stack([lam[i, :, i, :] for i in range(m)])
        off = lam.clone()
        for i in range(m):
            off[i, :, i, :] = 0
        assert off.abs().max() < 1e-15  # block-diagonal: examples are independent
        np.testing.assert_allclose((a @ a.transpose(1, 2)).numpy(), blocks.numpy(), atol=1e-14)
    samples = gn(3000, torch.Generator().manual_seed(2)).numpy()
    se = samples.std(ddof=1) / np.sqrt(len(samples))
    assert abs(samples.mean() - np.trace(G)) < 4 * se
    assert se < 0.05 * np.trace(G)


@pytest.mark.parametrize("name", ["relu-bn-maxpool-cnn", "tanh-mlp", "resnet-shortcut"])
def test_split_trace_agrees_with_exact_trace(name):
    model, x, y, op = _setup(name)
    exact = float(np.trace(dense_hessian(model, x, y)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    r = hessian_spectrum(model, (x, y), top_k=0, trace=True, trace_rtol=0.02, trace_probes=4000, dtype=F64,
                         batch_size=16)
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert r.params["trace_method"] == "split" and r.params["trace_method_requested"] == "auto"
    assert r.trace_stderr <= 0.02 * abs(r.trace)
    assert abs(r.trace - exact) < 4 * r.trace_stderr
    parts = r.trace_estimate.parts
    assert parts["residual_vanishes"] is (name != "tanh-mlp")
    assert parts["output_probes"] > 0 and r.n_hvp == 0


def test_split_with_a_custom_loss_uses_parameter_probes_only():
    model, x, y, op = _setup("tanh-mlp")

    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, target) + 0.1 * (logits ** 2).mean()

    named = {k: p for k, p in model.named_parameters()}
    flat0 = torch.cat([p.detach().reshape(-1) for p in named.values()])
    sizes = [p.numel() for p in named.values()]

    def f(flat: torch.Tensor) -> torch.Tensor:
        d = {k: t.reshape(p.shape) for (k, p), t in zip(named.items(), flat.split(sizes), strict=True)}
        return loss(functional_call(model, {**dict(model.named_buffers()), **d}, (x.double(),)), y)

    exact = float(torch.autograd.functional.hessian(f, flat0).trace())
    r = hessian_spectrum(model, (x, y), loss=loss, top_k=0, trace=True, trace_method="split", trace_rtol=0.02,
                         trace_probes=4000, dtype=F64)
    assert r.trace_estimate.parts["output_probes"] == 0
    assert abs(r.trace - exact) < 4 * r.trace_stderr


def test_split_is_refused_or_replaced_where_it_does_not_apply():
    model, x, y, _ = _setup("relu-bn-maxpool-cnn")
    r = hessian_spectrum(model, (x, y), top_k=0, trace=True, mode="train", trace_probes=30, dtype=F64)
    assert r.params["trace_method"] == "hutchpp"
    with pytest.raises(InputError, match="train mode"):
        hessian_spectrum(model, (x, y), top_k=0, trace=True, trace_method="split", mode="train", dtype=F64)
    torch.manual_seed(0)
    ln = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 4)).double()
    xm, ym = tiny_data("mlp")
    r = hessian_spectrum(ln, (xm, ym), top_k=0, trace=True, trace_probes=30, dtype=F64)
    assert r.params["trace_method"] == "hutchpp"
    with pytest.raises(InputError, match="LayerNorm"):
        hessian_spectrum(ln, (xm, ym), top_k=0, trace=True, trace_method="split", dtype=F64)
    with pytest.raises(Unsupported, match="train mode"):
        QuadraticForms(ln.train(), {}, {}, None, F.cross_entropy)  # type: ignore[arg-type]


def test_split_trace_spends_a_fixed_budget_without_rtol():
    model, x, y, op = _setup("relu-bn-maxpool-cnn")
    qf = QuadraticForms(model, op.params, op.buffers, op.data, op.loss_fn)
    gn = GaussNewtonProbes(model, op.params, op.buffers, op.data, op.loss_fn)
    est = split_trace(qf, gn, op.dim, n_probes=24, rtol=None, dtype=F64)
    assert est.n_matvec == 24 == est.parts["parameter_probes"] + est.parts["output_probes"]
    with pytest.raises(InputError, match="at least 4"):
        split_trace(qf, gn, op.dim, n_probes=3)


def test_token_model_quadratic_forms_and_split_trace():
    from ._dense import tiny_embedding, token_data

    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(11, 4, padding_idx=0), nn.Flatten(), nn.ReLU(), nn.Linear(12, 4)).double()
    for m in (model, tiny_embedding().double()):
        x, y = token_data(n=40)
        m.eval()
        op = HessianOperator(m, (x, y), dtype=F64, batch_size=16)
        assert op.data.batches[0][0].dtype == torch.int64
        H = dense_hessian(m, x, y)
        qf = QuadraticForms(m, op.params, op.buffers, op.data, op.loss_fn)
        Z = (torch.randint(0, 2, (4, op.dim), generator=torch.Generator().manual_seed(0)) * 2 - 1).to(F64)
        np.testing.assert_allclose(qf(Z).numpy(), np.einsum("ki,ij,kj->k", Z.numpy(), H, Z.numpy()), rtol=1e-9)
        assert qf.residual_vanishes is (m is model)
        r = hessian_spectrum(m, (x, y), top_k=0, trace=True, trace_rtol=0.02, trace_probes=4000, dtype=F64)
        assert r.params["trace_method"] == "split"
        assert abs(r.trace - np.trace(H)) < 4 * r.trace_stderr


def test_split_trace_does_not_depend_on_timing(monkeypatch):
    # the allocation uses counted costs: a seed gives the same probes however long each took
    import importlib
    import itertools

    st = importlib.import_module("nndiag.landscape.split_trace")  # the module (the package exports the function)

    model, x, y, _ = _setup("tanh-mlp")
    first = hessian_spectrum(model, (x, y), top_k=0, trace=True, trace_probes=60, trace_rtol=None, seed=3)
    ticks = itertools.count()
    monkeypatch.setattr(st.time, "perf_counter", lambda: float(next(ticks) ** 2))  # erratic "durations"
    second = hessian_spectrum(model, (x, y), top_k=0, trace=True, trace_probes=60, trace_rtol=None, seed=3)
    assert second.trace == first.trace and second.trace_stderr == first.trace_stderr
    p1, p2 = first.trace_estimate.parts, second.trace_estimate.parts
    assert (p1["parameter_probes"], p1["output_probes"]) == (p2["parameter_probes"], p2["output_probes"])


def test_active_functional_dropout_is_refused():
    class Drop(nn.Module):
        def __init__(self, training: bool | None) -> None:
            super().__init__()
            self.lin, self.flag = nn.Linear(6, 4), training

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.flag is None:
                return F.dropout(self.lin(x), 0.3)  # training defaults to True: random masks
            return F.dropout(self.lin(x), 0.3, training=self.flag)

    x, y = tiny_data("mlp")
    for flag, refused in ((None, True), (True, True), (False, False)):
        model = Drop(flag).double().eval()
        op = HessianOperator(model, (x, y), dtype=F64, lazy=True)
        if refused:
            with pytest.raises(Unsupported, match="dropout"):
                QuadraticForms(model, op.params, op.buffers, op.data, op.loss_fn)
        else:
            qf = QuadraticForms(model, op.params, op.buffers, op.data, op.loss_fn)
            Z = (torch.randint(0, 2, (3, op.dim), generator=torch.Generator().manual_seed(0)) * 2 - 1).to(F64)
            H = dense_hessian(model, x, y)
            np.testing.assert_allclose(qf(Z).numpy(), np.einsum("ki,ij,kj->k", Z.numpy(), H, Z.numpy()), rtol=1e-9)


class _FunctionalHead(nn.Module):
    """The output layer as ``F.linear`` with its own parameter (a tied-head pattern): the split
    trace's tangent rules meet the varying weight only at the first probe."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.body = nn.Linear(6, 8)
        self.head = nn.Parameter(torch.randn(4, 8) / 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(torch.relu(self.body(x)), self.head)


def test_split_found_unsupported_at_the_first_probe_falls_back_to_hutchpp():
    model = _FunctionalHead().double().eval()
    x, y = tiny_data("mlp", n=40)
    exact = float(np.trace(dense_hessian(model, x, y)))
    r = hessian_spectrum(model, (x, y), top_k=0, trace=True, trace_rtol=0.02, trace_probes=2000, dtype=F64)
    assert r.params["trace_method"] == "hutchpp" and r.params["trace_method_requested"] == "auto"
    assert abs(r.trace - exact) < 4 * r.trace_stderr
    with pytest.raises(InputError, match="functional linear"):
        hessian_spectrum(model, (x, y), top_k=0, trace=True, trace_method="split", dtype=F64)


def test_split_trace_after_eigenvalues_and_density_frees_the_gradient_graphs(monkeypatch):
    import importlib

    spectrum = importlib.import_module("nndiag.landscape.spectrum")
    model, x, y, _ = _setup("relu-bn-maxpool-cnn")
    ops: list[HessianOperator] = []
    seen: list[bool] = []
    init = HessianOperator.__init__

    def record_op(self, *a, **kw):
        init(self, *a, **kw)
        ops.append(self)

    class Probes(GaussNewtonProbes):
        def __init__(self, *a, **kw):
            seen.append(ops[-1]._graphs is None)  # built after the operator's graphs were freed
            super().__init__(*a, **kw)

    monkeypatch.setattr(HessianOperator, "__init__", record_op)
    monkeypatch.setattr(spectrum, "GaussNewtonProbes", Probes)
    H = dense_hessian(model, x, y)
    ev = np.linalg.eigvalsh(H)
    r = hessian_spectrum(model, (x, y), top_k=2, trace=True, density=True, slq_steps=20, trace_rtol=0.02,
                         trace_probes=4000, dtype=F64, batch_size=16)
    assert seen == [True] and r.params["trace_method"] == "split"
    np.testing.assert_allclose(r.eigenvalues, ev[::-1][:2], rtol=1e-4)
    assert abs(r.trace - np.trace(H)) < 4 * r.trace_stderr
    assert abs(r.density.pooled()[1].sum() - 1) < 1e-6  # the density ran on the (then still cached) graphs


def test_primal_pass_keeps_only_what_the_tangent_rules_read():
    # values where a rule reads them, signs where only a ReLU does, shapes elsewhere; the dense
    # comparisons above run on these reduced primals
    model, x, y, op = _setup("resnet-shortcut")
    qf = QuadraticForms(model, op.params, op.buffers, op.data, op.loss_fn)
    kinds = {n.name: k for n, k in qf.retention.items()}
    assert kinds["x"] == kinds["block_conv"] == kinds["head"] == "value"  # conv input, BatchNorm input, logits
    assert kinds["stem"] == kinds["add"] == "mask"  # read by ReLUs only
    assert kinds["pad"] == kinds["block_bn"] == "shape"  # feed a residual sum: derivatives only
    env = {n.name: v for n, v in qf.primals[0].items() if not isinstance(n, tuple)}
    assert env["stem"].dtype == torch.bool and env["pad"].device.type == "meta"
    assert env["block_conv"].dtype == F64 and env["block_conv"].device.type == "cpu"
    Z = (torch.randint(0, 2, (3, op.dim), generator=torch.Generator().manual_seed(1)) * 2 - 1).to(F64)
    H = dense_hessian(model, x, y)
    np.testing.assert_allclose(qf(Z).numpy(), np.einsum("ki,ij,kj->k", Z.numpy(), H, Z.numpy()), rtol=1e-9)
