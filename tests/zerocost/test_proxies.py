"""Each proxy against an independent NumPy computation on a small MLP / CNN."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from nndiag._utils.model_state import same_snapshot, snapshot
from nndiag.errors import AnalysisError, InputError
from nndiag.zerocost import proxies as P
from nndiag.zerocost.score import PROXY_NAMES, compute_proxies, parse_proxies


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))


def _xy(n=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


def _np(net):
    return [t.detach().double().numpy() for t in (net[0].weight, net[0].bias, net[2].weight, net[2].bias)]


def _np_grads(w1, b1, w2, b2, x, y):
    """Manual backprop of mean cross-entropy: returns (pre, dpre, out, dout, dW1, dW2)."""
    pre = x @ w1.T + b1
    h = np.maximum(pre, 0)
    out = h @ w2.T + b2
    p = np.exp(out - out.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    dout = p.copy()
    dout[np.arange(len(y)), y] -= 1
    dout /= len(y)
    dh = dout @ w2
    dpre = dh * (pre > 0)
    return pre, dpre, out, dout, dpre.T @ x, dout.T @ h


def test_grad_norm_snip_fisher_match_manual_backprop():
    net = _mlp()
    x, y = _xy()
    w1, b1, w2, b2 = _np(net)
    pre, dpre, out, dout, g1, g2 = _np_grads(w1, b1, w2, b2, x.double().numpy(), y.numpy())
    assert P.grad_norm(net, x, y) == pytest.approx(np.linalg.norm(g1) + np.linalg.norm(g2), rel=1e-5)
    assert P.snip(net, x, y) == pytest.approx(np.abs(w1 * g1).sum() + np.abs(w2 * g2).sum(), rel=1e-5)
    fisher = 0.5 * ((pre * dpre) ** 2).mean(0).sum() + 0.5 * ((out * dout) ** 2).mean(0).sum()
    assert P.fisher(net, x, y) == pytest.approx(fisher, rel=1e-4)


def test_grasp_matches_finite_difference_hessian_vector_product():
    net = _mlp(1)
    x, y = _xy(seed=1)
    w1, b1, w2, b2 = _np(net)
    xs, ys = x.double().numpy(), y.numpy()
    _, _, _, _, g1, g2 = _np_grads(w1, b1, w2, b2, xs, ys)
    eps = 1e-6
    _, _, _, _, p1, p2 = _np_grads(w1 + eps * g1, b1, w2 + eps * g2, b2, xs, ys)
    _, _, _, _, m1, m2 = _np_grads(w1 - eps * g1, b1, w2 - eps * g2, b2, xs, ys)
    hg1, hg2 = (p1 - m1) / (2 * eps), (p2 - m2) / (2 * eps)
    expected = -(w1 * hg1).sum() - (w2 * hg2).sum()
    assert P.grasp(net, x, y) == pytest.approx(expected, rel=1e-3, abs=1e-7)


def test_synflow_abs_weights_ones_input_and_bn_bypassed():
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 3))
    with torch.no_grad():  # BN statistics that would change the result if BN were applied
        net[1].running_mean.fill_(3.0)
        net[1].running_var.fill_(0.01)
        net[1].weight.fill_(-2.0)
    w1, b1 = np.abs(net[0].weight.detach().double().numpy()), np.abs(net[0].bias.detach().double().numpy())
    w2 = np.abs(net[3].weight.detach().double().numpy())
    h = w1 @ np.ones(5) + b1  # positive, so ReLU is the identity
    dh = w2.T @ np.ones(3)
    expected = (w2 * np.outer(np.ones(3), h)).sum() + (w1 * np.outer(dh, np.ones(5))).sum()
    x, _ = _xy()
    assert P.synflow(net, x) == pytest.approx(expected, rel=1e-10)


def test_jacob_cov_and_nwot_match_numpy():
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(5, 40), nn.ReLU(), nn.Linear(40, 3))
    x, _ = _xy(seed=3)
    w1, b1, w2, _ = _np(net)
    xs = x.double().numpy()
    pre = xs @ w1.T + b1
    jac = ((pre > 0) * (w2.T @ np.ones(3))) @ w1  # d(sum out)/dx per example
    assert np.all(np.abs(jac).sum(1) > 0)
    lam = np.linalg.eigvalsh(np.corrcoef(jac))
    expected = -np.sum(np.log(lam + 1e-5) + 1 / (lam + 1e-5))
    assert P.jacob_cov(net, x) == pytest.approx(expected, rel=1e-4)
    c = (pre > 0).astype(float)
    k = c @ c.T + (1 - c) @ (1 - c).T
    assert P.nwot(net, x) == pytest.approx(np.linalg.slogdet(k)[1], rel=1e-10)


class _FunctionalRelu(nn.Module):
    """Two hidden layers with functional ReLUs (NASLib's module hooks see none of them)."""

    def __init__(self, style: str) -> None:
        super().__init__()
        self.a, self.b, self.c, self.style = nn.Linear(5, 30), nn.Linear(30, 20), nn.Linear(20, 3), style

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        h = torch.nn.functional.relu(h, inplace=True) if self.style == "inplace" else h.relu()
        h = self.b(h)
        return self.c(torch.relu(h) if self.style == "inplace" else nn.functional.relu(h))


def test_nwot_counts_functional_relus_once_each():
    x, _ = _xy(seed=4)
    xs = x.double().numpy()
    for style in ("inplace", "method"):
        torch.manual_seed(4)
        net = _FunctionalRelu(style)
        w1, b1 = net.a.weight.detach().double().numpy(), net.a.bias.detach().double().numpy()
        w2, b2 = net.b.weight.detach().double().numpy(), net.b.bias.detach().double().numpy()
        pre1 = xs @ w1.T + b1
        pre2 = np.maximum(pre1, 0) @ w2.T + b2
        k = sum(c @ c.T + (1 - c) @ (1 - c).T for c in ((pre1 > 0) * 1.0, (pre2 > 0) * 1.0))
        assert P.nwot(net, x) == pytest.approx(np.linalg.slogdet(k)[1], rel=1e-10)
        # the same network with nn.ReLU modules (each calls F.relu: counted once, not twice)
        seq = nn.Sequential(net.a, nn.ReLU(), net.b, nn.ReLU(), net.c)
        assert P.nwot(seq, x) == pytest.approx(P.nwot(net, x), rel=1e-12)


def test_params_flops_zen():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    x = torch.randn(4, 3, 6, 6)
    assert P.params(net) == 3 * 8 * 9 + 8 + 16 + 8 * 4 + 4
    assert P.flops(net, x) == 6 * 6 * 8 * 27 + 8 * 4
    # zen by its definition, with the same Gaussian draws (weights in module order, then z, eps)
    g = torch.Generator().manual_seed(5)
    w = torch.randn(8, 3, 3, 3, generator=g)
    torch.randn(4, 8, generator=g)
    z, eps = torch.randn(x.shape, generator=g), torch.randn(x.shape, generator=g)

    def feat(t):
        a = nn.functional.conv2d(t, w, padding=1)
        a = (a - a.mean((0, 2, 3), keepdim=True)) / torch.sqrt(a.var((0, 2, 3), unbiased=False, keepdim=True) + 1e-5)
        return torch.relu(a), a

    f1, _ = feat(z)
    f2, _ = feat(z + 0.01 * eps)
    delta = (f1 - f2).abs().reshape(4, -1).sum(1).mean()
    c1 = nn.functional.conv2d(z, w, padding=1)
    c2 = nn.functional.conv2d(z + 0.01 * eps, w, padding=1)
    rv = 1.0
    rv_ch = torch.ones(8)
    for c in (c1, c2):
        rv_ch = 0.9 * rv_ch + 0.1 * c.var((0, 2, 3), unbiased=True)
    rv = float(rv_ch.mean())
    expected = math.log(float(delta)) + math.log(math.sqrt(rv))
    assert P.zen(net, x, seed=5) == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("name", PROXY_NAMES)
def test_every_proxy_leaves_the_model_as_it_was(name):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    net.eval()
    net[0].bias.requires_grad_(False)
    net[5].weight.grad = torch.full_like(net[5].weight, 0.5)
    net[2].register_forward_hook(lambda *a: None)
    x, y = torch.randn(6, 3, 5, 5), torch.randint(0, 3, (6,))
    before = snapshot(net)
    res = compute_proxies(net, x, y, [name])
    assert not res["errors"], res["errors"]
    assert math.isfinite(res[name])
    assert same_snapshot(before, snapshot(net))


def test_failures_become_rows_not_crashes():
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    res = compute_proxies(nn.Sequential(nn.ReLU()), x, y, ["grad_norm", "snip", "params"])
    assert math.isnan(res["grad_norm"]) and "no Conv or Linear" in res["errors"]["grad_norm"]
    assert res["params"] == 0.0
    nan_net = _mlp()
    with torch.no_grad():
        nan_net[0].weight[0, 0] = float("nan")
    res = compute_proxies(nan_net, x, y, ["gradsign", "snip", "params"])
    assert "NaN" in res["errors"]["gradsign"] and "NaN" in res["errors"]["snip"]
    with pytest.raises(InputError, match="at least 2"):
        P.snip(_mlp(), x[:1], y[:1])
    with pytest.raises(InputError, match="unknown proxy"):
        parse_proxies("gradsign,foo")
    with pytest.raises(AnalysisError, match="ReLU"):
        P.nwot(nn.Sequential(nn.Linear(5, 3)), x)
    with pytest.raises(AnalysisError, match="ReLU-like"):  # saturating activations have no such code
        P.nwot(nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)), x)


