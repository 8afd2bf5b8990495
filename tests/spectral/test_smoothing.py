"""SVD smoothing / sharpening (``nndiag.spectral.smoothing``) against dense SVDs and WeightWatcher."""

from __future__ import annotations

import contextlib
import io
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from nndiag.errors import InputError
from nndiag.spectral import analyze
from nndiag.spectral.smoothing import sharpen, smooth


def _heavy(n: int, m: int, df: float = 2.5, seed: int = 1) -> torch.Tensor:
    """A heavy-tailed random matrix (Student-t entries): a spectrum with a real tail and spikes."""
    rng = np.random.default_rng(seed)
    return torch.from_numpy((rng.standard_t(df, size=(n, m)) / np.sqrt(m)).astype(np.float32))


def _truncated(w: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """``w`` rebuilt from the singular components flagged in ``keep`` (descending order)."""
    u, s, vh = np.linalg.svd(w.astype(np.float64), full_matrices=False)
    return (u * (s * keep)) @ vh


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(100, 200), nn.ReLU(), nn.Linear(200, 60), nn.Conv2d(16, 32, 3))
    with torch.no_grad():
        net[0].weight.copy_(_heavy(200, 100))
        net[2].weight.copy_(_heavy(60, 200, 3.0, seed=2))
        net[3].weight.copy_(_heavy(32, 16 * 9, 2.5, seed=3).reshape(32, 16, 3, 3))
    return net


@pytest.mark.parametrize("method, column", [("detx", "detX_num"), ("lambda_min", "num_pl_spikes"),
                                            ("rmt", "num_spikes")])
def test_dense_layers_keep_the_analysis_count_exactly(method, column):
    net = _net()
    ref = analyze(net, mp_fit=True).layers.set_index("name")
    res = smooth(net, method)
    for name, idx in (("0", 0), ("2", 2)):
        row = res.layers.set_index("name").loc[name]
        k = int(ref.loc[name, column])
        assert 0 < k < ref.loc[name, "num_evals"]
        assert row["status"] == "changed" and row["kept"] == k and row["removed"] == ref.loc[name, "num_evals"] - k
        w = net[idx].weight.detach().numpy()
        keep = np.arange(min(w.shape)) < k
        expect = _truncated(w, keep)
        got = res.model[idx].weight.detach().numpy()
        np.testing.assert_allclose(got, expect, rtol=0, atol=1e-5 * np.abs(w).max())
        assert np.linalg.matrix_rank(got, tol=1e-4 * np.linalg.norm(w, 2)) == k
        # the table's figures, from the dense SVD
        s = np.linalg.svd(w.astype(np.float64), compute_uv=False)
        assert row["energy_kept"] == pytest.approx((s[:k] ** 2).sum() / (s**2).sum(), rel=1e-9)
        assert row["rel_change"] == pytest.approx(np.sqrt((s[k:] ** 2).sum() / (s**2).sum()), rel=1e-6)
    # biases are left alone
    assert torch.equal(res.model[0].bias, net[0].bias)


