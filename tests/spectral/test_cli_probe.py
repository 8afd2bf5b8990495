"""`nndiag spectral` through typer's CliRunner, the probe contract, plots and compare()."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from nndiag.cli.app import app
from nndiag.report.results import Result

runner = CliRunner()


def test_cli_json_has_layers_summary_skipped():
    r = runner.invoke(app, ["spectral", "resnet20", "--format", "json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert {"layers", "summary", "skipped"} <= set(doc)
    assert len(doc["layers"]) == 20 and doc["layers"][0]["name"] == "conv1"
    assert all(set(row) >= {"alpha", "D", "xmin", "lambda_max", "log_norm", "stable_rank"}
               for row in doc["layers"])
    assert any(row["reason"] == "normalisation layer parameter" for row in doc["skipped"])


def test_cli_options_human_output_and_plots(tmp_path):
    r = runner.invoke(app, ["spectral", "digits-cnn", "--conv-mode", "unfold", "--conventions", "ww",
                            "--mp-fit", "--plots", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert "layers analysed" in r.stdout
    pngs = sorted(p.name for p in tmp_path.iterdir())
    assert pngs == ["spectral_alpha_per_layer.png", "spectral_esd_worst_layer.png", "spectral_mp_fit.png"]
    assert all((tmp_path / p).stat().st_size > 1000 for p in pngs)


def test_cli_bad_input_exit_2(tmp_path):
    r = runner.invoke(app, ["spectral", str(tmp_path / "missing.pt")])
    assert r.exit_code == 2
    r = runner.invoke(app, ["spectral", "resnet20", "--conv-mode", "fft"])
    assert r.exit_code == 2


def test_cli_fail_on_exit_code():
    r = runner.invoke(app, ["spectral", "resnet20", "--fail-on", "warn", "--format", "json"])
    doc = json.loads(r.stdout)
    worst = {f["severity"] for f in doc["findings"]}
    assert r.exit_code == (1 if worst & {"warn", "fail", "error"} else 0)


def test_probe_contract_and_figures_from_json_only():
    from nndiag.io.models import load_model
    from nndiag.report.probes import load_probe

    probe = load_probe("spectral")
    assert probe.NAME == "spectral" and probe.NEEDS_DATA is False
    lm = load_model("digits-cnn")
    res = probe.run(lm, None, seed=0, device=torch.device("cpu"), mp_fit=True)
    assert res.kind == "spectral" and res.findings
    again = Result.from_dict(json.loads(res.to_json()))
    figs = probe.figures(again)
    assert set(figs) == {"alpha_per_layer", "esd_worst_layer", "mp_fit"}
    ax = figs["esd_worst_layer"].axes[0]
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    assert any("power law" in t.get_text() for t in ax.get_legend().get_texts())


def test_compare_base_and_finetuned():
    from nndiag.spectral import compare, correlation_flow
    from nndiag.spectral.analyze import analyze

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))
    tuned = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))
    tuned.load_state_dict(base.state_dict())
    with torch.no_grad():
        u = torch.randn(64, 4)
        tuned[2].weight.add_(u @ torch.randn(4, 128) * 0.2)  # a low-rank update on one layer
    res = compare(base, tuned, min_evals=4)
    df = res.table("layers").set_index("name")
    assert df.loc["0", "rel_change"] == 0 and df.loc["4", "rel_change"] == 0
    dw = (tuned[2].weight - base[2].weight).detach().double()
    assert df.loc["2", "rel_change"] == pytest.approx(
        float(dw.norm() / base[2].weight.detach().double().norm()), rel=1e-6)
    assert df.loc["2", "delta_alpha"] != 0
    assert res.summary["num_unchanged"] == 2
    flow = correlation_flow(analyze(base))
    assert list(flow.columns) == ["name", "depth", "alpha", "log_spectral_norm", "status"]
    assert list(flow["depth"]) == [0, 1, 2]


def test_cli_compare_with_a_lightning_checkpoint(tmp_path):
    """``nndiag spectral BASE --compare OTHER``: the other model saved as a Lightning checkpoint
    (``model.`` keys under ``state_dict``); numbers as compare() on the two modules."""
    from nndiag.models import build_model
    from nndiag.spectral import compare

    torch.manual_seed(0)
    base = build_model("digits-mlp")
    tuned = build_model("digits-mlp")
    tuned.load_state_dict(base.state_dict())
    with torch.no_grad():
        tuned.net[3].weight.add_(torch.randn(64, 3) @ torch.randn(3, 64) * 0.1)
    torch.save(base.state_dict(), tmp_path / "base.pt")
    torch.save({"epoch": 1, "state_dict": {f"model.{k}": v for k, v in tuned.state_dict().items()}},
               tmp_path / "tuned.ckpt")
    r = runner.invoke(app, ["spectral", str(tmp_path / "base.pt"), "--arch", "digits-mlp",
                            "--compare", str(tmp_path / "tuned.ckpt"), "--format", "json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    got = {row["name"]: row for row in doc["tables"]["layers"]}
    ref = compare(base, tuned).table("layers").set_index("name")
    assert set(got) == set(ref.index) == {"net.1", "net.3", "net.5"}
    for name, row in got.items():
        assert row["delta_alpha"] == pytest.approx(ref.loc[name, "delta_alpha"], rel=1e-9)
        assert row["rel_change"] == pytest.approx(ref.loc[name, "rel_change"], rel=1e-9, abs=0)
    assert got["net.1"]["rel_change"] == 0 and got["net.3"]["rel_change"] > 0.01
    human = runner.invoke(app, ["spectral", str(tmp_path / "base.pt"), "--arch", "digits-mlp",
                                "--compare", str(tmp_path / "tuned.ckpt")])
    assert human.exit_code == 0 and "3 layers in both" in human.output and "2 unchanged" in human.output
    bad = runner.invoke(app, ["spectral", str(tmp_path / "base.pt"), "--arch", "digits-mlp",
                              "--compare", "resnet20"])
    assert bad.exit_code != 0 and "share no analysed layer" in bad.output


def test_scale_collapse_finding():
    torch.manual_seed(0)
    sd = {"a.weight": torch.randn(64, 64), "b.weight": torch.randn(64, 64) * 1e-3,
          "c.weight": torch.randn(64, 64)}
    from nndiag.spectral import analyze, scale_collapse

    res = analyze(sd)
    jumps = scale_collapse(res.layers, 1.0)
    assert list(jumps["name"]) == ["b", "c"]
    assert jumps["delta"].iloc[0] == pytest.approx(-6.0, abs=0.1)  # λ scales by (1e-3)²
    assert "SPEC-SCALE-COLLAPSE" in {f.code for f in res.findings}
