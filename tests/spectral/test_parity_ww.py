"""Parity with WeightWatcher 0.7.7 in its conventions mode, and the WW bugs nndiag does not copy.

Runs only where ``weightwatcher==0.7.7`` is installed (the ``bench`` extra; ``make test``
installs it). Layers are matched by name (WW's ``longname``), never by id.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from nndiag.spectral import analyze
from tests.conftest import shared_asset

pytestmark = pytest.mark.filterwarnings("ignore:Passing a dict to DataFrame.from_records")

PARITY = ["alpha", "D", "xmin", "lambda_max", "log_norm", "stable_rank"]



def _ww_details(ww, model, **kw):
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        watcher = ww.WeightWatcher(model=model)
        return watcher, watcher.analyze(**kw)


def assert_parity(ww, model, rtol=1e-3):
    _, details = _ww_details(ww, model)
    ours = analyze(model, conventions="ww").layers.set_index("name")
    assert len(details) > 0
    for _, row in details.iterrows():
        name = row["longname"]
        assert name in ours.index, f"WeightWatcher analyses {name}, nndiag does not"
        for col in PARITY:
            np.testing.assert_allclose(ours.loc[name, col], row[col], rtol=rtol,
                                       err_msg=f"{name}.{col}")
        assert ours.loc[name, "num_pl_spikes"] == row["num_pl_spikes"]
        assert ours.loc[name, "num_evals"] == row["num_evals"]
    return details, ours


def test_parity_resnet20_random_init(ww):
    from nndiag.models.registry import build_model

    torch.manual_seed(0)
    details, ours = assert_parity(ww, build_model("resnet20"))
    assert len(details) == len(ours) == 20


@pytest.mark.parametrize("depth", [20, 32, 44, 56])
def test_parity_pretrained_resnets(ww, depth):
    from nndiag.io.checkpoint import read_checkpoint
    from nndiag.models.registry import build_model

    path = shared_asset("models", f"cifar10_resnet{depth}.th")
    m = build_model(f"resnet{depth}")
    m.load_state_dict(read_checkpoint(path))
    details, ours = assert_parity(ww, m)
    assert len(details) == depth  # every conv and the classifier, in both tools


def test_parity_digits_cnn_before_and_after_training(ww):
    from nndiag._utils.training import train_classifier
    from nndiag.io.data import load_data
    from nndiag.models.registry import build_model

    torch.manual_seed(0)
    m = build_model("digits-cnn")
    assert_parity(ww, m)  # includes a 9-eigenvalue conv: WW's small-N rule
    train_classifier(m, load_data("digits"), epochs=1, max_steps=60, lr=0.05, seed=0, progress=False)
    assert_parity(ww, m)


def test_parity_transformer_encoder_and_in_proj_bug(ww):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(128, 4, 256, batch_first=True)
    enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    for p in enc.parameters():  # independent layers, not clones
        with torch.no_grad():
            p.add_(0.01 * torch.randn_like(p))
    details, ours = assert_parity(ww, enc)
    # WW bug: nn.MultiheadAttention.in_proj_weight is skipped silently; nndiag splits it into Q, K, V
    extra = set(ours.index) - set(details["longname"])
    assert extra == {f"layers.{i}.self_attn.in_proj.{p}" for i in range(2) for p in "qkv"}
    q = ours.loc["layers.0.self_attn.in_proj.q"]
    w = enc.layers[0].self_attn.in_proj_weight.detach()[:128].double().numpy()
    assert q["lambda_max"] == pytest.approx(np.linalg.norm(w, 2) ** 2, rel=1e-5)


def test_ww_bug_conv_scaling_differs_between_analyze_and_get_esd(ww):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(8, 16, 3), nn.Linear(30, 20))
    watcher, details = _ww_details(ww, m)
    esd_max = float(np.max(watcher.get_ESD(layer=1)))
    ww_lmax = float(details.set_index("longname").loc["0", "lambda_max"])
    assert ww_lmax == pytest.approx(0.5 * esd_max, rel=1e-6)  # analyze() scales by 0.5, get_ESD() not
    w = m[0].weight.detach().double().numpy()
    true = max(np.linalg.norm(w[:, :, i, j], 2) ** 2 for i in range(3) for j in range(3))
    assert esd_max == pytest.approx(true, rel=1e-6)
    # nndiag: one definition everywhere (the true ESD), 0.5 only in the WW conventions mode
    assert analyze(m).layers.loc[0, "lambda_max"] == pytest.approx(true, rel=1e-5)
    assert analyze(m, conventions="ww").layers.loc[0, "lambda_max"] == pytest.approx(0.5 * true, rel=1e-5)


def test_ww_bug_sv_min_is_max_of_slice_minima(ww):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(8, 16, 3))
    _, details = _ww_details(ww, m)
    w = m[0].weight.detach().double().numpy()
    mins = [np.linalg.svd(w[:, :, i, j], compute_uv=False).min() for i in range(3) for j in range(3)]
    ww_svmin = float(details.loc[0, "sv_min"])
    assert ww_svmin == pytest.approx(max(mins) * np.sqrt(0.5), rel=1e-5)  # WW: max of minima
    ours = analyze(m, conventions="ww").layers.loc[0, "sv_min"]
    assert ours == pytest.approx(min(mins) * np.sqrt(0.5), rel=1e-4)  # the true smallest


def test_ww_bug_conv1d_and_failed_fits_in_summary(ww):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv1d(6, 12, 5), nn.Linear(32, 32), nn.Linear(40, 30))
    with torch.no_grad():
        m[1].weight.copy_(torch.outer(torch.randn(32), torch.randn(32)))  # rank 1: the fit fails
    watcher, details = _ww_details(ww, m)
    by = details.set_index("longname")
    # Conv1d: WW does not give its in·k = 30 eigenvalues (it drops the layer or keeps k)
    assert "0" not in by.index or by.loc["0", "num_evals"] != 30
    ours = analyze(m, conventions="ww")
    L = ours.layers.set_index("name")
    assert L.loc["0", "num_evals"] == 30
    # WW averages the failed fit's alpha = -1 into its summary; nndiag leaves it out
    assert by.loc["1", "alpha"] == -1
    ww_mean = watcher.get_summary(details)["alpha"]
    assert ww_mean == pytest.approx(by["alpha"].mean())
    assert L.loc["1", "status"] == "failed" and np.isnan(L.loc["1", "alpha"])
    ok = L[L["status"] == "success"]
    assert ours.summary["alpha"] == pytest.approx(ok["alpha"].mean())
    assert ours.summary["alpha"] > ww_mean


def test_ww_bug_batchnorm1d_without_affine_crashes(ww):
    m = nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(16, affine=False))
    with pytest.raises(AttributeError):
        _ww_details(ww, m)
    res = analyze(m)
    assert list(res.layers["name"]) == ["0"]


def test_ww_bug_import_changes_global_logging_and_warnings(ww):
    code = ("import logging, warnings, nndiag.spectral.analyze; "
            "lvl = logging.getLogger().level; f = list(warnings.filters); "
            "import weightwatcher; "
            "print(lvl != logging.getLogger().level, f != list(warnings.filters))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "True True"
    # nndiag's analysis leaves both alone
    lvl, filters = logging.getLogger().level, list(warnings.filters)
    analyze(nn.Linear(32, 16))
    assert logging.getLogger().level == lvl and list(warnings.filters) == filters


def test_parity_encoder_12_layers_768_wide(ww):
    # the model: 12 layers, width 768, feed-forward 3072, randomly initialised; each
    # layer re-initialised so the layers are distinct (nn.TransformerEncoder deep-copies one)
    torch.manual_seed(1)
    layer = nn.TransformerEncoderLayer(768, 12, 3072, batch_first=True)
    enc = nn.TransformerEncoder(layer, 12, enable_nested_tensor=False)
    for mod in enc.layers:
        for sub in mod.modules():
            if hasattr(sub, "_reset_parameters"):
                sub._reset_parameters()
            elif isinstance(sub, nn.Linear):
                sub.reset_parameters()
    details, ours = assert_parity(ww, enc)
    assert len(details) == 36 and len(ours) == 72  # WW skips in_proj_weight; nndiag adds Q, K, V
