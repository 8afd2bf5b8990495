"""Landscapes: directions, normalisations, BatchNorm policy, grid values, resume, bad input."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nndiag._utils.model_state import same_snapshot, snapshot
from nndiag.errors import AnalysisError, DataError, InputError
from nndiag.landscape import hessian_spectrum, surface
from nndiag.landscape.directions import normalize_direction, random_direction, toward
from nndiag.landscape.surface import _Grid, _on_grid
from tests.landscape._dense import tiny_cnn, tiny_data, tiny_embedding, tiny_mlp, token_data


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in model.named_parameters()}


def _loss_at(model: nn.Module, x, y, shift: dict[str, torch.Tensor], train: bool = False) -> float:
    """Independent reference: a deep copy with shifted weights loaded in place."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for k, p in m.named_parameters():
            p.add_(shift[k])
    m.train(train)
    with torch.no_grad():
        return float(F.cross_entropy(m(x), y))


def test_filter_normalisation_gives_weight_filter_norms():
    model = tiny_cnn(bn=True)
    w = _weights(model)
    d = normalize_direction(random_direction(w, seed=3), w, norm="filter", one_d="zero")
    for k, t in d.items():
        if w[k].ndim >= 2:
            np.testing.assert_allclose(t.flatten(1).norm(dim=1), w[k].flatten(1).norm(dim=1), rtol=1e-5)
        else:
            assert torch.count_nonzero(t) == 0
    keep = normalize_direction(random_direction(w, seed=3), w, norm="filter", one_d="keep")
    scale = normalize_direction(random_direction(w, seed=3), w, norm="filter", one_d="scale")
    for k in w:
        if w[k].ndim == 1:
            assert float(keep[k].norm()) == pytest.approx(float(w[k].norm()), rel=1e-5)
            assert torch.equal(scale[k], w[k])


def test_layer_model_weight_and_none_normalisations():
    model = tiny_mlp()
    w = _weights(model)
    raw = random_direction(w, seed=0)
    layer = normalize_direction(raw, w, norm="layer", one_d="keep")
    for k in w:
        assert float(layer[k].norm()) == pytest.approx(float(w[k].norm()), rel=1e-5)
    mod = normalize_direction(raw, w, norm="model", one_d="keep")
    total = lambda d: float(torch.sqrt(sum((t.double() ** 2).sum() for t in d.values())))  # noqa: E731
    assert total(mod) == pytest.approx(total(w), rel=1e-5)
    wt = normalize_direction(raw, w, norm="weight", one_d="keep")
    assert torch.allclose(wt["0.weight"], raw["0.weight"] * w["0.weight"].abs())
    none = normalize_direction(raw, w, norm="none")
    assert all(torch.equal(none[k], raw[k]) for k in w)
    # Gaussian, zero-mean (LLA / loss-landscapes draw uniform [0, 1): all-positive)
    flat = torch.cat([t.flatten() for t in raw.values()])
    assert abs(float(flat.mean())) < 4 / flat.numel() ** 0.5 and float(flat.min()) < 0
    with pytest.raises(InputError, match="normalisation"):
        normalize_direction(raw, w, norm="l1")


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_grid_values_match_independent_evaluation(strategy):
    model = tiny_cnn()
    x, y = tiny_data("cnn")
    s = surface(model, (x, y), dim=2, steps=5, strategy=strategy, seed=4)
    w = _weights(model)
    gen = torch.Generator().manual_seed(4)
    d1, d2 = (normalize_direction(random_direction(w, generator=gen), w) for _ in range(2))
    for i, j in [(0, 0), (1, 3), (4, 2), (2, 2)]:
        a, b = s.alphas[i], s.betas[j]
        shift = {k: a * d1[k] + b * d2[k] for k in w}
        assert s.losses[i, j] == pytest.approx(_loss_at(model, x, y, shift), rel=1e-5)
    assert s.params["strategy"] == strategy


def test_batchnorm_origin_loss_equals_model_loss_in_stated_mode():
    model = tiny_cnn(bn=True)
    x, y = tiny_data("cnn")
    with torch.no_grad():  # give the running statistics non-trivial values
        model.train()
        model(x * 2 + 1)
    model.eval()
    before = snapshot(model)
    zero = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    ev = surface(model, (x, y), dim=1, steps=3, mode="eval")
    assert ev.origin_loss == pytest.approx(_loss_at(model, x, y, zero, train=False), rel=1e-6)
    assert ev.losses[1] == pytest.approx(ev.origin_loss, rel=1e-6)
    tr = surface(model, (x, y), dim=1, steps=3, mode="train")
    assert tr.origin_loss == pytest.approx(_loss_at(model, x, y, zero, train=True), rel=1e-6)
    assert tr.losses[1] == pytest.approx(tr.origin_loss, rel=1e-6)
    assert tr.origin_loss != pytest.approx(ev.origin_loss, rel=1e-3)
    assert ev.params["batchnorm_modules"] == 1 and "running" in ev.params["batchnorm_statistics"]
    assert "batch" in tr.params["batchnorm_statistics"]
    assert same_snapshot(before, snapshot(model))  # running stats untouched


