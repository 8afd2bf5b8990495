"""MD tree features: CKA, mode connectivity curves, train metrics, Hessian features."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from nndiag._utils.model_state import same_snapshot, snapshot
from nndiag._utils.seeding import fork_rng
from nndiag._utils.threads import limit_threads
from nndiag._utils.training import evaluate, train_classifier
from nndiag.diagnosis.curves import connect
from nndiag.diagnosis.features import compute_features, linear_cka, mixup_inputs, output_cka, train_metrics
from nndiag.errors import DataError, InputError
from nndiag.io.data import as_data, load_data
from nndiag.models.small import MLP, DigitsCNN


def _hsic_cka(x: np.ndarray, y: np.ndarray) -> float:
    # Gram-matrix form with the centring matrix H (Kornblith et al. 2019, eq. 3)
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    k, l_ = x @ x.T, y @ y.T
    hsic = lambda a, b: np.trace(a @ h @ b @ h)  # noqa: E731
    return hsic(k, l_) / np.sqrt(hsic(k, k) * hsic(l_, l_))


@pytest.fixture(scope="module")
def digits():
    return load_data("digits?split=train").subset(300, seed=0)


@pytest.fixture(scope="module")
def two_cnns(digits):
    models = []
    for s in (0, 1):  # one thread: the CI machine has two cores
        with fork_rng(s):
            m = DigitsCNN(width=4, hidden=16, batchnorm=True)
        with limit_threads(1):
            train_classifier(m, digits, epochs=2, batch_size=32, lr=0.05, seed=s, progress=False)
        models.append(m)
    return models


def test_linear_cka_matches_gram_form():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 7))
    y = x @ rng.normal(size=(7, 5)) + 0.5 * rng.normal(size=(60, 5))
    assert linear_cka(x, y) == pytest.approx(_hsic_cka(x, y), rel=1e-10)
    assert linear_cka(x, 2 * x + 3) == pytest.approx(1.0)
    q, _ = np.linalg.qr(rng.normal(size=(7, 7)))
    assert linear_cka(x, x @ q) == pytest.approx(1.0)  # invariant to rotations
    assert 0 <= linear_cka(x, rng.normal(size=(60, 3))) < 0.5


def test_mixup_inputs_stay_between_pairs():
    x = torch.arange(10, dtype=torch.float32).view(10, 1)
    xm = mixup_inputs(x, 200, alpha=16.0, seed=0)
    assert xm.shape == (200, 1) and xm.min() >= 0 and xm.max() <= 9
    assert torch.equal(xm, mixup_inputs(x, 200, alpha=16.0, seed=0))


def test_output_cka_of_a_model_with_itself_is_one(two_cnns, digits):
    a, b = two_cnns
    assert output_cka(a, copy.deepcopy(a), digits.x, n_samples=200) == pytest.approx(1.0)
    assert 0.0 < output_cka(a, b, digits.x, n_samples=200) < 1.0


def test_linear_path_endpoints_reproduce_checkpoints_without_bn(digits):
    with fork_rng(3):
        a, b = MLP(64, 16, 10), MLP(64, 16, 10)
    train_classifier(a, digits, epochs=2, batch_size=32, seed=0, progress=False)
    curve = connect(a, b, digits, curve="linear", n_points=5)
    loss_a, acc_a = evaluate(a, digits)
    loss_b, acc_b = evaluate(b, digits)
    assert curve.kind == "linear"
    assert curve.errors[0] == pytest.approx(100 * (1 - acc_a))
    assert curve.errors[-1] == pytest.approx(100 * (1 - acc_b))
    assert curve.losses[0] == pytest.approx(loss_a, rel=1e-5)
    # interior point at t = 0.5 is the average of the weights
    mid = copy.deepcopy(a)
    with torch.no_grad():
        for pm, pa, pb in zip(mid.parameters(), a.parameters(), b.parameters(), strict=True):
            pm.copy_((pa + pb) / 2)
    assert curve.errors[2] == pytest.approx(100 * (1 - evaluate(mid, digits)[1]))


def test_identical_models_have_no_barrier(two_cnns, digits):
    a = two_cnns[0]
    untrained = connect(a, copy.deepcopy(a), digits, curve="bezier", epochs=0)
    assert np.ptp(untrained.errors) == 0.0 and untrained.mode_connectivity == 0.0
    # training the control point lowers the loss: no barrier appears between identical ends
    trained = connect(a, copy.deepcopy(a), digits, curve="bezier", epochs=1)
    assert trained.errors[1:-1].max() <= trained.errors[0] + 0.5
    lin = connect(a, copy.deepcopy(a), digits, curve="linear")
    assert np.ptp(lin.errors) == 0.0 and lin.mode_connectivity == 0.0


def test_bezier_keeps_endpoints_and_beats_line(two_cnns, digits):
    a, b = two_cnns
    before = [snapshot(a), snapshot(b)]
    bez = connect(a, b, digits, curve="bezier", epochs=4, lr=0.05)
    lin = connect(a, b, digits, curve="linear")
    assert same_snapshot(before[0], snapshot(a)) and same_snapshot(before[1], snapshot(b))
    assert bez.errors[0] == lin.errors[0] and bez.errors[-1] == lin.errors[-1]  # fixed endpoints
    assert bez.mode_connectivity_peak > lin.mode_connectivity_peak  # a trained curve finds a lower path
    assert bez.mode_connectivity_peak <= 0
    e = bez.errors
    mid = (e[0] + e[-1]) / 2
    u = int(np.argmax(np.abs(e - mid)))
    assert bez.mode_connectivity == pytest.approx(mid - e[u])
    assert bez.mode_connectivity_peak == pytest.approx(-e[1:-1].max())
    assert bez.params["bn_recomputed"] is True


def test_compute_features_leaves_models_untouched(two_cnns, digits):
    a, b = two_cnns
    a.train()
    calls = []
    handle = a.register_forward_hook(lambda *args: calls.append(1))
    before = [snapshot(a), snapshot(b)]
    f = compute_features(a, b, digits, curve="bezier", curve_epochs=1, hessian=True, hessian_samples=64,
                         cka_samples=100, threads=1)
    assert same_snapshot(before[0], snapshot(a)) and same_snapshot(before[1], snapshot(b))
    n_calls = len(calls)  # forwards of the user's model itself (train error, CKA, Hessian)
    connect(a, b, digits, curve="bezier", epochs=1)
    assert len(calls) == n_calls  # the curve works on a copy without the user's hooks
    handle.remove()
    a.eval()
    lo, acc = evaluate(a, digits)
    assert f["train_error"] == pytest.approx(100 * (1 - acc))
    assert f["train_loss"] == pytest.approx(lo, rel=1e-5)
    assert np.isfinite(f["hessian_t"]) and f["hessian_t"] == pytest.approx(np.log(f["hessian_trace"]))
    assert f["hessian_top"] > 0 and f["hessian_trace"] >= f["hessian_top"] * 0.5
    assert set(f.table()["name"]) >= {"train_error", "CKA", "mode_connectivity_peak", "hessian_t"}


def test_hessian_features_match_dense_trace(digits):
    from nndiag.diagnosis.features import hessian_features

    with fork_rng(0):
        m = MLP(64, 4, 10)
    sub = digits.subset(100, seed=1)
    params = dict(m.named_parameters())
    names = list(params)
    shapes = [params[k].shape for k in names]
    flat = torch.cat([params[k].detach().flatten() for k in names]).double()

    def loss(theta):
        chunks, i = {}, 0
        for k, s in zip(names, shapes, strict=True):
            chunks[k] = theta[i:i + s.numel()].view(s)
            i += s.numel()
        out = torch.func.functional_call(m.double(), chunks, (sub.x.double(),))
        return torch.nn.functional.cross_entropy(out, sub.y)

    dense = torch.autograd.functional.hessian(loss, flat)
    m.float()
    evals = torch.linalg.eigvalsh(dense)
    h = hessian_features(m, sub, n_samples=100, seed=0, threads=1)
    assert h["hessian_trace"] == pytest.approx(float(dense.trace()), rel=0.05)
    assert h["hessian_top"] == pytest.approx(float(evals[-1]), rel=1e-3)
    assert h["hessian_t"] == pytest.approx(np.log(h["hessian_trace"]))


def test_bad_pairs_and_small_data_are_clear_errors(two_cnns, digits):
    a, _ = two_cnns
    with pytest.raises(InputError, match="different model"):
        compute_features(a, a, digits, hessian=False)
    with pytest.raises(InputError, match="different architectures"):
        compute_features(a, DigitsCNN(width=8, hidden=16, batchnorm=True), digits, hessian=False)
    with pytest.raises(InputError, match="different architectures"):
        connect(MLP(64, 16, 10), nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), digits)
    with pytest.raises(DataError, match="Hessian samples"):
        compute_features(a, copy.deepcopy(a), digits.subset(50), hessian=True, hessian_samples=200)
    with pytest.raises(InputError, match="curve"):
        connect(a, copy.deepcopy(a), digits, curve="spline")


def test_token_models_train_evaluate_and_connect():
    import torch.nn.functional as F

    from tests.landscape._dense import tiny_embedding, token_data

    x, _ = token_data(n=64)
    data = as_data((x, x[:, 0] % 4))  # learnable: the class is the first token mod 4
    a, b = tiny_embedding(0), tiny_embedding(1)
    log = train_classifier(a, data, epochs=40, batch_size=16, lr=0.2, seed=0, progress=False)
    assert log.losses[-1] < 0.3 * log.losses[0] and log.train_accuracy == 1.0
    with torch.no_grad():
        own = float(F.cross_entropy(a(x), data.y)), float((a(x).argmax(1) == data.y).double().mean())
    assert evaluate(a, data) == pytest.approx(own, rel=1e-6)
    err, loss = train_metrics(a, data.x, data.y)
    assert err == pytest.approx(100 * (1 - own[1])) and loss == pytest.approx(own[0], rel=1e-6)
    curve = connect(a, b, data, curve="linear", n_points=3)
    assert curve.errors[0] == pytest.approx(100 * (1 - own[1]))
    assert curve.errors[-1] == pytest.approx(100 * (1 - evaluate(b, data)[1]))
    with pytest.raises(DataError, match="not defined for token ids"):
        output_cka(a, b, data.x, n_samples=50)


def test_integer_features_of_an_mlp_are_floats_for_cka_and_metrics():
    with fork_rng(5):
        a, b = MLP(6, 8, 3), MLP(6, 8, 3)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 5, (40, 6), generator=g), torch.randint(0, 3, (40,), generator=g)
    assert output_cka(a, b, x, n_samples=60) == pytest.approx(output_cka(a, b, x.float(), n_samples=60), abs=1e-12)
    assert train_metrics(a, x, y) == pytest.approx(train_metrics(a, x.float(), y), abs=1e-12)