class NewGELUActivation(nn.Module):
    """Hugging Face GPT-2's GELU: a tanh formula (no F.gelu call for the function mode to see)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class GELUActivation(nn.Module):
    """Hugging Face's "gelu": a module outside torch.nn around F.gelu (coded once, not twice)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.gelu(x)


def test_nwot_codes_gelu_silu_and_leaky_relu_networks_at_zero():
    x, _ = _xy(seed=5)
    xs = x.double().numpy()
    torch.manual_seed(5)
    a, b, c = nn.Linear(5, 30), nn.Linear(30, 20), nn.Linear(20, 3)
    w1, b1 = a.weight.detach().double().numpy(), a.bias.detach().double().numpy()
    w2, b2 = b.weight.detach().double().numpy(), b.bias.detach().double().numpy()
    pre1 = xs @ w1.T + b1
    for act1, act2, f1 in ((nn.GELU(), nn.SiLU(), lambda v: v * 0.5 * (1 + np.vectorize(math.erf)(v / math.sqrt(2)))),
                           (nn.LeakyReLU(0.1), nn.ELU(), lambda v: np.where(v > 0, v, 0.1 * v)),
                           (NewGELUActivation(), GELUActivation(),
                            lambda v: 0.5 * v * (1 + np.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v ** 3))))):
        net = nn.Sequential(a, act1, b, act2, c)
        pre2 = f1(pre1) @ w2.T + b2
        k = sum(code @ code.T + (1 - code) @ (1 - code).T for code in ((pre1 > 0) * 1.0, (pre2 > 0) * 1.0))
        assert P.nwot(net, x) == pytest.approx(np.linalg.slogdet(k)[1], rel=1e-10), type(act1).__name__


