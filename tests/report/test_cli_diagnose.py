"""``nndiag diagnose`` and ``nndiag report`` through typer's CliRunner."""

from __future__ import annotations

import json

import torch
from typer.testing import CliRunner

from nndiag.cli.app import app
from nndiag.models import build_model
from nndiag.report.report import Report
from nndiag.report.schema import schema_errors
from tests.report import fakeprobes

runner = CliRunner()


def _run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def _ckpt(tmp_path, seed=0, name="m.pt"):
    torch.manual_seed(seed)
    p = tmp_path / name
    torch.save(build_model("digits-mlp").state_dict(), p)
    return p


def test_diagnose_writes_html_and_json_even_when_a_probe_fails(monkeypatch, tmp_path):
    fakeprobes.install(monkeypatch, ["evaluation", "norms", "boom"])
    ck = _ckpt(tmp_path)
    out = tmp_path / "sub" / "r.html"
    js = tmp_path / "r.json"
    r = _run("diagnose", ck, "--arch", "digits-mlp", "--data", "digits?split=test", "--n-samples", "64",
             "--html", out, "--json", js)
    assert r.exit_code == 0, r.output
    doc = json.loads(js.read_text())
    assert schema_errors(doc) == [] and doc["complete"] is True
    statuses = {p["probe"]: p["status"] for p in doc["models"][0]["probes"]}
    assert statuses == {"evaluation": "ok", "norms": "ok", "boom": "error"}
    assert out.read_text().startswith("<!DOCTYPE html>")
    assert "PROBE-ERROR" in r.stdout  # the top findings printed
    assert not list(tmp_path.glob(".*.tmp"))


def test_fail_on_and_format_json(monkeypatch, tmp_path):
    fakeprobes.install(monkeypatch, ["norms"])
    r = _run("diagnose", "digits-mlp", "--format", "json")
    assert r.exit_code == 0
    doc = json.loads(r.stdout)
    assert doc["kind"] == "nndiag-report" and schema_errors(doc) == []
    # norms warns above a limit: --fail-on warn turns the warning into exit 1
    monkeypatch.setattr(fakeprobes._norms_run, "__kwdefaults__", {"limit": 0.0})
    r = _run("diagnose", "digits-mlp", "--fail-on", "warn")
    assert r.exit_code == 1, r.output
    r = _run("diagnose", "digits-mlp", "--fail-on", "fail")
    assert r.exit_code == 0, r.output


def test_bad_input_exits_2_with_one_line_before_any_work(monkeypatch, tmp_path):
    fakeprobes.install(monkeypatch, ["norms"])
    r = _run("diagnose", "digits-mlp", "--probes", "nope")
    assert r.exit_code == 2 and "unknown probe(s) nope" in r.output
    assert len(r.output.strip().splitlines()) == 1
    r = _run("diagnose", "no_such_model.pt")
    assert r.exit_code == 2 and "no_such_model.pt" in r.output
    (tmp_path / "adir").mkdir()
    r = _run("diagnose", "digits-mlp", "--html", tmp_path / "adir")
    assert r.exit_code == 2 and "is a folder" in r.output
    r = _run("diagnose", "digits-mlp", "digits-cnn", "--arch", "a", "--arch", "b", "--arch", "c")
    assert r.exit_code == 2 and "3 --arch values for 2 models" in r.output
    r = _run("report", tmp_path / "absent.json", "--html", tmp_path / "x.html")
    assert r.exit_code == 2 and "no such report file" in r.output


def test_interrupt_still_writes_what_finished(monkeypatch, tmp_path):
    fakeprobes.install(monkeypatch, ["norms", "interrupt", "boom"])
    js, html = tmp_path / "r.json", tmp_path / "r.html"
    r = _run("diagnose", "digits-mlp", "--json", js, "--html", html)
    assert r.exit_code == 130
    doc = json.loads(js.read_text())
    assert doc["complete"] is False and [p["probe"] for p in doc["models"][0]["probes"]] == ["norms"]
    assert "incomplete" in html.read_text()


def test_report_rerenders_without_recomputing(monkeypatch, tmp_path):
    fakeprobes.install(monkeypatch, ["norms", "needsdata"])
    js = tmp_path / "r.json"
    assert _run("diagnose", "digits-mlp", "--json", js).exit_code == 0

    def no_run(*a, **k):  # re-rendering must never call an analysis
        raise AssertionError("recomputed")

    monkeypatch.setattr("tests.report.fakeprobes._norms_run", no_run)
    import sys

    monkeypatch.setattr(sys.modules["tests.report.fakeprobes.norms"], "run", no_run)
    out = tmp_path / "again.html"
    r = _run("report", js, "--html", out, "--json", tmp_path / "copy.json")
    assert r.exit_code == 0, r.output
    assert "norm per layer" in out.read_text()
    again = tmp_path / "again2.html"
    assert _run("report", out, "--html", again).exit_code == 0  # from the HTML's embedded JSON
    assert Report.load(again).to_dict()["models"] == json.loads(js.read_text())["models"]


