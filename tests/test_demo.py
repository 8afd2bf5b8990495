"""``make demo`` end to end: train the digits CNNs, diagnose them, write the report."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from nndiag.io.data import load_data
from nndiag.models import build_model
from nndiag.report.schema import schema_errors
from tests.demo_run import demo_run
from tests.report.test_finding_codes import documented_codes


@pytest.fixture(scope="module")
def run():
    r = demo_run()
    assert r.exit_code == 0, r.stdout[-2000:]
    return r


def test_demo_writes_a_valid_complete_report(run):
    doc = json.loads((run.out / "report.json").read_text())
    assert schema_errors(doc) == []
    assert doc["complete"] is True
    assert [m["name"] for m in doc["models"]] == ["cnn_good", "cnn_bigbatch"]
    assert (run.out / "report.html").read_text().startswith("<!DOCTYPE html>")
    errors = [(m["name"], p["probe"], p["message"]) for m in doc["models"] for p in m["probes"]
              if p["status"] == "error"]
    assert not errors, errors  # every analysis that exists runs on the demo
    for m in doc["models"]:
        ran = {p["probe"] for p in m["probes"] if p["status"] == "ok"}
        assert {"evaluation", "spectral"} <= ran


def test_demo_accuracies_match_an_independent_evaluation(run):
    doc = json.loads((run.out / "report.json").read_text())
    test = load_data("digits?split=test")
    acc = {}
    for m in doc["models"]:
        net = build_model("digits-cnn")
        net.load_state_dict(torch.load(run.out / f"{m['name']}.pt", weights_only=True))
        with torch.no_grad():
            pred = net.eval()(test.x).argmax(1).numpy()
        acc[m["name"]] = float(np.mean(pred == test.y.numpy()))
        ev = next(p for p in m["probes"] if p["probe"] == "evaluation")
        assert ev["result"]["summary"]["accuracy"] == pytest.approx(acc[m["name"]], abs=1e-12)
    # the deliberately flawed sibling (batch 512, 16x fewer steps) is clearly worse
    assert acc["cnn_good"] > 0.95 and acc["cnn_good"] - acc["cnn_bigbatch"] > 0.05


def test_demo_prints_the_top_findings_and_documents_them(run):
    doc = json.loads((run.out / "report.json").read_text())
    warned = [f for f in doc["findings"] if f["severity"] != "pass"]
    if warned:
        assert "top findings" in run.stdout
        assert warned[0]["code"] in run.stdout
    else:
        assert "no warnings or failures" in run.stdout
    undocumented = {f["code"] for f in doc["findings"]} - documented_codes()
    assert not undocumented


def test_the_flawed_sibling_gives_the_diagnosis_something_to_find(run):
    doc = json.loads((run.out / "report.json").read_text())
    flawed = [f for f in doc["findings"] if f["model"] == "cnn_bigbatch" and f["severity"] in ("warn", "fail")
              and not f["code"].startswith("PROBE-")]
    assert flawed, "no analysis found anything wrong with the batch-512 model"
    assert all(f["recommendation"] for f in flawed)
