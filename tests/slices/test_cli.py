"""``nndiag slices`` and ``nndiag slices-benchmark`` through typer's CliRunner."""

from __future__ import annotations

import json

import numpy as np
import torch
from typer.testing import CliRunner

from nndiag._utils.seeding import fork_rng
from nndiag.cli.app import app
from nndiag.models import build_model

runner = CliRunner()


def _checkpoint(tmp_path):
    with fork_rng(0):
        model = build_model("digits-mlp")
    path = tmp_path / "m.pt"
    torch.save(model.state_dict(), path)
    return path


def test_slices_json_and_gallery(tmp_path):
    ckpt = _checkpoint(tmp_path)
    res = runner.invoke(app, ["slices", str(ckpt), "--arch", "digits-mlp", "--data", "digits", "--n-samples", "300",
                              "--n", "2", "--size", "0.05", "--steps", "150", "--format", "json",
                              "--gallery", str(tmp_path / "g")])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["kind"] == "slices" and len(doc["tables"]["slices"]) == 2
    row = doc["tables"]["slices"][0]
    assert {"size", "mean_loss", "accuracy", "top_indices", "class_counts"} <= set(row)
    assert (tmp_path / "g" / "gallery.png").stat().st_size > 1000
    assert (tmp_path / "g" / "pca.png").stat().st_size > 1000


def test_slices_from_user_embeddings_human(tmp_path):
    rng = np.random.default_rng(0)
    z = rng.normal(size=(200, 3))
    loss = (np.linalg.norm(z - 1.5, axis=1) < 1.2) * 3.0 + rng.random(200)
    np.savez(tmp_path / "e.npz", embeddings=z, losses=loss)
    res = runner.invoke(app, ["slices", "--embeddings", str(tmp_path / "e.npz"), "--n", "1", "--size", "0.05",
                              "--steps", "150"])
    assert res.exit_code == 0, res.output
    assert "top slice: slice-1 (" in res.stdout


def test_bad_input_exits_2_with_one_line(tmp_path):
    ckpt = _checkpoint(tmp_path)
    res = runner.invoke(app, ["slices", str(ckpt), "--arch", "digits-mlp", "--data", "digits", "--layer", "fc9"])
    assert res.exit_code == 2
    assert "unknown layer 'fc9'; valid layer names: net" in res.stderr
    z = np.zeros((30, 2))
    z[0, 0] = np.nan
    np.savez(tmp_path / "nan.npz", z=z, losses=np.arange(30.0))
    res = runner.invoke(app, ["slices", "--embeddings", str(tmp_path / "nan.npz")])
    assert res.exit_code == 2 and "NaN" in res.stderr
    np.savez(tmp_path / "const.npz", z=np.random.default_rng(0).normal(size=(100, 2)), losses=np.ones(100))
    res = runner.invoke(app, ["slices", "--embeddings", str(tmp_path / "const.npz")])
    assert res.exit_code == 2 and "constant" in res.stderr
    res = runner.invoke(app, ["slices", "--embeddings", str(tmp_path / "nan.npz"), "--size", "40"])
    assert res.exit_code == 2
    res = runner.invoke(app, ["slices", str(ckpt), "--arch", "digits-mlp"])
    assert res.exit_code == 2 and "--data" in res.stderr


def test_slices_benchmark_command_runs_and_reports_verdict():
    res = runner.invoke(app, ["slices-benchmark", "--seeds", "1", "--steps", "60", "--n-samples", "700",
                              "--format", "json", "--fail-on", "never"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["kind"] == "slices-benchmark"
    assert doc["findings"][0]["code"] in ("SLICE-BENCH-PASS", "SLICE-BENCH-FAIL")
    # one seed can never meet "4 of 5 seeds"
    assert doc["summary"]["passed"] is False
