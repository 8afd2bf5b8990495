"""hessian_spectrum against the dense Hessian of tiny networks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from nndiag._utils.model_state import same_snapshot, snapshot
from nndiag.errors import AnalysisError, DataError, InputError
from nndiag.landscape import HessianOperator, hessian_spectrum
from tests.landscape._dense import dense_hessian, tiny_cnn, tiny_data, tiny_embedding, tiny_mlp, token_data

F64 = torch.float64


@pytest.fixture(scope="module", params=["mlp", "cnn"])
def case(request):
    kind = request.param
    model = tiny_mlp() if kind == "mlp" else tiny_cnn()
    x, y = tiny_data(kind)
    H = dense_hessian(model, x, y)
    return kind, model, x, y, H, np.linalg.eigvalsh(H)


def test_top_and_bottom_eigenvalues_match_dense(case):
    _, model, x, y, H, ev = case
    r = hessian_spectrum(model, (x, y), top_k=4, bottom_k=2, dtype=F64, tol=1e-6, vectors=True)
    top = ev[::-1][:4]
    np.testing.assert_allclose(r.eigenvalues, top, rtol=1e-4)
    np.testing.assert_allclose(r.bottom_eigenvalues, ev[:2], rtol=1e-4, atol=1e-8 * abs(ev).max())
    assert r.converged and r.iterations < len(ev)
    # reported residuals are the true ones ‖Hv − λv‖
    V = r.eigenvectors.numpy()
    true_res = np.linalg.norm(V @ H - r.eigenvalues[:, None] * V, axis=1)
    np.testing.assert_allclose(r.residuals, true_res, rtol=1e-3, atol=1e-9)
    assert np.all(r.residuals <= 1e-6 * abs(ev).max() * 1.01)


def test_float32_close_to_float64(case):
    _, model, x, y, _, ev = case
    r = hessian_spectrum(model, (x, y), top_k=2, tol=1e-4)
    np.testing.assert_allclose(r.eigenvalues, ev[::-1][:2], rtol=1e-3)


def test_exact_trace_via_identity_basis(case):
    _, model, x, y, H, _ = case
    r = hessian_spectrum(model, (x, y), top_k=0, trace=True, trace_method="exact", dtype=F64)
    assert r.trace == pytest.approx(np.trace(H), rel=1e-10, abs=1e-12)
    assert r.trace_stderr == 0.0


@pytest.mark.parametrize("method", ["hutchinson", "hutchpp", "xtrace"])
def test_stochastic_trace_within_three_standard_errors(case, method):
    _, model, x, y, H, _ = case
    exact = float(np.trace(H))
    for seed in (0, 1):
        r = hessian_spectrum(model, (x, y), top_k=0, trace=True, trace_method=method,
                             trace_rtol=None, trace_probes=60, dtype=F64, seed=seed)
        assert r.trace_stderr > 0
        assert abs(r.trace - exact) <= 3 * r.trace_stderr, (r.trace, exact, r.trace_stderr)


def test_batches_are_weighted_by_size():
    model = tiny_mlp()
    x, y = tiny_data("mlp", n=50)
    H = dense_hessian(model, x, y)
    v = torch.randn(H.shape[0], dtype=F64)
    for bs in (50, 7, 16):
        op = HessianOperator(model, (x, y), batch_size=bs, dtype=F64)
        np.testing.assert_allclose(op.matvec(v).numpy(), H @ v.numpy(), rtol=1e-9, atol=1e-12)
        assert len(op.data.batches) == -(-50 // bs)


def test_batched_probes_equal_looped():
    model = tiny_cnn()
    x, y = tiny_data("cnn")
    op = HessianOperator(model, (x, y), dtype=F64)
    V = torch.randn(5, op.dim, dtype=F64)
    loop = op.matmat(V, batched=False)
    vectorised = op.matmat(V, batched=True)
    np.testing.assert_allclose(vectorised.numpy(), loop.numpy(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("remembered", [False, True])
def test_batched_choice_is_remembered_per_architecture(monkeypatch, remembered):
    from nndiag.landscape import hvp

    model = tiny_cnn()
    x, y = tiny_data("cnn")
    monkeypatch.setattr(hvp, "_BATCHED_CHOICE", {})
    first = HessianOperator(model, (x, y), dtype=F64)
    first.matmat(torch.randn(4, first.dim, dtype=F64))  # times both ways, stores the winner
    assert hvp._BATCHED_CHOICE == {first._shape_key(): first._batched_ok}
    hvp._BATCHED_CHOICE[first._shape_key()] = remembered
    second = HessianOperator(model, (x, y), dtype=F64)
    calls = []
    real = second._batched
    monkeypatch.setattr(second, "_batched", lambda V: calls.append(len(V)) or real(V))
    V = torch.randn(3, second.dim, dtype=F64)
    out = second.matmat(V)
    assert calls == ([3] if remembered else [])  # no new trial: the remembered way only
    np.testing.assert_allclose(out.numpy(), second.matmat(V, batched=False).numpy(), rtol=1e-9, atol=1e-12)


def test_uncached_operator_equals_cached():
    model = tiny_mlp()
    x, y = tiny_data("mlp")
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=F64)
    a = HessianOperator(model, (x, y), batch_size=16, dtype=F64).matvec(v)
    b = HessianOperator(model, (x, y), batch_size=16, dtype=F64, cache=False).matvec(v)
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_forward_over_reverse_engine_equals_dense_hessian(kind):
    # jvp of grad, over three size-weighted batches, one probe and vmapped blocks of probes
    model = tiny_mlp() if kind == "mlp" else tiny_cnn(bn=True)
    x, y = tiny_data(kind, n=30)
    H = dense_hessian(model, x, y)
    op = HessianOperator(model, (x, y), batch_size=12, dtype=F64, engine="forward-over-reverse")
    assert op.engine == "forward-over-reverse"
    V = torch.randn(6, H.shape[0], dtype=F64, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(op.matmat(V).numpy(), V.numpy() @ H, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(op.matvec(V[0]).numpy(), H @ V[0].numpy(), rtol=1e-9, atol=1e-12)
    assert op.n_hvp == 7
    r = hessian_spectrum(model, (x, y), top_k=2, dtype=F64, tol=1e-8, hvp_engine="forward-over-reverse")
    np.testing.assert_allclose(r.eigenvalues, np.linalg.eigvalsh(H)[::-1][:2], rtol=1e-6)
    assert r.params["hvp_engine"] == "forward-over-reverse"


def test_engine_choice_rules():
    model = tiny_mlp()
    x, y = tiny_data("mlp")
    # auto on the CPU: double backward (faster on every CPU model measured), no trial
    assert HessianOperator(model, (x, y)).engine == "double-backward"
    r = hessian_spectrum(model, (x, y), top_k=1)
    assert r.params["hvp_engine"] == "double-backward" and r.params["hvp_engine_requested"] == "auto"
    with pytest.raises(InputError, match="mode='eval'"):
        HessianOperator(model, (x, y), mode="train", engine="forward-over-reverse")
    with pytest.raises(InputError, match="unknown engine"):
        HessianOperator(model, (x, y), engine="fast")


def test_auto_engine_trial_keeps_a_valid_engine_and_exact_products(monkeypatch):
    # the GPU-only timing trial, forced on the CPU: whichever engine wins, products are exact
    model = tiny_cnn()
    x, y = tiny_data("cnn")
    H = dense_hessian(model, x, y)
    op = HessianOperator(model, (x, y), dtype=F64)
    op.engine = None  # as after construction on a GPU in eval mode
    V = torch.randn(3, H.shape[0], dtype=F64, generator=torch.Generator().manual_seed(1))
    np.testing.assert_allclose(op.matmat(V).numpy(), V.numpy() @ H, rtol=1e-9, atol=1e-12)
    assert op.engine in ("double-backward", "forward-over-reverse")
    assert op.n_hvp == 6  # both engines ran on the trial probes
    np.testing.assert_allclose(op.matvec(V[0]).numpy(), H @ V[0].numpy(), rtol=1e-9, atol=1e-12)


def test_batchnorm_train_mode_hessian_and_running_stats_untouched():
    model = tiny_cnn(bn=True)
    x, y = tiny_data("cnn")
    H = dense_hessian(model, x, y, train=True)
    r = hessian_spectrum(model, (x, y), top_k=1, dtype=F64, mode="train", tol=1e-8)
    assert r.eigenvalues[0] == pytest.approx(np.linalg.eigvalsh(H)[-1], rel=1e-6)
    bn = model[1]
    assert torch.equal(bn.running_mean, torch.zeros(3)) and int(bn.num_batches_tracked) == 0


def _busy_model() -> tuple[nn.Module, list]:
    model = tiny_cnn(bn=True)
    model.train()
    model[0].eval()  # mixed modes
    model[0].bias.requires_grad_(False)
    model[-1].weight.grad = torch.full_like(model[-1].weight, 0.5)
    calls: list = []
    model[-1].register_forward_hook(lambda m, i, o: calls.append(1))
    return model, calls


def test_model_left_exactly_as_it_was():
    model, _ = _busy_model()
    before = snapshot(model)
    x, y = tiny_data("cnn")
    r = hessian_spectrum(model, (x, y), top_k=2, bottom_k=1, trace=True, density=True, slq_steps=10)
    assert same_snapshot(before, snapshot(model))
    assert r.n_params == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_model_untouched_when_the_call_raises():
    model, _ = _busy_model()
    before = snapshot(model)
    x, y = tiny_data("cnn")
    with pytest.raises(DataError, match="labels must lie in"):
        hessian_spectrum(model, (x, y + 10))
    assert same_snapshot(before, snapshot(model))


def test_bad_inputs_give_clear_errors():
    model = tiny_mlp()
    x, y = tiny_data("mlp")
    with pytest.raises(DataError, match="does not fit"):
        hessian_spectrum(model, (torch.randn(8, 5), y[:8]))
    with pytest.raises(DataError, match="labels must lie in"):
        hessian_spectrum(model, (x, torch.full_like(y, 4)))
    with pytest.raises(AnalysisError, match="loss is nan"):
        hessian_spectrum(model, (x, y), loss=lambda out, t: out.sum() * float("nan"))
    frozen = tiny_mlp()
    for p in frozen.parameters():
        p.requires_grad_(False)
    with pytest.raises(AnalysisError, match="no parameters with requires_grad"):
        hessian_spectrum(frozen, (x, y))
    with pytest.raises(InputError):
        hessian_spectrum(model, (x, y), trace=True, trace_method="magic")
    with pytest.raises(InputError):
        hessian_spectrum(model, (x, y), mode="inference")


def test_result_json_fields():
    model = tiny_mlp()
    x, y = tiny_data("mlp")
    r = hessian_spectrum(model, (x, y), top_k=3, trace=True, density=True, slq_steps=20)
    d = r.to_dict()
    s = d["summary"]
    assert s["eigenvalues"] == sorted(s["eigenvalues"], reverse=True)
    assert {"trace", "trace_stderr", "n_samples", "criteria"} <= set(s)
    assert set(s["criteria"]) == {"re", "Kh", "Ct"}
    assert s["criteria_settings"]["steps"] == 20 and d["params"]["slq_runs"] == 3
    assert d["tables"]["eigenvalues"][0]["name"] == "top_1"
    assert s["n_samples"] == 48 and d["seed"] == 0


def test_slq_density_mass_matches_dense_spectrum(case):
    _, model, x, y, _, ev = case
    r = hessian_spectrum(model, (x, y), top_k=0, density=True, slq_runs=12, slq_steps=40, dtype=F64)
    # the CDF at quantiles, bracketed by the exact CDF a little left/right (the CNN
    # spectrum has an atom at 0 that Ritz values resolve only to ~1e-3)
    qs = np.quantile(ev, [0.05, 0.25, 0.5, 0.75, 0.95])
    delta = 0.02 * (ev[-1] - ev[0])
    est = r.density.cdf(qs)
    lo = np.array([(ev <= q - delta).mean() for q in qs])
    hi = np.array([(ev <= q + delta).mean() for q in qs])
    assert np.all(est >= lo - 0.06) and np.all(est <= hi + 0.06), (est, lo, hi)
    assert r.criteria["lambda_max"] == pytest.approx(ev[-1], rel=1e-4)
    assert r.criteria["lambda_min"] == pytest.approx(ev[0], rel=1e-3)


def test_eigenvalue_run_doubles_as_the_first_slq_run(case):
    _, model, x, y, _, ev = case
    r = hessian_spectrum(model, (x, y), top_k=2, density=True, slq_runs=12, slq_steps=40, dtype=F64)
    assert r.density.settings["first_run_shared"] is True
    # the eigenvalue run took max(its own steps, 40) products, the other 11 runs 40 each
    assert r.n_hvp == max(r.iterations, 40) + 11 * 40 and r.iterations >= 40
    np.testing.assert_allclose(r.eigenvalues, ev[::-1][:2], rtol=1e-4)
    qs = np.quantile(ev, [0.05, 0.25, 0.5, 0.75, 0.95])  # the same check as without sharing
    delta = 0.02 * (ev[-1] - ev[0])
    est = r.density.cdf(qs)
    lo = np.array([(ev <= q - delta).mean() for q in qs])
    hi = np.array([(ev <= q + delta).mean() for q in qs])
    assert np.all(est >= lo - 0.06) and np.all(est <= hi + 0.06), (est, lo, hi)
    # the shared run is an SLQ run: its nodes are Ritz values of the Hessian, weights sum to 1
    nodes, weights = r.density.nodes[0], r.density.weights[0]
    assert abs(weights.sum() - 1) < 1e-10 and nodes.min() >= ev[0] - 1e-8 and nodes.max() <= ev[-1] + 1e-8
    windowed = hessian_spectrum(model, (x, y), top_k=2, density=True, slq_runs=2, slq_steps=10, slq_reorth=5,
                                dtype=F64)
    assert windowed.density.settings["first_run_shared"] is False  # another reorthogonalisation: no sharing


def test_token_ids_reach_the_embedding_as_integers_and_match_dense():
    model = tiny_embedding()
    x, y = token_data()
    assert x.dtype == torch.int64
    H = dense_hessian(model, x, y)
    ev = np.linalg.eigvalsh(H)
    r = hessian_spectrum(model, (x, y), top_k=4, dtype=F64, tol=1e-6)
    np.testing.assert_allclose(r.eigenvalues, ev[::-1][:4], rtol=1e-4)
    exact = hessian_spectrum(model, (x, y), top_k=0, trace=True, trace_method="exact", dtype=F64)
    assert exact.trace == pytest.approx(np.trace(H), rel=1e-10)
    r32 = hessian_spectrum(model, (x.to(torch.int32), y), top_k=2, tol=1e-4)  # int32 ids too
    np.testing.assert_allclose(r32.eigenvalues, ev[::-1][:2], rtol=1e-3)
    op = HessianOperator(model, (x, y), dtype=F64)
    assert all(xb.dtype == torch.int64 for xb, _ in op.data.batches)


def test_integer_features_of_an_mlp_are_cast_to_the_analysis_dtype():
    model = tiny_mlp()
    g = torch.Generator().manual_seed(3)
    x = torch.randint(-3, 4, (40, 6), generator=g)  # integer features, no embedding layer
    y = torch.randint(0, 4, (40,), generator=g)
    op = HessianOperator(model, (x, y), dtype=F64)
    assert all(xb.dtype == F64 for xb, _ in op.data.batches)
    H = dense_hessian(model, x.double(), y)
    r = hessian_spectrum(model, (x, y), top_k=3, dtype=F64, tol=1e-6)
    np.testing.assert_allclose(r.eigenvalues, np.linalg.eigvalsh(H)[::-1][:3], rtol=1e-4)
    as_float = hessian_spectrum(model, (x.float(), y), top_k=3, dtype=F64, tol=1e-6)
    np.testing.assert_allclose(r.eigenvalues, as_float.eigenvalues, rtol=1e-10)


def test_token_ids_out_of_the_embedding_range_give_a_data_error():
    model = tiny_embedding(vocab=11)
    x, y = token_data(vocab=11)
    before = snapshot(model)
    big = x.clone()
    big[5, 1] = 11
    with pytest.raises(DataError, match=r"token ids must lie in \[0, 10\] for layer '0'.*found 0\.\.11"):
        hessian_spectrum(model, (big, y))
    with pytest.raises(DataError, match="found -1"):
        hessian_spectrum(model, (x - 1, y))
    assert same_snapshot(before, snapshot(model))


def test_folded_products_equal_dense_hessian_of_the_batchnorm_model():
    # eval mode: BatchNorm folded into the convolution inside the graph; the Hessian is still
    # over the model's own W, b, γ, β (three size-weighted batches; lazy and eager building)
    model = tiny_cnn(bn=True)
    x, y = tiny_data("cnn", n=30)
    with torch.no_grad():
        model.train()
        model(x)  # non-trivial running statistics
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    H = dense_hessian(model, x, y)
    V = torch.randn(4, H.shape[0], dtype=F64, generator=torch.Generator().manual_seed(0))
    for lazy in (False, True):
        op = HessianOperator(model, (x, y), batch_size=12, dtype=F64, lazy=lazy)
        np.testing.assert_allclose(op.matmat(V, batched=False).numpy(), V.numpy() @ H, rtol=1e-9, atol=1e-12)
        assert op.folded is not None and [p[1] for p in op.folded.pairs] == ["1"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    train = HessianOperator(model, (x, y), batch_size=30, dtype=F64, mode="train")
    train.matvec(V[0])
    assert train.folded is None  # batch statistics: nothing to fold


def test_attention_models_get_second_derivatives():
    # PyTorch's fused CPU attention kernel has no double backward; the products run attention
    # through the math kernel (top eigenvalues and trace against the dense Hessian)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from ._dense import token_data

    torch.manual_seed(0)

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(11, 8)
            self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), 1,
                                             enable_nested_tensor=False)
            self.head = nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.enc(self.emb(x)).mean(1))

    model = Tiny().double().eval()
    x, y = token_data(n=24)
    with sdpa_kernel([SDPBackend.MATH]):
        H = dense_hessian(model, x, y)
    evals = np.linalg.eigvalsh(H)[::-1]
    r = hessian_spectrum(model, (x, y), top_k=2, trace=True, trace_method="exact", dtype=F64)
    np.testing.assert_allclose(r.eigenvalues, evals[:2], rtol=1e-4)
    assert r.trace == pytest.approx(np.trace(H), rel=1e-8)
    assert r.params["trace_method"] == "exact"
    auto = hessian_spectrum(model, (x, y), top_k=0, trace=True, trace_probes=30, dtype=F64)
    assert auto.params["trace_method"] == "hutchpp"  # attention: no second-order forward rules


def test_progress_counts_every_product_and_probe_and_changes_nothing(monkeypatch):
    import contextlib
    import importlib

    spectrum = importlib.import_module("nndiag.landscape.spectrum")
    events: list[tuple[str, object]] = []

    class Bar:
        def advance(self, n=1, **fields):
            events.append(("advance", n))

        def update(self, **fields):
            events.append(("update", fields))

    @contextlib.contextmanager
    def fake(total, description, enabled=None):
        events.append(("open", enabled))
        yield Bar()

    monkeypatch.setattr(spectrum, "progress_bar", fake)
    model, x, y = tiny_mlp(), *tiny_data("mlp")
    for method in ("hutchpp", "split"):
        events.clear()
        kw = dict(top_k=2, density=True, slq_runs=2, slq_steps=8, trace=True, trace_method=method, dtype=F64,
                  trace_probes=40)
        shown = hessian_spectrum(model, (x, y), progress=True, **kw)
        done = sum(n for kind, n in events if kind == "advance")
        parts = shown.trace_estimate.parts or {}
        probes = parts.get("parameter_probes", 0) + parts.get("output_probes", 0)
        assert done == shown.n_hvp + probes and done > 0
        totals = [f.get("total") for kind, f in events if kind == "update" and "total" in f]
        assert totals == [8, 40]  # the density's new products (one run shared with the eigenvalues), the trace's probes
        assert events[0] == ("open", True)
        plain = hessian_spectrum(model, (x, y), progress=False, **kw)
        assert shown.trace == plain.trace and np.array_equal(shown.eigenvalues, plain.eigenvalues)
