"""The ``hessian`` and ``landscape`` commands and probes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from nndiag.cli.app import app
from nndiag.io.data import load_data
from nndiag.io.models import load_model
from nndiag.landscape import hessian_spectrum
from nndiag.report.probes import load_probe
from nndiag.report.results import Result

runner = CliRunner()


def test_hessian_json_fields_match_the_library(tmp_path):
    import torch

    from nndiag._utils.seeding import fork_rng
    from nndiag.models import build_model

    with fork_rng(0):
        model = build_model("digits-mlp")
    ckpt = tmp_path / "mlp.pt"
    torch.save(model.state_dict(), ckpt)
    res = runner.invoke(app, ["hessian", str(ckpt), "--arch", "digits-mlp", "--data", "digits",
                              "--n-samples", "128", "--top-k", "3", "--trace", "--trace-probes", "30",
                              "--density", "--slq-steps", "20", "--format", "json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    ev = doc["eigenvalues"]
    assert len(ev) == 3 and ev == sorted(ev, reverse=True)
    assert doc["trace"] is not None and doc["trace_stderr"] > 0
    assert set(doc["criteria"]) == {"re", "Kh", "Ct"} and doc["n_samples"] == 128
    assert doc["params"]["slq_steps"] == 20 and doc["params"]["tol"] == 1e-4
    assert doc["summary"]["criteria_settings"]["reorth"] == "full"
    ref = hessian_spectrum(model, load_data("digits", n_samples=128, seed=0), top_k=3, tol=1e-4)
    np.testing.assert_allclose(ev, ref.eigenvalues, rtol=1e-4)


def test_hessian_human_and_bad_input(tmp_path):
    ok = runner.invoke(app, ["hessian", "digits-mlp", "--data", "digits", "--n-samples", "64"])
    assert ok.exit_code == 0 and "top_1" in ok.stdout
    no_data = runner.invoke(app, ["hessian", "digits-mlp"])
    assert no_data.exit_code == 2 and "--data" in no_data.output
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, x=np.random.default_rng(0).normal(size=(16, 40)).astype(np.float32), y=np.arange(16) % 10)
    bad = runner.invoke(app, ["hessian", "digits-mlp", "--data", str(wrong)])
    assert bad.exit_code == 2 and "does not fit" in bad.output
    labels = tmp_path / "labels.npz"
    np.savez(labels, x=np.zeros((16, 64), np.float32), y=np.arange(16) + 5)
    bad = runner.invoke(app, ["hessian", "digits-mlp", "--data", str(labels)])
    assert bad.exit_code == 2 and "labels must lie in" in bad.output
    method = runner.invoke(app, ["hessian", "digits-mlp", "--data", "digits", "--n-samples", "64", "--trace",
                                 "--trace-method", "magic"])
    assert method.exit_code == 2 and "xtrace" in method.output


def test_hessian_and_landscape_cli_on_token_ids(tmp_path):
    import torch
    import torch.nn.functional as F

    from tests.landscape._dense import tiny_embedding, token_data

    x, y = token_data()
    tokens = tmp_path / "tokens.npz"
    np.savez(tokens, x=x.numpy().astype(np.int32), y=y.numpy())
    spec = "tests.landscape._dense:tiny_embedding"
    res = runner.invoke(app, ["hessian", spec, "--data", str(tokens), "--top-k", "2", "--format", "json"])
    assert res.exit_code == 0, res.output
    lib = hessian_spectrum(tiny_embedding(), (x, y), top_k=2)
    np.testing.assert_allclose(json.loads(res.stdout)["eigenvalues"], lib.eigenvalues, rtol=1e-5)
    res = runner.invoke(app, ["landscape", spec, "--data", str(tokens), "--dim", "1", "--steps", "3",
                              "--format", "json"])
    assert res.exit_code == 0, res.output
    grid = json.loads(res.stdout)["tables"]["grid"]
    with torch.no_grad():
        own = float(F.cross_entropy(tiny_embedding()(x), y))
    assert [r for r in grid if r["alpha"] == 0.0][0]["loss"] == pytest.approx(own, rel=1e-6)
    big = tmp_path / "big.npz"
    np.savez(big, x=x.numpy() + 5, y=y.numpy())
    bad = runner.invoke(app, ["hessian", spec, "--data", str(big)])
    assert bad.exit_code == 2 and "token ids must lie in [0, 10]" in bad.output
    assert len(bad.output.strip().splitlines()) == 1


def test_hessian_cli_trace_method_reaches_the_library(tmp_path):
    import torch

    from nndiag._utils.seeding import fork_rng
    from nndiag.models import build_model

    with fork_rng(0):
        model = build_model("digits-mlp")
    ckpt = tmp_path / "mlp.pt"
    torch.save(model.state_dict(), ckpt)
    res = runner.invoke(app, ["hessian", str(ckpt), "--arch", "digits-mlp", "--data", "digits", "--n-samples", "64",
                              "--top-k", "0", "--trace", "--trace-method", "xtrace", "--trace-probes", "12",
                              "--format", "json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["params"]["trace_method"] == "xtrace"
    ref = hessian_spectrum(model, load_data("digits", n_samples=64, seed=0), top_k=0, trace=True,
                           trace_method="xtrace", trace_probes=12)
    assert doc["trace"] == pytest.approx(ref.trace, rel=1e-5) and ref.n_hvp <= 2 * 12 + 2


def test_landscape_writes_picture_and_grid(tmp_path):
    pytest.importorskip("matplotlib")
    png, npz = tmp_path / "l.png", tmp_path / "l.npz"
    res = runner.invoke(app, ["landscape", "digits-cnn", "--data", "digits", "--n-samples", "64",
                              "--steps", "5", "--out", str(png), "--grid", str(npz)])
    assert res.exit_code == 0, res.output
    assert png.stat().st_size > 1000
    with np.load(npz) as f:
        assert f["losses"].shape == (5, 5) and np.isfinite(f["losses"]).all()
    res1 = runner.invoke(app, ["landscape", "digits-mlp", "--data", "digits", "--n-samples", "64", "--dim", "1",
                               "--steps", "5", "--norm", "layer", "--format", "json"])
    assert res1.exit_code == 0
    doc = json.loads(res1.stdout)
    assert doc["params"]["norm"] == "layer" and len(doc["tables"]["grid"]) == 5
    bad = runner.invoke(app, ["landscape", "digits-mlp", "--data", "digits", "--steps", "1000",
                              "--out", str(png)])
    assert bad.exit_code == 2 and "limit" in bad.output


def test_landscape_toward_other_checkpoints(tmp_path):
    """``--toward``: the line to another checkpoint and the plane through three (one saved
    with DataParallel's ``module.`` prefix); the ends are the other models' own losses."""
    import torch
    import torch.nn.functional as F

    from nndiag._utils.seeding import fork_rng
    from nndiag.models import build_model

    models, paths = [], []
    for i in range(3):
        with fork_rng(i):
            models.append(build_model("digits-mlp").eval())
        paths.append(tmp_path / f"m{i}.pt")
        state = models[-1].state_dict()
        torch.save({f"module.{k}": v for k, v in state.items()} if i == 2 else state, paths[-1])
    bundle = load_data("digits", n_samples=64, seed=0)  # what the command draws
    with torch.no_grad():
        own = [float(F.cross_entropy(m(bundle.x), bundle.y)) for m in models]
    base = ["landscape", str(paths[0]), "--arch", "digits-mlp", "--data", "digits", "--n-samples", "64"]
    line = tmp_path / "line.npz"
    res = runner.invoke(app, [*base, "--toward", str(paths[1]), "--steps", "7", "--grid", str(line)])
    assert res.exit_code == 0, res.output
    assert "interpolation directions" in res.output
    with np.load(line) as f:
        alphas, losses = f["alphas"], f["losses"]
    np.testing.assert_allclose(alphas, np.linspace(-0.25, 1.25, 7))  # a little beyond both ends
    assert losses[1] == pytest.approx(own[0], rel=1e-5) and losses[5] == pytest.approx(own[1], rel=1e-5)
    # the loss barrier between the two: the halfway model evaluated on its own
    half = build_model("digits-mlp").eval()
    with torch.no_grad():
        for q, a, b in zip(half.parameters(), models[0].parameters(), models[1].parameters(), strict=True):
            q.copy_((a + b) / 2)
        mid = float(F.cross_entropy(half(bundle.x), bundle.y))
    assert losses[3] == pytest.approx(mid, rel=1e-5)
    res = runner.invoke(app, [*base, "--toward", str(paths[1]), "--steps", "7", "--format", "json"])
    (barrier,) = json.loads(res.stdout)["summary"]["barriers"]
    t = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
    gaps = losses[1:6] - ((1 - t) * own[0] + t * own[1])
    assert barrier["from"] == "m0" and barrier["to"] == "m1"  # the files' names
    assert barrier["barrier"] == pytest.approx(gaps.max(), abs=1e-6)  # (float32 losses near 2.3)
    assert barrier["barrier"] >= mid - sum(own[:2]) / 2 - 1e-6
    assert barrier["at"] == t[gaps.argmax()]
    plane = tmp_path / "plane.npz"
    res = runner.invoke(app, [*base, "--toward", str(paths[1]), "--toward", str(paths[2]), "--steps", "3",
                              "--span", "0.5", "--grid", str(plane), "--format", "json"])
    assert res.exit_code == 0, res.output
    with np.load(plane) as f:  # span 0.5: steps -0.5, 0, 0.5 along each
        p = f["losses"]
    doc = json.loads(res.stdout)
    assert doc["params"]["directions"] == "interpolation" and doc["params"]["dim"] == 2
    assert doc["params"]["toward"] == ["m1", "m2"]
    assert doc["summary"]["barriers"] == []  # span 0.5: the other models are off the grid
    assert p[1, 1] == pytest.approx(own[0], rel=1e-5)
    # θ0 + ½(θ1 − θ0) + ½(θ2 − θ0) = (θ1 + θ2)/2: the midpoint of the other two
    mid = build_model("digits-mlp").eval()
    with torch.no_grad():
        for q, a, b in zip(mid.parameters(), models[1].parameters(), models[2].parameters(), strict=True):
            q.copy_((a + b) / 2)
        want = float(F.cross_entropy(mid(bundle.x), bundle.y))
    assert p[2, 2] == pytest.approx(want, rel=1e-5)
    for extra, msg in ([["--toward", str(paths[1])] * 3, "one model"],
                       [["--toward", str(paths[1]), "--directions", "hessian"], "not both"],
                       [["--toward", str(paths[1]), "--dim", "2"], "does not match"]):
        bad = runner.invoke(app, [*base, *extra, "--grid", str(plane)])
        assert bad.exit_code != 0 and msg in bad.output, bad.output
    other = build_model("digits-cnn")
    torch.save(other.state_dict(), tmp_path / "cnn.pt")
    bad = runner.invoke(app, [*base, "--toward", str(tmp_path / "cnn.pt"), "--grid", str(plane)])
    assert bad.exit_code != 0 and "same architecture" in bad.output


def test_probes_cap_the_tokens_of_long_sequences(tmp_path):
    """256 sequences of 1,024 tokens would make every diagnose pass 262k tokens: the Hessian and
    landscape probes take at most PROBE_TOKENS tokens of token data unless told otherwise."""
    import torch
    from torch import nn

    from nndiag.landscape._setup import PROBE_TOKENS, lm_loss, probe_samples

    np.savez(tmp_path / "long.npz", x=np.random.default_rng(0).integers(0, 50, (10, 1024)))
    tokens = load_data(tmp_path / "long.npz")
    digits = load_data("digits", n_samples=300)
    assert probe_samples(256, tokens, given=False) == PROBE_TOKENS // 1024 == 4
    assert probe_samples(256, tokens, given=True) is None  # asked for more than there is: all
    assert probe_samples(3, tokens, given=True) == 3
    assert probe_samples(256, digits, given=False) == 256 and probe_samples(512, digits, given=False) is None
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, 8), nn.Linear(8, 50))
    land = load_probe("landscape").run(model, tokens, loss=lm_loss, steps=3)
    assert land.params["n_samples"] == 4
    hess = load_probe("hessian").run(model, tokens, loss=lm_loss, trace=False, density=False, top_k=1)
    assert hess.summary["n_samples"] == 4


def test_probes_follow_the_contract():
    data = load_data("digits", n_samples=96)
    lm = load_model("digits-mlp")
    for name, opts in (("hessian", {"slq_steps": 15, "trace_probes": 20}), ("landscape", {"steps": 5})):
        probe = load_probe(name)
        assert probe.NAME == name and probe.NEEDS_DATA is True
        result = probe.run(lm, data, seed=0, device="cpu", **opts)
        assert isinstance(result, Result) and result.kind == name
        again = Result.from_dict(json.loads(result.to_json()))
        figs = probe.figures(again)
        assert figs and all(hasattr(f, "savefig") for f in figs.values())