def test_pooled_convolution_shares_its_components_among_kernel_positions():
    net = _net()
    w = net[3].weight.detach().numpy().astype(np.float64)
    slices = [w[:, :, i, j] for i in range(3) for j in range(3)]
    svals = [np.linalg.svd(x, compute_uv=False) for x in slices]
    pooled = np.sort(np.concatenate(svals) ** 2)[::-1]
    k = int(0.3 * pooled.size)
    atol = 1e-5 * np.abs(w).max()
    # default (WeightWatcher's rule): ceil(k / rf) kept in every kernel position
    res = smooth(net, "percent", percent=0.3)
    per = math.ceil(k / 9)
    assert res.layers.set_index("name").loc["3", "kept"] == 9 * per and pooled.size == 144
    got = res.model[3].weight.detach().numpy()
    for pos, x in enumerate(slices):
        np.testing.assert_allclose(got[:, :, pos // 3, pos % 3], _truncated(x, np.arange(16) < per), atol=atol)
    # per_position=False: exactly the k largest eigenvalues over all positions
    res = smooth(net, "percent", percent=0.3, per_position=False)
    assert res.layers.set_index("name").loc["3", "kept"] == k
    thresh = pooled[k - 1]
    got = res.model[3].weight.detach().numpy()
    ranks = []
    for pos, (x, s) in enumerate(zip(slices, svals, strict=True)):
        keep = s**2 >= thresh
        ranks.append(int(keep.sum()))
        np.testing.assert_allclose(got[:, :, pos // 3, pos % 3], _truncated(x, keep), atol=atol)
    assert sum(ranks) == k and len(set(ranks)) > 1  # unequal per position: chosen by eigenvalue


def _unshuffled_removal(w: np.ndarray, perm: np.ndarray, k: int) -> np.ndarray:
    """Shuffle ``w``'s entries by ``perm``, drop the ``k`` leading components, put the entries back."""
    shuf = w.reshape(-1)[perm].reshape(w.shape)
    u, s, vh = np.linalg.svd(shuf, full_matrices=False)
    s[:k] = 0.0
    back = np.empty(w.size)
    back[perm] = ((u * s) @ vh).reshape(-1)
    return back.reshape(w.shape)


def test_sharpen_clips_planted_correlation_traps():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(200, 100)) / 10
    planted = [(5, 7), (50, 20), (120, 90)]
    for i, j in planted:
        w[i, j] = 4.0  # 40 standard deviations: each makes a spike in the shuffled ESD
    lin = nn.Linear(100, 200)
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(w))
    traps = int(analyze(lin, randomize=True).layers.loc[0, "num_traps"])
    assert traps == 3
    res = sharpen(lin, seed=0)
    row = res.layers.loc[0]
    assert row["status"] == "changed" and row["rule"] == "traps" and row["selected"] == 3 and row["removed"] == 3
    got = res.model.weight.detach().double().numpy()
    # the same shuffle, dense SVD: the transform exactly
    perm = np.random.default_rng(0).permutation(w.size)
    w32 = lin.weight.detach().double().numpy()
    np.testing.assert_allclose(got, _unshuffled_removal(w32, perm, 3), atol=1e-5)
    assert all(abs(got[i, j]) < 0.5 for i, j in planted)  # clipped to the bulk's scale
    assert int(analyze(res.model, randomize=True, seed=7).layers.loc[0, "num_traps"]) == 0
    # a Gaussian matrix has no trap: left as it was
    g = nn.Linear(100, 200)
    res = sharpen(g)
    assert res.layers.loc[0, "status"] == "unchanged" and res.layers.loc[0, "reason"] == "no correlation trap"
    assert torch.equal(res.model.weight, g.weight)


def test_sharpening_a_convolution_removes_floor_k_over_rf_per_position():
    rng = np.random.default_rng(4)
    w = rng.normal(size=(64, 32, 3, 3)) / np.sqrt(32)
    for _ in range(30):  # large entries scattered over the kernel positions
        o, c, i, j = rng.integers(64), rng.integers(32), rng.integers(3), rng.integers(3)
        w[o, c, i, j] = 6.0
    conv = nn.Conv2d(32, 64, 3, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(w))
    w32 = conv.weight.detach().double().numpy()
    res = sharpen(conv)
    k = int(res.layers.loc[0, "selected"])
    assert k >= 9 and res.layers.loc[0, "removed"] == 9 * (k // 9)
    draw = np.random.default_rng(0)
    perms = [draw.permutation(64 * 32) for _ in range(9)]
    got = res.model.weight.detach().double().numpy()
    for pos in range(9):
        i, j = divmod(pos, 3)
        np.testing.assert_allclose(got[:, :, i, j], _unshuffled_removal(w32[:, :, i, j], perms[pos], k // 9),
                                   atol=1e-5)
    assert sharpen(conv, per_position=False).layers.loc[0, "removed"] == k
    # fewer traps than kernel positions: left as it was, with the reason
    small = nn.Conv2d(32, 64, 3, bias=False)
    with torch.no_grad():
        small.weight.copy_(torch.from_numpy(rng.normal(size=(64, 32, 3, 3)) / np.sqrt(32)))
        small.weight[3, 4, 1, 1] = 6.0
    res = sharpen(small)
    row = res.layers.loc[0]
    assert 0 < row["selected"] < 9 and row["status"] == "unchanged" and "kernel positions" in row["reason"]
    assert torch.equal(res.model.weight, small.weight)


def test_unfolded_convolution_is_one_matrix():
    net = _net()
    res = smooth(net, "percent", percent=0.25, conv_mode="unfold", layers=["3"])
    assert list(res.layers["name"]) == ["3"]
    w = net[3].weight.detach().numpy().reshape(32, -1)
    expect = _truncated(w, np.arange(32) < 8).reshape(32, 16, 3, 3)
    np.testing.assert_allclose(res.model[3].weight.detach().numpy(), expect, atol=1e-5 * np.abs(w).max())
    assert torch.equal(res.model[0].weight, net[0].weight)  # not in ``layers``: untouched


def test_users_model_is_left_as_it_was():
    net = _net().train()
    net[0].weight.requires_grad_(False)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    res = smooth(net, "detx")
    assert res.model is not net
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert net.training and not net[0].weight.requires_grad and net[2].weight.requires_grad
    assert not torch.equal(res.model[0].weight, net[0].weight)


def test_fused_attention_parts_are_smoothed_each_on_its_own():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(48, 4)
    with torch.no_grad():
        mha.in_proj_weight.copy_(_heavy(144, 48, seed=5))
    res = smooth(mha, "percent", percent=0.5)
    names = list(res.layers["name"])
    assert names[:3] == ["in_proj.q", "in_proj.k", "in_proj.v"]
    old = mha.in_proj_weight.detach().numpy()
    new = res.model.in_proj_weight.detach().numpy()
    for part in range(3):
        x = old[48 * part : 48 * (part + 1)]
        np.testing.assert_allclose(new[48 * part : 48 * (part + 1)], _truncated(x, np.arange(48) < 24),
                                   atol=1e-5 * np.abs(old).max())


def test_grouped_qkv_rows_are_written_back_in_place():
    # GPT-NeoX: rows [q_h; k_h; v_h] per head, 4 heads of 8
    rng = np.random.default_rng(0)
    parts = {p: rng.standard_t(3, size=(32, 32)).astype(np.float32) for p in "qkv"}
    w = np.concatenate([np.concatenate([parts[p][8 * h : 8 * (h + 1)] for p in "qkv"]) for h in range(4)])
    name = "gpt_neox.layers.0.attention.query_key_value"
    cfg = {"model_type": "gpt_neox", "hidden_size": 32, "num_attention_heads": 4}
    res = smooth({f"{name}.weight": torch.from_numpy(w)}, "percent", percent=0.25, hf_config=cfg)
    assert list(res.layers["name"]) == [f"{name}.q", f"{name}.k", f"{name}.v"]
    new = res.state_dict()[f"{name}.weight"].numpy().reshape(4, 3, 8, 32)
    for i, p in enumerate("qkv"):
        got = new[:, i].reshape(32, 32)
        np.testing.assert_allclose(got, _truncated(parts[p], np.arange(32) < 8), atol=1e-5 * np.abs(w).max())


def test_weights_without_architecture_round_trip_through_both_file_formats(tmp_path):
    from safetensors.torch import load_file

    net = _net()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    state["tied"] = state["0.weight"]  # a tied copy: safetensors must not see shared memory
    res = smooth(state, "detx")
    assert res.model is None
    assert torch.equal(state["0.weight"], net[0].weight)  # the dict's tensors untouched
    full = res.state_dict()
    assert set(full) == set(state)
    assert not torch.equal(full["0.weight"], state["0.weight"]) and torch.equal(full["0.bias"], state["0.bias"])
    for suffix in (".safetensors", ".pt"):
        path = res.save(tmp_path / f"out{suffix}")
        back = load_file(path) if suffix == ".safetensors" else torch.load(path)
        assert set(back) == set(full) and all(torch.equal(back[k], full[k]) for k in full)
    with pytest.raises(InputError, match="must end in"):
        res.save(tmp_path / "out.npz")


def test_dtype_kept_and_unwritable_layers_listed_with_reasons():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 96), nn.Linear(96, 32))
    with torch.no_grad():
        net[0].weight.copy_(_heavy(96, 64))
    net = net.to(torch.bfloat16)
    torch.nn.utils.parametrizations.weight_norm(net[1])
    res = smooth(net, "detx")
    t = res.layers.set_index("name")
    assert t.loc["0", "status"] == "changed" and res.model[0].weight.dtype == torch.bfloat16
    assert t.loc["1", "status"] == "skipped" and "parametrisation" in t.loc["1", "reason"]
    assert res.summary["layers_changed"] == 1 and res.summary["layers_skipped"] == 1


def test_bad_arguments_fail_with_one_line_errors():
    net = _net()
    with pytest.raises(InputError, match="unknown smoothing method"):
        smooth(net, "svd")
    with pytest.raises(InputError, match=r"percent must be in \(0, 1\]"):
        smooth(net, "percent", percent=1.5)


def test_cli_writes_the_file_and_checks_it_first(tmp_path):
    from typer.testing import CliRunner

    from nndiag.cli.app import app

    net = _net()
    src = tmp_path / "net.pt"
    torch.save(net.state_dict(), src)
    out = tmp_path / "smoothed.safetensors"
    r = CliRunner().invoke(app, ["smooth", str(src), "--out", str(out), "--method", "percent",
                                 "--percent", "0.5", "--format", "json"])
    assert r.exit_code == 0, r.output
    from safetensors.torch import load_file

    back = load_file(out)
    assert np.linalg.matrix_rank(back["0.weight"].numpy(), tol=1e-4) == 50
    bad = CliRunner().invoke(app, ["smooth", str(src), "--out", str(tmp_path / "x.txt")])
    assert bad.exit_code != 0 and "must end in" in bad.output and not (tmp_path / "x.txt").exists()


@pytest.mark.parametrize("method, ww_method", [("detx", "detX"), ("lambda_min", "alpha_min"), ("percent", "svd")])
def test_parity_with_weightwatcher_svd_smoothing(ww, method, ww_method):
    """Same components kept as WW's ``SVDSmoothing`` in its conventions (rank per layer and per
    kernel position); nndiag's truncation is the exact one, WW's CPU path a randomised
    approximation of it, so nndiag's weights are never farther from the original."""
    import copy

    net = _net()
    theirs = copy.deepcopy(net)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ww.WeightWatcher(model=theirs).SVDSmoothing(model=theirs, method=ww_method, percent=0.3)
    ours = smooth(net, method, percent=0.3, conventions="ww").model
    for idx in (0, 2, 3):
        w = net[idx].weight.detach().double()
        a, b = ours[idx].weight.detach().double(), theirs[idx].weight.detach().double()
        mats = (lambda t: t.reshape(32, 16, 9).permute(2, 0, 1)) if idx == 3 else (lambda t: t[None])
        tol = 1e-4 * float(torch.linalg.matrix_norm(w.reshape(w.shape[0], -1), 2))
        for x, y in zip(mats(a), mats(b), strict=True):
            assert int(torch.linalg.matrix_rank(x, atol=tol)) == int(torch.linalg.matrix_rank(y, atol=tol))
        err_ours = float(torch.linalg.vector_norm(a - w))
        err_theirs = float(torch.linalg.vector_norm(b - w))
        assert err_ours <= err_theirs * (1 + 1e-6)
        assert float(torch.linalg.vector_norm(a - b)) <= 0.05 * float(torch.linalg.vector_norm(w))