def test_hessian_direction_curvature_equals_top_eigenvalue():
    model = tiny_mlp()
    x, y = tiny_data("mlp")
    lam = hessian_spectrum(model, (x, y), top_k=1, dtype=torch.float64, tol=1e-8).eigenvalues[0]
    h = 1e-2
    s = surface(model, (x, y), dim=1, steps=3, span=h, directions="hessian", norm="none",
                dtype=torch.float64)
    curv = (s.losses[0] - 2 * s.losses[1] + s.losses[2]) / h**2
    assert curv == pytest.approx(lam, rel=1e-3)
    assert s.params["directions"] == "hessian"


def test_interpolation_line_and_plane_through_three_models():
    a, b, c = tiny_mlp(0), tiny_mlp(1), tiny_mlp(2)
    x, y = tiny_data("mlp")
    zero = {k: torch.zeros_like(p) for k, p in a.named_parameters()}
    line = surface(a, (x, y), dim=1, steps=5, directions=[b], span=(0.0, 1.0))
    assert line.losses[0] == pytest.approx(_loss_at(a, x, y, zero), rel=1e-6)
    assert line.losses[-1] == pytest.approx(_loss_at(b, x, y, zero), rel=1e-5)
    plane = surface(a, (x, y), dim=2, steps=3, directions=[b, c], span=(0.0, 1.0))
    assert plane.losses[2, 0] == pytest.approx(_loss_at(b, x, y, zero), rel=1e-5)
    assert plane.losses[0, 2] == pytest.approx(_loss_at(c, x, y, zero), rel=1e-5)
    assert plane.params["directions"] == "interpolation" and plane.params["norm"] == "none"
    with pytest.raises(InputError, match="no parameter"):
        toward(_weights(a), nn.Linear(2, 2))
    # names that differ by one wrapper prefix, on either side
    wa, sb = _weights(a), b.state_dict()
    plain = toward(wa, b)
    prefixed = toward(wa, {f"module.{k}": v for k, v in sb.items()})
    wrapped = toward({f"net.{k}": v for k, v in wa.items()}, sb)
    for k in wa:
        assert torch.equal(prefixed[k], plain[k]) and torch.equal(wrapped[f"net.{k}"], plain[k])
    with pytest.raises(InputError, match="no parameter"):  # two different prefixes: no match
        toward(wa, {(f"module.{k}" if i else f"model.{k}"): v for i, (k, v) in enumerate(sb.items())})


def test_interpolation_grids_hold_the_models_and_measure_the_barriers():
    a, b, c = tiny_mlp(0), tiny_mlp(1), tiny_mlp(2)
    x, y = tiny_data("mlp")
    wa, wb, wc = _weights(a), _weights(b), _weights(c)

    def at(ta: float, tb: float) -> float:  # θa + ta(θb − θa) + tb(θc − θa), evaluated on a copy
        return _loss_at(a, x, y, {k: ta * (wb[k] - wa[k]) + tb * (wc[k] - wa[k]) for k in wa})

    line = surface(a, (x, y), dim=1, steps=21, directions=[b], dtype=torch.float64)
    assert _on_grid(line.alphas, 0.0) == 3 and _on_grid(line.alphas, 1.0) == 17  # steps of 1/14
    (bar,) = line.summary()["barriers"]
    t = line.alphas[3:18]
    ends = np.array([at(0, 0), at(1, 0)])
    gaps = np.array([at(v, 0) for v in t]) - ((1 - t) * ends[0] + t * ends[1])
    assert bar["barrier"] == pytest.approx(max(gaps.max(), 0.0), rel=1e-6, abs=1e-9)
    assert bar["relative"] == pytest.approx(bar["barrier"] / ends.mean(), rel=1e-6)
    assert bar["at"] == pytest.approx(t[gaps.argmax()]) and bar["to"] == "Sequential"
    finding = next(f for f in line.findings() if f.code == "LAND-BARRIER")
    assert finding.evidence["value"] == bar["barrier"]
    plane = surface(a, (x, y), dim=2, steps=5, directions=[b, c], dtype=torch.float64)
    assert list(plane.alphas) == [0.0, 0.25, 0.5, 0.75, 1.0]  # 5 steps: the segment alone
    segs = {(s["from"], s["to"]): s for s in plane.summary()["barriers"]}
    assert len(segs) == 3
    tt = plane.alphas
    diag = np.array([at(1 - v, v) for v in tt]) - ((1 - tt) * at(1, 0) + tt * at(0, 1))
    b_to_c = next(s for (f, _), s in segs.items() if f != "this model")
    assert b_to_c["barrier"] == pytest.approx(max(diag.max(), 0.0), rel=1e-6, abs=1e-9)
    assert sum(f.code == "LAND-BARRIER" for f in plane.findings()) == 3
    # directions given as dicts are not models: the usual symmetric span
    d = {k: torch.randn_like(v) for k, v in wa.items()}
    assert list(surface(a, (x, y), dim=1, steps=3, directions=[d], norm="none").alphas) == [-1.0, 0.0, 1.0]


