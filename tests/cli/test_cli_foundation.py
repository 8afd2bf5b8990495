"""The CLI's foundation commands through typer's CliRunner, and exit codes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import nndiag
from nndiag.cli.app import app
from nndiag.models import build_model

runner = CliRunner()


def _run(*args: str):
    return runner.invoke(app, list(args))


def test_version_and_env():
    r = _run("--version")
    assert r.exit_code == 0 and r.stdout.strip() == f"nndiag {nndiag.__version__}"
    r = _run("env", "--format", "json")
    assert r.exit_code == 0
    info = json.loads(r.stdout)
    assert info["packages"]["torch"] == torch.__version__.split("+")[0] or info["packages"]["torch"].startswith("2.")
    assert info["threads"]["cpu_count"] >= 1 and "cuda_available" in info["devices"]


def test_layers_json_lists_every_tensor_with_reasons(tmp_path):
    m = build_model("digits-cnn", batchnorm=True)
    p = tmp_path / "m.pt"
    torch.save(m.state_dict(), p)
    r = _run("layers", str(p), "--format", "json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["schema_version"] and doc["meta"]["torch_version"] == torch.__version__
    rows = {row["name"]: row for row in doc["tables"]["layers"]}
    assert set(rows) == set(m.state_dict())
    assert rows["features.0.weight"]["used"] and rows["features.0.weight"]["kind"] == "conv2d"
    assert rows["classifier.1.weight"]["shape"] == "64×512" and rows["classifier.1.weight"]["params"] == 32768
    assert not rows["features.0.bias"]["used"] and rows["features.0.bias"]["reason"] == "1-D tensor"
    assert rows["features.1.running_mean"]["kind"] == "buffer"
    assert doc["summary"]["parameters"] == sum(p.numel() for p in m.parameters())


@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning")
def test_layers_of_a_parametrised_model_count_its_pieces_once(tmp_path, monkeypatch):
    (tmp_path / "wn_factory.py").write_text(
        "import torch.nn as nn\nfrom torch.nn.utils import parametrizations as P\n\n\n"
        "def make():\n    return nn.Sequential(P.weight_norm(nn.Linear(64, 32)), nn.ReLU(), nn.Linear(32, 10))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    r = _run("layers", "wn_factory:make", "--format", "json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    rows = {row["name"]: row for row in doc["tables"]["layers"]}
    assert rows["0.weight"]["used"] and rows["0.parametrizations.weight.original1"]["kind"] == "parametrization"
    assert doc["summary"]["parameters"] == 64 * 32 + 32 + 32 + 32 * 10 + 10  # g, v, biases: not 0.weight
    (tmp_path / "old_wn.py").write_text(
        "import torch.nn as nn\nfrom torch.nn.utils import weight_norm\n\n\n"
        "def make():\n    return nn.Sequential(weight_norm(nn.Linear(64, 32)), nn.ReLU(), nn.Linear(32, 10))\n")
    doc = json.loads(_run("layers", "old_wn:make", "--format", "json").stdout)
    assert doc["summary"]["parameters"] == 64 * 32 + 32 + 32 + 32 * 10 + 10 and doc["summary"]["used"] == 2


def test_layers_human_output():
    r = _run("layers", "resnet20")
    assert r.exit_code == 0
    assert "conv1.weight" in r.stdout and "269,722 parameters" in r.stdout


def test_data_command_json():
    r = _run("data", "digits", "--n-samples", "50", "--format", "json")
    assert r.exit_code == 0
    doc = json.loads(r.stdout)
    assert doc["n_samples"] == 50 and sum(doc["class_counts"]) == 50
    assert doc["x_dtype"] == "float32"


@pytest.mark.parametrize(
    "args, needle",
    [
        (["layers", "{tmp}/x.xyz"], "unknown model file type"),
        (["layers", "{tmp}/empty.pt"], "file is empty"),
        (["layers", "{tmp}/nope.pt"], "no such file"),
        (["layers", "{tmp}/emptydir"], "no weights"),
        (["layers", "resnet20", "--weights", "{tmp}/nope.pt"], "no such weights file"),
        (["data", "{tmp}/noxy.npz"], "'x' and 'y'"),
        (["data", "{tmp}/mismatch.npz"], "examples but y has"),
        (["data", "whatever"], "names no data set"),
        (["layers", "resnet20", "--device", "cuda"], None),
        # output paths are checked before any analysis runs
        (["landscape", "digits-mlp", "--data", "digits", "--out", "{tmp}/a.xyz"], "--out picture must end in"),
        (["landscape", "digits-mlp", "--data", "digits", "--out", "{tmp}/a.png", "--grid", "{tmp}/g.dat"],
         "--grid file must end in .json, .npz"),
        (["landscape", "digits-mlp", "--data", "digits", "--out", "{tmp}/adir.png"], "is a folder"),
        (["hessian", "digits-mlp", "--data", "digits", "--density", "--plot", "{tmp}/x.xyz/d.png"], "cannot write"),
        (["spectral", "digits-mlp", "--plots", "{tmp}/x.xyz"], "is a file"),
        (["slices", "digits-mlp", "--data", "digits", "--gallery", "{tmp}/x.xyz"], "is a file"),
        (["slices", "digits-mlp", "--data", "{tmp}/mismatch5.npz"], "data of shape (5,) does not fit MLP"),
        (["slices", "digits-mlp", "--data", "{tmp}/labels12.npz"], "labels must lie in [0, 9]"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, args, needle):
    (tmp_path / "emptydir").mkdir()
    (tmp_path / "x.xyz").write_text("?")
    (tmp_path / "empty.pt").write_bytes(b"")
    np.savez(tmp_path / "noxy.npz", z=np.zeros(2))
    np.savez(tmp_path / "mismatch.npz", x=np.zeros((3, 2)), y=np.zeros(2))
    np.savez(tmp_path / "mismatch5.npz", x=np.zeros((8, 5), np.float32), y=np.arange(8) % 3)
    np.savez(tmp_path / "labels12.npz", x=np.zeros((24, 64), np.float32), y=np.arange(24) % 12)
    (tmp_path / "adir.png").mkdir()
    before = sorted(p.name for p in tmp_path.iterdir())
    if "--device" in args and torch.cuda.is_available():
        pytest.skip("CUDA present")
    r = _run(*[a.format(tmp=tmp_path) for a in args])
    assert r.exit_code == 2, r.output
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("nndiag: error:")
    assert "Traceback" not in r.output
    if needle:
        assert needle in err[0]
    assert r.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, nothing left behind


def test_import_is_light():
    import subprocess
    import sys

    code = (
        "import sys, nndiag; nndiag.__version__; "
        "print(','.join(m for m in ('matplotlib','scipy','sklearn','transformers','onnx','pandas','torch') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""
