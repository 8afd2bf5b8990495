"""``nndiag.diagnose``: orchestration, error rows, leaving the model alone, evaluation values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import nndiag
from nndiag._utils.model_state import same_snapshot, snapshot
from nndiag.errors import InputError, NNDiagError
from nndiag.io.data import load_data
from nndiag.models import build_model
from nndiag.report.report import Report
from nndiag.report.schema import schema_errors
from tests.report import fakeprobes


@pytest.fixture(scope="module")
def digits_test():
    return load_data("digits?split=test", n_samples=200)


def _mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("digits-mlp")


def test_failing_probe_becomes_error_row_and_the_rest_still_run(monkeypatch, digits_test):
    fakeprobes.install(monkeypatch, ["norms", "boom", "needsdata", "missing", "evaluation"])
    rep = nndiag.diagnose(_mlp(), data=digits_test)
    runs = {r.probe: r for r in rep.models[0].runs}
    assert [r.probe for r in rep.models[0].runs] == ["norms", "boom", "needsdata", "missing", "evaluation"]
    assert runs["norms"].status == "ok" and runs["needsdata"].status == "ok"
    assert runs["evaluation"].status == "ok"
    boom = runs["boom"]
    assert boom.status == "error"
    assert boom.message == "RuntimeError: deliberate failure"  # one line
    assert [f.code for f in boom.findings] == ["PROBE-ERROR"] and boom.findings[0].severity == "error"
    assert runs["missing"].status == "skipped"  # not asked for by name: skipped, not an error
    assert rep.worst_severity() == "error"
    assert rep.complete
    assert schema_errors(rep.to_dict()) == []


def test_named_probes_that_cannot_run_are_errors_and_unnamed_ones_skip(monkeypatch):
    fakeprobes.install(monkeypatch, ["norms", "needsdata", "missing", "needsseed"])
    rep = nndiag.diagnose(_mlp(), probes="missing,needsdata,needsseed")
    runs = {r.probe: r for r in rep.models[0].runs}
    assert list(runs) == ["missing", "needsdata", "needsseed"]
    assert runs["missing"].status == "error"  # named but not built
    assert runs["needsdata"].status == "skipped" and "data" in runs["needsdata"].message
    assert runs["needsseed"].status == "skipped" and "second_seed" in runs["needsseed"].message
    assert "--second-seed" in runs["needsseed"].findings[0].recommendation
    assert all(f.code == "PROBE-SKIPPED" for f in runs["needsdata"].findings)


def test_second_seed_reaches_the_probe_that_asks_for_it(monkeypatch):
    fakeprobes.install(monkeypatch, ["needsseed", "norms"])
    rep = nndiag.diagnose(["digits-mlp", "digits-cnn"], second_seed=["digits-mlp", "digits-cnn"])
    assert [m.result("needsseed").summary["second"] for m in rep.models] == ["digits-mlp", "digits-cnn"]
    # shared inputs go only to probes that name them, never through a probe's **options
    assert rep.models[0].result("norms").params["extra"] == []
    with pytest.raises(InputError, match="one per model"):
        nndiag.diagnose(["digits-mlp", "digits-cnn"], second_seed=["digits-mlp"])


def test_bad_input_is_one_clear_error(monkeypatch):
    fakeprobes.install(monkeypatch, ["norms"])
    with pytest.raises(InputError, match="unknown probe.*choose from norms"):
        nndiag.diagnose("digits-mlp", probes="nope")
    with pytest.raises(NNDiagError, match="nope.npz"):
        nndiag.diagnose("digits-mlp", data="nope.npz")
    with pytest.raises(InputError, match="unknown probe"):
        nndiag.diagnose("digits-mlp", options={"nope": {}})


def test_model_left_exactly_as_it_was(monkeypatch, digits_test):
    fakeprobes.install(monkeypatch, ["evaluation", "norms", "boom"])
    model = _mlp()
    model.train()
    model.net[1].weight.requires_grad_(False)
    model(digits_test.x[:4]).sum().backward()
    handle = model.register_forward_hook(lambda *a: None)
    before = snapshot(model)
    nndiag.diagnose(model, data=digits_test)
    assert same_snapshot(before, snapshot(model))
    handle.remove()


def test_norms_probe_values_match_numpy(monkeypatch):
    # the orchestration passes the user's tensors through untouched
    fakeprobes.install(monkeypatch, ["norms"])
    model = _mlp(3)
    rep = nndiag.diagnose(model, options={"norms": {"limit": 5.0}})
    df = rep.models[0].result("norms").tables["norms"]
    ref = {n: np.linalg.norm(p.detach().double().numpy()) for n, p in model.named_parameters() if p.ndim >= 2}
    assert dict(zip(df["name"], df["frobenius"], strict=True)) == pytest.approx(ref, rel=1e-12)
    assert rep.models[0].result("norms").params["limit"] == 5.0


def test_evaluation_matches_an_independent_computation(digits_test):
    from sklearn.metrics import confusion_matrix

    model = _mlp(1)
    rep = nndiag.diagnose(model, data=digits_test, probes=["evaluation"])
    res = rep.models[0].result("evaluation")
    with torch.no_grad():
        logits = model.eval()(digits_test.x).double()
    y = digits_test.y.numpy()
    pred = logits.argmax(1).numpy()
    nll = torch.nn.functional.cross_entropy(logits, digits_test.y, reduction="none").numpy()
    assert res.summary["accuracy"] == pytest.approx((pred == y).mean(), abs=1e-12)
    assert res.summary["loss"] == pytest.approx(nll.mean(), rel=1e-5)
    cm = res.tables["confusion"].drop(columns="name").to_numpy()
    np.testing.assert_array_equal(cm, confusion_matrix(y, pred, labels=range(10)))
    pc = res.tables["per_class"]
    for k in range(10):
        assert pc["accuracy"][k] == pytest.approx((pred[y == k] == k).mean())
    # digits' one-character class names stand level under the bars; CIFAR-10's would overlap
    from nndiag.report.evaluation import figures

    def rotations(r):
        figs = figures(r)
        return [figs[k].axes[0].get_xticklabels()[0].get_rotation() for k in ("per_class_accuracy", "confusion")]

    assert rotations(res) == [0, 0]
    cifar = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    res.tables["per_class"]["name"] = cifar
    res.tables["confusion"]["name"] = cifar
    assert rotations(res) == [45, 45]


def test_chance_level_accuracy_is_a_finding(digits_test):
    from nndiag._utils.training import train_classifier
    from nndiag.report.evaluation import chance_finding

    untrained, trained = _mlp(1), _mlp(1)
    train_classifier(trained, load_data("digits?split=train"), epochs=100, max_steps=300, lr=0.05, seed=0,
                     progress=False)
    codes = {}
    for name, model in (("untrained", untrained), ("trained", trained)):
        res = nndiag.diagnose(model, data=digits_test, probes=["evaluation"]).models[0].result("evaluation")
        codes[name] = ([f for f in res.findings if f.code == "EVAL-CHANCE"], res.summary["accuracy"])
    (found, acc), (none, trained_acc) = codes["untrained"], codes["trained"]
    share = np.bincount(digits_test.y.numpy()).max() / len(digits_test)
    assert acc <= share + 0.07 and len(found) == 1 and found[0].severity == "fail"
    assert found[0].evidence["majority_share"] == pytest.approx(share)
    assert trained_acc > 0.8 and none == []
    # the margin: two binomial standard errors of the majority share, at least 2 points
    y = np.array([0] * 50 + [1] * 50)
    assert chance_finding(0.5 + 0.099, y, what="class", name="d") is not None  # 2·sqrt(.25/100) = 0.1
    assert chance_finding(0.5 + 0.101, y, what="class", name="d") is None


def test_evaluation_and_hessian_probes_on_token_ids():
    from tests.landscape._dense import tiny_embedding, token_data

    x, y = token_data()
    model = tiny_embedding()
    rep = nndiag.diagnose(model, data=(x, y), probes=["evaluation", "hessian"])
    runs = {r.probe: r for r in rep.models[0].runs}
    assert {k: r.status for k, r in runs.items()} == {"evaluation": "ok", "hessian": "ok"}
    with torch.no_grad():
        logits = model.eval()(x)
    res = rep.models[0].result("evaluation")
    assert res.summary["accuracy"] == pytest.approx(float((logits.argmax(1) == y).double().mean()), abs=1e-12)
    assert res.summary["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, y)), rel=1e-5)


def test_comparison_spearman_matches_scipy(monkeypatch, digits_test):
    from scipy.stats import spearmanr

    fakeprobes.install(monkeypatch, ["evaluation", "norms"])
    models = [_mlp(s) for s in range(4)]
    for i, m in enumerate(models):  # make accuracies differ
        with torch.no_grad():
            m.net[-1].weight.mul_(1 + i)
    rep = nndiag.diagnose(models, data=digits_test)
    assert [m.name for m in rep.models] == ["MLP", "MLP#2", "MLP#3", "MLP#4"]
    cmp = rep.comparison().set_index("name")
    acc = [m.result("evaluation").summary["accuracy"] for m in rep.models]
    norms = [m.result("norms").summary["max_norm"] for m in rep.models]
    rho = cmp.loc["norms.max_norm", "rho_accuracy"]
    assert len(set(acc)) > 1
    assert rho == pytest.approx(spearmanr(norms, acc).statistic)
    ranking = cmp.loc["norms.max_norm", "ranking"].split(" < ")
    assert ranking == [rep.models[i].name for i in np.argsort(norms, kind="stable")]
    assert "evaluation.n_samples" not in cmp.index  # identical for every model: not a comparison


def test_report_roundtrip_and_on_update(monkeypatch, digits_test):
    fakeprobes.install(monkeypatch, ["norms", "boom", "evaluation"])
    seen = []
    rep = nndiag.diagnose(_mlp(), data=digits_test, on_update=lambda r: seen.append(len(r.models[0].runs)))
    assert seen == [1, 2, 3]
    doc = rep.to_dict()
    back = Report.from_dict(doc)
    assert back.to_dict()["models"] == doc["models"]
    assert back.findings() == rep.findings()
    assert Report.from_json(rep.to_json()).to_json() == rep.to_json()


def test_report_says_which_checkpoint_tensors_were_not_loaded(monkeypatch, tmp_path):
    """A Lightning checkpoint with its loss module's tensors: the model's keys load, the report
    says what was left."""
    fakeprobes.install(monkeypatch, ["norms"])
    model = _mlp()
    sd = model.state_dict()
    torch.save({"state_dict": {**{f"model.{k}": v for k, v in sd.items()},
                               "criterion.weight": torch.ones(10), "criterion.pos": torch.zeros(3)}},
               tmp_path / "last.ckpt")
    rep = nndiag.diagnose(str(tmp_path / "last.ckpt"), arch="digits-mlp")
    info = rep.models[0].info
    assert info["keys_left_out"] == "2 checkpoint tensors not loaded, e.g. criterion.weight"
    assert schema_errors(rep.to_dict()) == []
    plain = tmp_path / "plain.pt"
    torch.save(sd, plain)
    assert "keys_left_out" not in nndiag.diagnose(str(plain), arch="digits-mlp").models[0].info


def test_a_model_returning_a_dict_is_read_by_its_logits(digits_test):
    from nndiag._utils.training import evaluate

    class DictOut(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return {"logits": self.inner(x), "features": x}

    plain = _mlp(3)
    wrapped = DictOut(_mlp(3))
    probes = ["evaluation", "slices"]
    got = {r.probe: r for r in nndiag.diagnose(wrapped, data=digits_test, probes=probes).models[0].runs}
    ref = {r.probe: r for r in nndiag.diagnose(plain, data=digits_test, probes=probes).models[0].runs}
    for name in probes:
        assert got[name].status == ref[name].status == "ok", (name, got[name].message)
    a, b = got["evaluation"].result.summary, ref["evaluation"].result.summary
    assert a["accuracy"] == b["accuracy"] and a["loss"] == pytest.approx(b["loss"], rel=1e-12)
    assert evaluate(wrapped, digits_test) == evaluate(plain, digits_test)
    assert got["slices"].result.summary["mean_loss"] == pytest.approx(ref["slices"].result.summary["mean_loss"])


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_models_in_other_float_dtypes_get_inputs_of_their_dtype(digits_test, dtype):
    model = _mlp(4).to(dtype)
    rep = nndiag.diagnose(model, data=digits_test, probes=["evaluation", "slices"])
    runs = {r.probe: r for r in rep.models[0].runs}
    assert runs["evaluation"].status == runs["slices"].status == "ok", runs["evaluation"].message
    with torch.no_grad():
        pred = model.eval()(digits_test.x.to(dtype)).argmax(1)
    accuracy = float((pred == digits_test.y).double().mean())
    assert runs["evaluation"].result.summary["accuracy"] == pytest.approx(accuracy)
    assert all(p.dtype == dtype for p in model.parameters())  # the model is left in its dtype