def test_token_ids_stay_integers_and_integer_features_become_floats():
    from nndiag.zerocost.gradsign import gradsign_detail
    from nndiag.zerocost.score import compute_proxies
    from tests.landscape._dense import tiny_embedding, tiny_mlp, token_data

    x, y = token_data()
    model = tiny_embedding()
    fast = gradsign_detail(model, x, y)  # fast path needs input gradients: falls back for ids
    assert fast.score == gradsign_detail(model, x, y, method="loop").score > 0
    res = compute_proxies(model, x, y, ["gradsign", "grad_norm", "snip", "params"])
    assert res["errors"] == {} and res["gradsign"] == fast.score
    model.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    norms = [m.weight.grad.norm() for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert res["grad_norm"] == pytest.approx(float(sum(norms)), rel=1e-5)
    feats = torch.randint(-3, 4, (48, 6), generator=torch.Generator().manual_seed(0))
    names = ["gradsign", "synflow", "grad_norm", "snip", "jacob_cov"]
    as_int = compute_proxies(tiny_mlp(), feats, y, names)
    as_float = compute_proxies(tiny_mlp(), feats.float(), y, names)
    assert as_int["errors"] == {} and all(as_int[n] == as_float[n] for n in names)


def _token_mlp(seed=0, vocab=11, length=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Embedding(vocab, 4), nn.Flatten(), nn.Linear(4 * length, 8), nn.ReLU(), nn.Linear(8, 4))


def test_synflow_jacob_cov_zen_start_at_the_embedding_of_token_ids():
    # token ids have no input gradient and no all-ones or Gaussian input: the three proxies
    # start at the embedding's output; references are the definitions written out in NumPy
    from tests.landscape._dense import token_data

    model = _token_mlp()
    x, _ = token_data(n=8)
    before = snapshot(model)
    E, w1, b1, w2, b2 = (t.detach().double().numpy() for t in
                         (model[0].weight, model[2].weight, model[2].bias, model[4].weight, model[4].bias))
    # synflow: |θ|, the one-hot view's all-ones input gives 1ᵀ|E| at each of the 3 positions
    h0 = np.tile(np.abs(E).sum(0), 3)
    pre = np.abs(w1) @ h0 + np.abs(b1)
    d_pre = (np.abs(w2).sum(0)) * (pre > 0)
    ref = (np.abs(w1) * np.outer(d_pre, h0)).sum() + (np.abs(w2) * np.maximum(pre, 0)[None, :]).sum()
    assert P.synflow(model, x) == pytest.approx(ref, rel=1e-12)
    # jacob_cov: Jacobian of Σ f with respect to the embeddings E[x]
    e = E[x.numpy()].reshape(len(x), -1)
    mask = (e @ w1.T + b1) > 0
    jac = (mask * w2.sum(0)) @ w1
    lam = np.linalg.eigvalsh(np.corrcoef(jac))
    ref_jc = -np.sum(np.log(lam + 1e-5) + 1 / (lam + 1e-5))
    assert P.jacob_cov(model, x) == pytest.approx(ref_jc, rel=1e-4)
    # zen: Gaussian weights (module order), then z and ε of the embedding's output shape
    g = torch.Generator().manual_seed(0)
    gw1 = torch.randn(w1.shape, generator=g).double().numpy()
    torch.randn(w2.shape, generator=g)
    z = torch.randn((8, 3, 4), generator=g).double().numpy().reshape(8, -1)
    eps = torch.randn((8, 3, 4), generator=g).double().numpy().reshape(8, -1)
    feat = lambda v: np.maximum(v @ gw1.T, 0)  # noqa: E731 - the last Linear's input
    ref_zen = math.log(np.abs(feat(z) - feat(z + 0.01 * eps)).sum(1).mean())
    assert P.zen(model, x) == pytest.approx(ref_zen, rel=1e-5)
    assert same_snapshot(before, snapshot(model))
    res = compute_proxies(model, x, torch.zeros(8, dtype=torch.long), ["synflow", "jacob_cov", "zen"])
    assert res["errors"] == {} and res["synflow"] == pytest.approx(ref, rel=1e-12)


def test_models_returning_dicts_or_tuples_score_as_their_logits():
    class Wrapped(nn.Module):
        def __init__(self, inner, kind):
            super().__init__()
            self.inner, self.kind = inner, kind

        def forward(self, x):
            z = self.inner(x)
            return {"logits": z, "hidden": x} if self.kind == "dict" else (z, x)

    x, y = _xy(n=12)
    names = list(PROXY_NAMES)
    plain = compute_proxies(_mlp(), x, y, names)
    for kind in ("dict", "tuple"):
        model = Wrapped(_mlp(), kind)
        before = snapshot(model)
        got = compute_proxies(model, x, y, names)
        assert got["errors"] == plain["errors"] == {}, kind
        for n in names:
            assert got[n] == pytest.approx(plain[n], rel=1e-6, abs=1e-12), (kind, n)
        assert same_snapshot(before, snapshot(model)) and isinstance(model(x), dict if kind == "dict" else tuple)
