"""Parity with PyHessian 0.1 and loss-landscapes 3.0.6 where installed (``nndiag[bench]``),
and tests showing where nndiag differs from them on purpose."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nndiag.landscape import hessian_spectrum
from tests.landscape._dense import dense_hessian, tiny_cnn, tiny_data, tiny_mlp

# PyHessian calls backward(create_graph=True), which torch warns about
pytestmark = pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")


def _pyhessian(model, x, y, criterion=F.cross_entropy):
    ph = pytest.importorskip("pyhessian")
    return ph.hessian(copy.deepcopy(model), criterion, data=(x, y), cuda=False)


def test_top_eigenvalues_agree_with_pyhessian_at_tight_tolerance():
    model = tiny_cnn()
    x, y = tiny_data("cnn")
    ph = _pyhessian(model, x, y)
    torch.manual_seed(0)
    theirs, _ = ph.eigenvalues(top_n=2, tol=1e-7, maxIter=2000)
    ours = hessian_spectrum(model, (x, y), top_k=2, tol=1e-6)
    np.testing.assert_allclose(ours.eigenvalues, sorted(theirs, reverse=True), rtol=2e-4)


def test_pyhessian_trace_stops_at_once_on_a_negative_trace_ours_does_not():
    model = tiny_mlp()
    x, y = tiny_data("mlp")

    def neg(out, t):
        return -F.cross_entropy(out, t)
    exact = -float(np.trace(dense_hessian(model, x, y)))
    torch.manual_seed(0)
    samples = _pyhessian(model, x, y, neg).trace(maxIter=100, tol=1e-3)
    assert len(samples) <= 2  # its relative-change test divides by a negative trace
    ours = hessian_spectrum(model, (x, y), top_k=0, trace=True, trace_method="hutchinson", loss=neg,
                            trace_rtol=0.05, trace_probes=400, dtype=torch.float64)
    assert len(ours.trace_estimate.samples) >= 10
    assert ours.trace < 0 and abs(ours.trace - exact) <= 3 * ours.trace_stderr


def test_pyhessian_density_fails_on_current_torch_ours_works():
    model = tiny_mlp()
    x, y = tiny_data("mlp")
    with pytest.raises(RuntimeError):
        _pyhessian(model, x, y).density(iter=10, n_v=1)
    r = hessian_spectrum(model, (x, y), top_k=0, density=True, slq_runs=1, slq_steps=10)
    assert np.isfinite(r.density.nodes).all()


def test_loss_landscapes_directions_are_all_positive_ours_are_zero_mean():
    pytest.importorskip("loss_landscapes")
    from loss_landscapes.model_interface.model_parameters import rand_u_like
    from loss_landscapes.model_interface.model_wrapper import wrap_model

    from nndiag.landscape.directions import random_direction

    model = tiny_mlp()
    theirs = rand_u_like(wrap_model(copy.deepcopy(model)).get_module_parameters())
    flat = torch.cat([p.flatten() for p in theirs.parameters])
    assert float(flat.min()) >= 0  # uniform [0, 1): every weight moves the same way
    ours = random_direction({k: p.detach() for k, p in model.named_parameters()}, seed=0)
    flat = torch.cat([t.flatten() for t in ours.values()])
    assert float(flat.min()) < 0 < float(flat.max()) and abs(float(flat.mean())) < 0.1


def test_loss_landscapes_edits_the_model_in_place_ours_does_not():
    ll = pytest.importorskip("loss_landscapes")
    import loss_landscapes.metrics

    from nndiag._utils.model_state import same_snapshot, snapshot
    from nndiag.landscape import surface

    model = tiny_mlp()
    x, y = tiny_data("mlp")
    before = snapshot(model)
    surface(model, (x, y), dim=2, steps=3)
    assert same_snapshot(before, snapshot(model))
    victim = copy.deepcopy(model)
    ll.random_plane(victim, loss_landscapes.metrics.Loss(F.cross_entropy, x, y), distance=1, steps=3,
                    normalization="filter")
    assert not same_snapshot(before, snapshot(victim))