def test_several_models_side_by_side(monkeypatch, tmp_path):
    fakeprobes.install(monkeypatch, ["evaluation", "norms"])
    cks = [_ckpt(tmp_path, s, f"m{s}.pt") for s in range(3)]
    r = _run("diagnose", *cks, "--arch", "digits-mlp", "--data", "digits?split=test", "--n-samples", "100",
             "--format", "json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert [m["name"] for m in doc["models"]] == ["m0", "m1", "m2"]
    rows = {c["name"]: c for c in doc["comparison"]}
    assert set(rows) >= {"evaluation.accuracy", "norms.max_norm"}
    assert all(isinstance(rows["norms.max_norm"][n], float) for n in ("m0", "m1", "m2"))


def test_options_and_train_data_reach_the_right_probes(monkeypatch, tmp_path):
    fakeprobes.install(monkeypatch, ["norms", "needsdata", "trainside"])
    r = _run("diagnose", "digits-mlp", "--data", "digits?split=test", "--train-data", "digits?split=train",
             "-o", "norms.limit=0", "-o", "needsdata.note=hello world", "--format", "json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    runs = {p["probe"]: p["result"] for p in doc["models"][0]["probes"]}
    assert runs["norms"]["params"]["limit"] == 0  # JSON value
    assert runs["norms"]["findings"] and runs["norms"]["findings"][0]["code"] == "TEST-NORM-HIGH"
    from nndiag.io.data import load_data

    n_test, n_train = len(load_data("digits?split=test")), len(load_data("digits?split=train"))
    assert n_test != n_train
    assert runs["needsdata"]["summary"]["n"] == n_test
    assert runs["trainside"]["summary"]["n"] == n_train  # the training split, for probes that read it
    assert doc["data"]["train"] == {"name": "digits?split=train", "n_samples": n_train}
    r = _run("diagnose", "digits-mlp", "-o", "limit=3")
    assert r.exit_code == 2 and "PROBE.KEY=VALUE" in r.output
    r = _run("diagnose", "digits-mlp", "-o", "nope.limit=3")
    assert r.exit_code == 2 and "unknown probe" in r.output


def test_inputs_option_rescales_or_keeps_the_data(tmp_path):
    from nndiag._utils.seeding import fork_rng
    from nndiag._utils.threads import limit_threads
    from nndiag._utils.training import train_classifier
    from nndiag.io.data import load_data

    with limit_threads(1), fork_rng(0):
        model = build_model("digits-mlp")
        train_classifier(model, load_data("digits?split=train&normalize=standard"), epochs=30, max_steps=400,
                         lr=0.05, seed=0, progress=False)
    ck = tmp_path / "std.pt"
    torch.save(model.state_dict(), ck)
    base = ["diagnose", ck, "--arch", "digits-mlp", "--data", "digits?split=test", "--probes", "evaluation",
            "--format", "json"]
    docs = {}
    for how in ("auto", "as-given"):
        r = _run(*base, "--inputs", how)
        assert r.exit_code == 0, r.output
        docs[how] = json.loads(r.stdout)
        assert schema_errors(docs[how]) == []
    auto, given = (docs[h]["models"][0] for h in ("auto", "as-given"))
    assert auto["info"]["inputs"] == "normalised as 'standard'" and "inputs" not in given["info"]
    f_auto, f_given = (m["probes"][0]["result"]["findings"][0] for m in (auto, given))
    assert f_auto["code"] == f_given["code"] == "EVAL-INPUT-SCALE"
    assert f_auto["evidence"]["applied"] is True and "applied" not in f_given["evidence"]
    acc = {h: docs[h]["models"][0]["probes"][0]["result"]["summary"]["accuracy"] for h in docs}
    assert acc["auto"] == f_auto["evidence"]["scores"]["standard"]["accuracy"]  # all 449 examples checked
    assert acc["as-given"] == f_given["evidence"]["scores"]["as given"]["accuracy"]
    bad = _run(*base, "--inputs", "scaled")
    assert bad.exit_code == 2 and "--inputs scaled: choose one of auto, as-given" in bad.output
