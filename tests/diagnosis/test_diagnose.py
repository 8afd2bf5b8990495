"""Diagnosing users' models: decision logic, shipped thresholds, probe contract, CLI."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from nndiag._utils.model_state import same_snapshot, snapshot
from nndiag._utils.seeding import fork_rng
from nndiag._utils.training import train_classifier
from nndiag.cli.app import app
from nndiag.diagnosis import probe
from nndiag.diagnosis.api import diagnose_failure
from nndiag.diagnosis.mdtree import MDTree
from nndiag.diagnosis.shipped import (
    ThresholdSet,
    decide,
    default_thresholds_path,
    fit_threshold_set,
    load_thresholds,
)
from nndiag.errors import DataError, InputError
from nndiag.io.data import load_data
from nndiag.models import build_model


@pytest.fixture(scope="module")
def data():
    return load_data("digits?split=train").subset(400, seed=0)


@pytest.fixture(scope="module")
def pair(data):
    from nndiag._utils.threads import limit_threads

    models = []
    for s in (0, 1):
        with fork_rng(s):
            m = build_model("digits-mlp")
        with limit_threads(1):
            train_classifier(m, data, epochs=3, batch_size=32, lr=0.05, seed=s, progress=False)
        models.append(m)
    return models


def _toy_set() -> ThresholdSet:
    return ThresholdSet({
        "temp": MDTree.from_thresholds("temp", [0.5, -10, 3.0], leaf_counts=[[1, 9], [8, 2], [1, 3], [5, 0]]),
        "width": MDTree.from_thresholds("width", [0.5, -10, -20], leaf_counts=[[2, 2], [3, 1], [1, 5], [6, 0]]),
    }, ranges={"train_error": (0.0, 50.0)})


def test_decide_follows_the_trees():
    ts = _toy_set()
    # interpolating (train error 0.1 <= 0.5) -> Q1 "small"; well connected -> Q2a "batch"
    dg = decide({"train_error": 0.1, "mode_connectivity_peak": -2.0, "hessian_t": 4.0}, ts)
    assert (dg.answer, dg.code) == ("small", "MDT-TEMP-TOO-SMALL")
    assert dg.answers == {"temp": "small", "width": "batch"}
    # leaf 0 of temp: (9+1)/(10+2); leaf 1 of width: (3+1)/(4+2)
    assert dg.confidence == pytest.approx(10 / 12 * 4 / 6)
    assert "decrease the batch size" in dg.recommendation
    # not interpolating, poorly connected (-25 <= -20) -> Q2a "width" wins
    dg = decide({"train_error": 20.0, "mode_connectivity_peak": -25.0, "hessian_t": 2.0}, ts)
    assert (dg.answer, dg.code, dg.recommendation) == ("width", "MDT-MODEL-TOO-SMALL", "increase the width")
    # not interpolating, connected -> Q1 "large"
    dg = decide({"train_error": 60.0, "mode_connectivity_peak": -5.0, "hessian_t": 2.0}, ts)
    assert dg.answer == "large" and dg.out_of_range == ["train_error"]
    # interpolating and poorly connected: Q2a says "width" but from a 50/50 leaf (conf 0.5 < 0.6)
    dg = decide({"train_error": 0.1, "mode_connectivity_peak": -15.0, "hessian_t": 2.0}, ts)
    assert dg.answers["width"] == "width" and dg.answer == "small"
    with pytest.raises(DataError, match="hessian_t"):
        decide({"train_error": 20.0, "mode_connectivity_peak": -25.0, "hessian_t": float("nan")}, ts)


def test_shipped_thresholds_follow_from_the_committed_zoo():
    path = default_thresholds_path()
    if not path.is_file():
        pytest.skip("no shipped thresholds yet")
    ts = load_thresholds()
    assert {"temp", "width"} <= set(ts.trees)
    zoo = pd.read_csv(path.parent / ts.meta["zoo"])
    again = fit_threshold_set(zoo, method=ts.meta["method"])
    for q, tree in ts.trees.items():
        np.testing.assert_allclose(again.trees[q].thresholds, tree.thresholds, rtol=1e-9)
        np.testing.assert_allclose(again.trees[q].leaf_counts, tree.leaf_counts)


def test_transfer_figures_in_benchmarks_md_follow_from_the_committed_zoos():
    from nndiag.diagnosis.shipped import evaluate_transfer

    folder = default_thresholds_path().parent
    if not (folder / "zoo_digits_noise10.csv").is_file():
        pytest.skip("no committed zoo tables yet")
    clean = pd.read_csv(folder / "zoo_digits.csv")
    noisy = pd.read_csv(folder / "zoo_digits_noise10.csv")
    fwd = evaluate_transfer(clean, noisy).set_index("name")
    np.testing.assert_allclose(
        fwd.loc["temp", ["mdtree_paper", "mdtree_exact", "validation", "hyperparameter"]].to_numpy(float),
        [73.56, 75.86, 62.07, 55.17], atol=0.01)
    back = evaluate_transfer(noisy, clean).set_index("name")
    np.testing.assert_allclose(
        back.loc["temp", ["mdtree_paper", "mdtree_exact", "validation", "hyperparameter"]].to_numpy(float),
        [84.27, 88.76, 52.81, 50.56], atol=0.01)
    other = evaluate_transfer(clean, pd.read_csv(folder / "zoo_mnist1d.csv")).set_index("name")
    np.testing.assert_allclose(
        other.loc["temp", ["mdtree_paper", "mdtree_exact", "validation", "hyperparameter"]].to_numpy(float),
        [54.17, 58.33, 60.42, 58.33], atol=0.01)


def test_bad_thresholds_file(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_thresholds(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(InputError, match="not a JSON"):
        load_thresholds(tmp_path / "bad.json")
    (tmp_path / "empty.json").write_text(json.dumps({"trees": {}}))
    with pytest.raises(InputError, match="no 'temp' tree"):
        load_thresholds(tmp_path / "empty.json")


def test_diagnose_failure_leaves_models_alone(pair, data, tmp_path):
    a, b = pair
    ts_path = tmp_path / "t.json"
    _toy_set().save(ts_path)
    before = [snapshot(a), snapshot(b)]
    res = diagnose_failure(a, b, data, thresholds=ts_path, curve="linear", hessian_samples=64, threads=1)
    assert same_snapshot(before[0], snapshot(a)) and same_snapshot(before[1], snapshot(b))
    s = res.summary
    assert s["ran"] and s["answer"] in ("small", "large", "width", "data")
    assert 0 < s["confidence"] <= 1
    codes = [f.code for f in res.findings]
    assert codes[0].startswith("MDT-") and "MDT-LINEAR-PATH" in codes
    assert res.table("curve")["t"].tolist() == [0, 0.25, 0.5, 0.75, 1]
    json.loads(res.to_json())
    figs = probe.figures(res)
    assert "mdtree_curve" in figs


def test_probe_reports_that_it_cannot_run_without_second_seed(pair, data):
    res = probe.run(pair[0], data, second_seed=None)
    assert res.summary["ran"] is False
    assert [f.code for f in res.findings] == ["MDT-NEEDS-SECOND-SEED"]
    assert probe.NAME == "mdtree" and probe.NEEDS_DATA


def test_cli_diagnose(pair, tmp_path):
    a, b = pair
    torch.save(a.state_dict(), tmp_path / "a.pt")
    torch.save(b.state_dict(), tmp_path / "b.pt")
    ts_path = tmp_path / "t.json"
    _toy_set().save(ts_path)
    args = ["mdtree", "diagnose", str(tmp_path / "a.pt"), "--arch", "digits-mlp", "--data", "digits?split=train",
            "--second-seed", str(tmp_path / "b.pt"), "--curve", "linear", "--hessian-samples", "50",
            "--max-samples", "300", "--threads", "1", "--thresholds", str(ts_path)]
    res = CliRunner().invoke(app, [*args, "--format", "json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["kind"] == "mdtree" and doc["summary"]["recommendation"]
    human = CliRunner().invoke(app, args)
    assert human.exit_code == 0 and "recommendation" in human.stdout
    # a second seed of another architecture: exit 2 with one line
    other = build_model("digits-mlp", hidden=32)
    torch.save(other.state_dict(), tmp_path / "c.pt")
    bad = CliRunner().invoke(app, [*args[:7], "--second-seed", str(tmp_path / "c.pt"), "--curve", "linear"])
    assert bad.exit_code == 2 and "architecture" in bad.output
    small = CliRunner().invoke(app, [*args, "--hessian-samples", "5000"])
    assert small.exit_code == 2 and "Hessian samples" in small.output


def test_nndiag_diagnose_runs_the_mdtree_probe(pair, data, tmp_path):
    import nndiag

    a, b = pair
    ts_path = tmp_path / "t.json"
    _toy_set().save(ts_path)
    rep = nndiag.diagnose(a, data=data, probes=["mdtree"])
    (run,) = rep.models[0].runs
    assert run.status == "skipped" and "second_seed" in run.message
    rep = nndiag.diagnose(a, data=data, probes=["mdtree"], second_seed=b,
                          options={"mdtree": {"curve": "linear", "threads": 1, "hessian_samples": 64,
                                              "thresholds": str(ts_path)}})
    (run,) = rep.models[0].runs
    assert run.status == "ok", run.message
    assert run.result.findings[0].code.startswith("MDT-") and run.result.summary["ran"]