def test_resume_skips_finished_points(tmp_path, monkeypatch):
    model = tiny_mlp()
    x, y = tiny_data("mlp")
    ck = tmp_path / "grid.npz"
    first = surface(model, (x, y), dim=2, steps=4, resume=ck, strategy="loop", chunk=3)
    assert ck.exists()

    def boom(self, c):
        raise AssertionError("recomputed a finished point")
    monkeypatch.setattr(_Grid, "loop", boom)
    again = surface(model, (x, y), dim=2, steps=4, resume=ck, strategy="loop", chunk=3)
    np.testing.assert_array_equal(first.losses, again.losses)
    with pytest.raises(InputError, match="another landscape"):
        surface(model, (x, y), dim=2, steps=4, resume=ck, norm="layer")


def test_resume_completes_a_partial_grid(tmp_path):
    model = tiny_mlp()
    x, y = tiny_data("mlp")
    ck = tmp_path / "grid.npz"
    full = surface(model, (x, y), dim=1, steps=7, resume=ck, strategy="loop", chunk=2)
    with np.load(ck) as f:
        fp, flat = str(f["fingerprint"]), f["flat"].copy()
    flat[3:] = np.nan  # as if interrupted
    np.savez(ck, fingerprint=np.asarray(fp), flat=flat)
    resumed = surface(model, (x, y), dim=1, steps=7, resume=ck, strategy="loop", chunk=2)
    np.testing.assert_allclose(resumed.losses, full.losses, rtol=1e-6)


def test_model_untouched_and_bad_inputs():
    model = tiny_cnn(bn=True)
    model.train()
    model[0].weight.grad = torch.ones_like(model[0].weight)
    model[-1].register_forward_hook(lambda m, i, o: None)
    before = snapshot(model)
    x, y = tiny_data("cnn")
    surface(model, (x, y), dim=2, steps=3)
    assert same_snapshot(before, snapshot(model))
    with pytest.raises(InputError, match="more than the limit"):
        surface(model, (x, y), dim=2, steps=1000)
    with pytest.raises(InputError, match="dim must be"):
        surface(model, (x, y), dim=3)
    with pytest.raises(DataError, match="does not fit"):
        surface(model, (torch.randn(4, 3, 8, 8), y[:4]))
    with pytest.raises(DataError, match="labels must lie"):
        surface(model, (x, y + 7))
    with pytest.raises(AnalysisError, match="loss is nan"):
        surface(model, (x, y), loss=lambda o, t: o.mean() * float("nan"))
    with pytest.raises(InputError, match="directions"):
        surface(model, (x, y), directions="adam")
    assert same_snapshot(before, snapshot(model))
    frozen = tiny_mlp()
    frozen.requires_grad_(False)
    with pytest.raises(AnalysisError, match="requires_grad"):
        surface(frozen, tiny_data("mlp"))


def test_plots_and_result(tmp_path):
    pytest.importorskip("matplotlib")
    model = tiny_mlp()
    x, y = tiny_data("mlp")
    s2 = surface(model, (x, y), dim=2, steps=5)
    for kind in ("contour", "surface"):
        s2.plot(kind).savefig(tmp_path / f"{kind}.png")
        assert (tmp_path / f"{kind}.png").stat().st_size > 1000
    s1 = surface(model, (x, y), dim=1, steps=5)
    s1.plot().savefig(tmp_path / "line.png")
    d = s2.to_dict()
    assert d["tables"]["grid"][0]["name"] == "plane" and len(d["tables"]["grid"]) == 25
    assert d["tables"]["directions"][0]["name"] == "0.weight"
    assert d["summary"]["origin_loss"] == pytest.approx(s2.losses[2, 2], rel=1e-6)
    s2.save(tmp_path / "g.npz")
    s2.save(tmp_path / "g.json")
    with np.load(tmp_path / "g.npz") as f:
        np.testing.assert_array_equal(f["losses"], s2.losses)
    assert json.loads((tmp_path / "g.json").read_text())["summary"]["points"] == 25
    with pytest.raises(InputError, match=r"written as \.npz or \.json"):
        s2.save(tmp_path / "g.dat")  # (np.savez would have written g.dat.npz)
    assert not list(tmp_path.glob("g.dat*"))


