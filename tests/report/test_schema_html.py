"""The report's JSON schema and the self-contained HTML rendering."""

from __future__ import annotations

import copy
import json
import re

import pytest

import nndiag
from nndiag.report.html import extract_json, render_html
from nndiag.report.report import Report, ReportError, atomic_write
from nndiag.report.schema import schema_errors, validate_report
from tests.report import fakeprobes


@pytest.fixture
def report(monkeypatch):
    fakeprobes.install(monkeypatch, ["evaluation", "norms", "boom", "needsdata", "badfig"])
    return nndiag.diagnose(["digits-mlp", "digits-cnn"], data="digits?split=test",
                           options={"norms": {"limit": 4.0}}, n_samples=120)


def test_json_validates_and_broken_documents_do_not(report):
    doc = json.loads(report.to_json())
    assert schema_errors(doc) == []
    bad = copy.deepcopy(doc)
    bad["models"][0]["probes"][0]["status"] = "maybe"
    assert any("maybe" in e for e in schema_errors(bad))
    bad = copy.deepcopy(doc)
    run = next(r for r in bad["models"][0]["probes"] if r["status"] == "error")
    run["result"]["findings"] = []  # an error row must carry its PROBE-ERROR
    assert schema_errors(bad)
    bad = copy.deepcopy(doc)
    bad["findings"][0]["severity"] = "fatal"
    assert schema_errors(bad)
    with pytest.raises(ReportError, match="does not match its schema"):
        validate_report(bad)
    with pytest.raises(ReportError, match="not an nndiag report"):
        Report.from_dict({"kind": "something"})


def test_html_is_self_contained_and_embeds_the_report(report):
    page = render_html(report)
    # no network: no external references of any kind
    assert not re.search(r'(src|href)="(?!data:|#)', page)
    assert "<link" not in page and "@import" not in page and "url(" not in page
    # the embedded JSON is the report and re-renders the same page
    doc = json.loads(extract_json(page))
    assert doc == json.loads(report.to_json())
    assert render_html(Report.from_dict(doc)) == page
    # one section per model and per run, figures inline as PNG
    for m in report.models:
        assert f'data-model="{m.name}"' in page
        for r in m.runs:
            assert f'id="{m.name}-{r.probe}"'.lower() in page
    n_imgs = len(re.findall(r'<img src="data:image/png;base64,', page))
    assert n_imgs == 2 * (2 + 1)  # evaluation: 2 figures, norms: 1, per model
    assert page.count('class="figure-error"') == 2  # badfig, once per model, shown not hidden
    assert "RuntimeError: deliberate failure" in page
    assert "Models side by side" in page
    # each analysis heading carries its findings' worst severity, or why it did not finish
    for m in report.models:
        for r in m.runs:
            sid = f'id="{m.name}-{r.probe}"'.lower()
            heading = page[page.index(sid):].split("</h3>")[0] if r.status != "skipped" else ""
            if r.status == "ok":
                assert f'class="sev sev-{r.result.worst_severity()}"' in heading, (m.name, r.probe)
            elif r.status == "error":
                assert 'class="status status-error"' in heading
    assert any(r.status == "ok" and r.result.worst_severity() != "pass" for m in report.models for r in m.runs)


def test_text_is_escaped_and_json_cannot_close_the_script(monkeypatch):
    fakeprobes.install(monkeypatch, ["norms"])
    import torch

    class Evil(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 3)

    rep = nndiag.diagnose(Evil(), options={"norms": {"limit": 0.0}})
    rep.models[0].name = "</script><b>x</b>"
    page = render_html(rep)
    assert "<b>x</b>" not in page
    assert page.count("</script>") == 1
    assert Report.from_json(extract_json(page)).models[0].name == "</script><b>x</b>"


def test_load_from_html_and_json_files(report, tmp_path):
    report.save_json(tmp_path / "r.json")
    report.save_html(tmp_path / "r.html")
    a = Report.load(tmp_path / "r.json").to_dict()
    b = Report.load(tmp_path / "r.html").to_dict()
    assert a["models"] == b["models"] == report.to_dict()["models"]
    (tmp_path / "junk.html").write_text("<html></html>")
    with pytest.raises(ReportError, match="no embedded nndiag report"):
        Report.load(tmp_path / "junk.html")
    (tmp_path / "junk.json").write_text("{nope")
    with pytest.raises(ReportError, match="invalid JSON"):
        Report.load(tmp_path / "junk.json")
    with pytest.raises(ReportError, match="no such report"):
        Report.load(tmp_path / "absent.json")


def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "out.json"
    target.write_text("old")

    import os

    real_fsync = os.fsync

    def failing_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, "new")
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]
