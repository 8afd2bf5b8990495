"""``nndiag diagnose A B C D``: the four shared CIFAR-10 ResNets side by side.

Data-free: ranked by the weight-spectrum metrics (WeightWatcher's summary α̂ and
log-norm rank this series perfectly, lower = more accurate; see ../shared REFERENCES).
With data: each model's accuracy next to them, checked against an independent
evaluation (own normalisation of the raw uint8 images, own state-dict loading).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from nndiag._utils.threads import limit_threads
from nndiag.cli.app import app
from nndiag.models import build_model
from nndiag.report.probes import load_probe
from tests.conftest import shared_asset

DEPTHS = (20, 32, 44, 56)
N = 128


def _ckpts():
    return [shared_asset("models", f"cifar10_resnet{d}.th") for d in DEPTHS]


def _arch_args():
    return [a for d in DEPTHS for a in ("--arch", f"resnet{d}")]


def test_ranked_by_data_free_metrics():
    if load_probe("spectral") is None:
        pytest.skip("the spectral analysis is not built yet")
    r = CliRunner().invoke(app, ["diagnose", *map(str, _ckpts()), "--probes", "spectral",
                                 "--format", "json", "--threads", "1"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    names = [m["name"] for m in doc["models"]]
    assert names == [f"cifar10_resnet{d}" for d in DEPTHS]
    rows = {c["name"]: c for c in doc["comparison"]}
    # deeper = more accurate = lower alpha_weighted and log_norm (the reference tool's finding)
    deepest_first = " < ".join(reversed(names))
    assert rows["spectral.alpha_weighted"]["ranking"] == deepest_first
    assert rows["spectral.log_norm"]["ranking"] == deepest_first
    for m in doc["models"]:
        assert m["probes"][0]["status"] == "ok"
        assert m["probes"][0]["result"]["summary"]["alpha_weighted"] == rows["spectral.alpha_weighted"][m["name"]]


def _reference_accuracy(path, depth, x_uint8, y):
    sd = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    net = build_model(f"resnet{depth}")
    net.load_state_dict({k.removeprefix("module."): v for k, v in sd.items()})
    mean = np.array([0.485, 0.456, 0.406], dtype=np.float32)
    std = np.array([0.229, 0.224, 0.225], dtype=np.float32)
    x = ((x_uint8.astype(np.float32) / 255.0 - mean) / std).transpose(0, 3, 1, 2)
    with torch.no_grad(), limit_threads(1):
        pred = net.eval()(torch.from_numpy(np.ascontiguousarray(x))).argmax(1).numpy()
    return float((pred == y).mean())


def test_accuracies_next_to_them():
    data = shared_asset("data", "cifar10_test_5k.npz")
    r = CliRunner().invoke(app, ["diagnose", *map(str, _ckpts()), *_arch_args(), "--probes", "evaluation",
                                 "--data", f"{data}?normalize=imagenet", "--n-samples", str(N),
                                 "--format", "json", "--threads", "1"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["data"]["n_samples"] == N
    # the same seeded subset the loader took (load_data's subset: randperm with seed 0)
    idx = torch.randperm(5000, generator=torch.Generator().manual_seed(0))[:N].numpy()
    with np.load(data) as z:
        x, y = z["x"][idx], z["y"][idx]
    acc = {m["name"]: m["probes"][0]["result"]["summary"]["accuracy"] for m in doc["models"]}
    for d, path in zip(DEPTHS, _ckpts(), strict=True):
        assert acc[f"cifar10_resnet{d}"] == pytest.approx(_reference_accuracy(path, d, x, y), abs=1e-12)
    assert all(0.7 < a < 0.95 for a in acc.values())  # ~81-83 % on these JPEG images (ASSETS.md)
    row = next(c for c in doc["comparison"] if c["name"] == "evaluation.accuracy")
    assert [row[n] for n in acc] == list(acc.values())