def test_cuda_graph_strategy_needs_cuda_and_eval_mode():
    model = tiny_cnn()
    x, y = tiny_data("cnn", n=8)
    before = snapshot(model)
    for mode in ("eval", "train"):
        with pytest.raises(InputError, match="CUDA"):
            surface(model, (x, y), dim=1, steps=3, strategy="graph", mode=mode)
    assert same_snapshot(before, snapshot(model))


def test_auto_strategy_on_cpu_skips_vmap_for_convolutional_models():
    x, y = tiny_data("cnn", n=8)
    assert surface(tiny_cnn(), (x, y), dim=1, steps=5).params["strategy"] == "loop"
    xm, ym = tiny_data("mlp", n=8)
    assert surface(tiny_mlp(), (xm, ym), dim=1, steps=5).params["strategy"] in ("stacked", "loop")


def test_auto_strategy_times_each_candidate_twice_and_keeps_the_faster():
    from nndiag._utils.threads import limit_threads

    class Scalar(nn.Module):  # a Python float from a tensor: vmap cannot batch it
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 3)

        def forward(self, x):
            return self.fc(x) * float(self.fc.weight.abs().sum() > 0)

    torch.manual_seed(0)
    xm, ym = tiny_data("mlp", n=8)
    with limit_threads(1):
        # train mode: not stacked, so vmap and the loop are timed (two trials of 4 points each)
        auto = surface(tiny_mlp(), (xm, ym), dim=1, steps=21, mode="train")
        loop = surface(tiny_mlp(), (xm, ym), dim=1, steps=21, mode="train", strategy="loop")
        x6, y6 = torch.randn(8, 6), torch.randint(0, 3, (8,))
        failed = surface(Scalar(), (x6, y6), dim=1, steps=9, mode="train")
    per_point = auto.params["strategy_seconds_per_point"]
    assert set(per_point) == {"vmap", "loop"} and all(v > 0 for v in per_point.values())
    assert auto.params["strategy"] == min(per_point, key=per_point.get)
    np.testing.assert_allclose(auto.losses, loop.losses, rtol=1e-5)
    assert loop.params["strategy_seconds_per_point"] is None  # (asked for by name: nothing timed)
    assert failed.params["strategy"] == "loop" and failed.params["strategy_seconds_per_point"]["vmap"] is None
    assert np.isfinite(failed.losses).all()


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_token_model_surface_origin_is_the_models_loss(strategy):
    model = tiny_embedding()
    x, y = token_data()
    before = snapshot(model)
    with torch.no_grad():
        own = float(F.cross_entropy(model(x), y))
    s = surface(model, (x, y), dim=2, steps=5, strategy=strategy, seed=2)
    assert s.origin_loss == pytest.approx(own, rel=1e-6)
    assert s.losses[2, 2] == pytest.approx(own, rel=1e-6)
    assert s.params["strategy"] == strategy
    w = _weights(model)
    gen = torch.Generator().manual_seed(2)
    d1, d2 = (normalize_direction(random_direction(w, generator=gen), w) for _ in range(2))
    shift = {k: s.alphas[4] * d1[k] + s.betas[0] * d2[k] for k in w}
    assert s.losses[4, 0] == pytest.approx(_loss_at(model, x, y, shift), rel=1e-5)
    s64 = surface(model, (x, y), dim=1, steps=3, dtype=torch.float64)
    with torch.no_grad():
        own64 = float(F.cross_entropy(copy.deepcopy(model).double()(x), y))
    assert s64.origin_loss == pytest.approx(own64, rel=1e-12)
    assert same_snapshot(before, snapshot(model))


def test_contour_levels_are_logarithmic_when_the_loss_spans_decades():
    from nndiag.landscape.plots import contour_levels, plot_contour

    a = np.linspace(-1, 1, 11)
    A, B = np.meshgrid(a, a, indexing="ij")
    wide = 0.02 + 200 * (A ** 2 + B ** 2) ** 2  # a trained model's basin and its far walls
    lv, log = contour_levels(wide, 30)
    assert log and lv[0] == pytest.approx(0.02) and lv[-1] == pytest.approx(wide.max())
    np.testing.assert_allclose(np.diff(np.log(lv)), np.log(lv[-1] / lv[0]) / 30)
    # the basin (loss < 1 at 5 of the 121 points) gets colours of its own: a third of the levels
    assert (lv < 1).sum() >= 10
    narrow = 2.0 + (A ** 2 + B ** 2)
    lv, log = contour_levels(narrow, 30)
    assert not log and np.allclose(np.diff(lv), 2 / 30)
    fig = plot_contour(a, a, wide)
    assert fig.axes[1].get_ylabel() == "loss (log scale)"
    fig = plot_contour(a, a, narrow)
    assert fig.axes[1].get_ylabel() == "loss"
