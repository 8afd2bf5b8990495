"""EVAL-INPUT-SCALE: a model fed inputs in another scale than it was trained on."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nndiag._utils.seeding import fork_rng
from nndiag._utils.threads import limit_threads
from nndiag._utils.training import train_classifier
from nndiag.io.data import load_data, normalize_inputs
from nndiag.io.models import load_model
from nndiag.models import build_model
from nndiag.report import evaluation
from nndiag.report.input_scale import input_scale_finding
from tests.conftest import shared_asset


def _trained_on(spec: str) -> torch.nn.Module:
    with fork_rng(0):
        model = build_model("digits-mlp")
    train_classifier(model, load_data(spec), epochs=30, max_steps=400, lr=0.05, seed=0, progress=False)
    return model.eval()


def test_model_trained_on_standardised_digits_is_flagged_on_raw_ones():
    with limit_threads(1):
        model = _trained_on("digits?split=train&normalize=standard")
        before = {k: v.clone() for k, v in model.state_dict().items()}
        raw = load_data("digits?split=test")
        res = evaluation.run(load_model(model), raw)
        codes = [f.code for f in res.findings]
        assert codes == ["EVAL-INPUT-SCALE"]
        f = res.findings[0]
        assert f.evidence["normalize"] == "standard"
        # the evidence against an independent evaluation of the same first examples
        n = f.evidence["n_examples"]
        assert n == min(512, len(raw))
        x, y = raw.x[:n].float(), raw.y[:n]
        xs = (x - x.mean(0)) / x.std(0).clamp_min(1e-8)
        with torch.no_grad():
            for inputs, key in ((x, "as given"), (xs, "standard")):
                logits = model(inputs)
                loss = float(torch.nn.functional.cross_entropy(logits, y))
                acc = float((logits.argmax(1) == y).float().mean())
                assert f.evidence["scores"][key]["loss"] == pytest.approx(loss, rel=1e-5)
                assert f.evidence["scores"][key]["accuracy"] == pytest.approx(acc)
        assert f.evidence["scores"]["standard"]["accuracy"] > 0.8  # the model is good on its own scale
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and not model.training
        # normalised as in training: no finding (and the check does not run)
        res = evaluation.run(load_model(model), load_data("digits?split=test&normalize=standard"))
        assert res.findings == [] and "input_scale" not in res.tables


def test_model_trained_on_raw_digits_is_not_flagged():
    with limit_threads(1):
        model = _trained_on("digits?split=train")
        res = evaluation.run(load_model(model), load_data("digits?split=test"))
    assert res.findings == []
    scores = res.tables["input_scale"].set_index("name")
    assert set(scores.index) == {"as given", "standard"}  # 1-channel inputs: no dataset statistics
    assert scores.loc["as given", "accuracy"] > 0.8


def test_no_check_for_inputs_outside_unit_range_or_integer_ids():
    model = torch.nn.Linear(3, 2)
    y = torch.tensor([0, 1, 0, 1])
    assert input_scale_finding(model, torch.randn(4, 3) * 3, y, normalize="none") == (None, {})
    assert input_scale_finding(model, torch.rand(4, 3), y, normalize="standard") == (None, {})
    assert input_scale_finding(model, torch.randint(0, 3, (4, 3)), y, normalize=None) == (None, {})


def test_normalize_inputs_matches_the_data_option():
    x = torch.rand(6, 3, 4, 4)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(normalize_inputs(x, "imagenet"), (x - mean) / std)
    torch.testing.assert_close(normalize_inputs(x, "inception"), 2 * x - 1)  # [0, 1] to [-1, 1]
    clip_mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)  # OpenAI CLIP's preprocessing
    clip_std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    torch.testing.assert_close(normalize_inputs(x, "clip"), (x - clip_mean) / clip_std)
    with pytest.raises(Exception, match="3-channel"):
        normalize_inputs(torch.rand(6, 1, 4, 4), "cifar")


def test_shared_resnet20_on_raw_cifar_pixels_is_flagged():
    ckpt = shared_asset("models", "cifar10_resnet20.th")
    data_path = shared_asset("data", "cifar10_test_5k.npz")
    with limit_threads(2):
        model = load_model(str(ckpt), arch="resnet20")
        raw = load_data(str(data_path), n_samples=256)
        res = evaluation.run(model, raw)
        assert [f.code for f in res.findings] == ["EVAL-INPUT-SCALE"]
        s = res.findings[0].evidence["scores"]
        # ../shared/ASSETS.md: 27–34 % without normalisation, ~81 % with ImageNet's or CIFAR's statistics
        assert s["as given"]["accuracy"] < 0.4
        assert res.findings[0].evidence["normalize"] in ("imagenet", "cifar")
        assert max(s["imagenet"]["accuracy"], s["cifar"]["accuracy"]) > 0.7
        res = evaluation.run(model, load_data(f"{data_path}?normalize=imagenet", n_samples=256))
    assert res.findings == [] and np.isclose(res.summary["accuracy"], s["imagenet"]["accuracy"], atol=0.1)


def test_hessian_and_landscape_commands_analyse_the_rescaled_inputs_or_warn(tmp_path):
    # the check runs before the analysis: by default (--inputs auto) the analysis reads the data
    # rescaled as the finding says, with the same numbers as the data given that way; with
    # --inputs as-given the raw data are analysed and the finding only warns
    import json

    from typer.testing import CliRunner

    from nndiag.cli.app import app

    with limit_threads(1):
        model = _trained_on("digits?split=train&normalize=standard")
    path = tmp_path / "mlp.pt"
    torch.save(model.state_dict(), path)
    # (all of digits: 'standard' normalisation uses the statistics of the data at hand, which the
    # DATA option takes before a subset is drawn and the check after)
    base = [str(path), "--arch", "digits-mlp", "--format", "json"]

    def run(cmd: list[str], *extra: str) -> dict:
        out = CliRunner().invoke(app, [*cmd, *extra])
        assert out.exit_code == 0, out.output
        return json.loads(out.stdout)

    for cmd, value in ((["hessian", *base, "--top-k", "2"], lambda d: d["eigenvalues"][0]),
                       (["landscape", *base, "--steps", "3", "--dim", "1"], lambda d: d["summary"]["max_loss"])):
        auto = run(cmd, "--data", "digits")
        given = run(cmd, "--data", "digits", "--inputs", "as-given")
        fixed = run(cmd, "--data", "digits?normalize=standard")
        f_auto, f_given = auto["findings"][0], given["findings"][0]
        assert f_auto["code"] == f_given["code"] == "EVAL-INPUT-SCALE", cmd[0]
        assert f_auto["evidence"]["applied"] is True
        assert "the analysis ran on the inputs normalised" in f_auto["message"]
        assert "applied" not in f_given["evidence"]
        assert "EVAL-INPUT-SCALE" not in [f["code"] for f in fixed["findings"]]
        assert auto["params"]["inputs"] == "auto" and given["params"]["inputs"] == "as-given"
        assert value(auto) == pytest.approx(value(fixed), rel=1e-5), cmd[0]
        assert abs(value(given) - value(fixed)) > 0.1 * abs(value(fixed)), cmd[0]
    bad = CliRunner().invoke(app, ["hessian", *base, "--data", "digits", "--inputs", "normalised"])
    assert bad.exit_code != 0 and "unknown inputs 'normalised'" in bad.output


def test_check_says_nothing_for_outputs_that_are_not_class_logits():
    from nndiag.report.input_scale import prepared

    data = load_data("digits", n_samples=64)
    seg = torch.nn.Conv2d(1, 10, 3, padding=1)  # (N, 10, 8, 8): not (N, classes)
    assert prepared(seg, data) == (data, None)
    head = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))
    assert prepared(head, data) == (data, None)  # labels ≥ 3


def test_pixel_values_stored_as_floats_are_recognised():
    from dataclasses import replace

    with limit_threads(1):
        model = _trained_on("digits?split=train")  # trained on [0, 1] pixels
        raw = load_data("digits?split=test")
        pixels = torch.round(raw.x * 255)  # 0–255 whole numbers, stored as float32
        res = evaluation.run(load_model(model), replace(raw, x=pixels))
    f = res.findings[0]
    assert f.code == "EVAL-INPUT-SCALE" and f.evidence["divide_by_255"] and f.evidence["normalize"] == "none"
    assert "divided by 255" in f.message and "uint8" in f.recommendation
    s = f.evidence["scores"]
    assert set(s) == {"as given", "/255", "standard"}
    n = f.evidence["n_examples"]
    with torch.no_grad():  # the /255 score is the model on the pixels divided by 255
        logits = model(pixels[:n] / 255)
    assert s["/255"]["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, raw.y[:n])), rel=1e-5)
    assert s["/255"]["accuracy"] > 0.8
    # the ReLU network keeps most decisions on 0–255 inputs: flagged by the tenfold loss alone
    assert s["as given"]["accuracy"] > s["/255"]["accuracy"] - 0.1 and s["/255"]["loss"] < 0.1 * s["as given"]["loss"]
    # not whole numbers, or beyond 255: nothing is suggested
    assert input_scale_finding(model, pixels + 0.5, raw.y, normalize=None) == (None, {})
    assert input_scale_finding(model, pixels * 2, raw.y, normalize=None) == (None, {})


def _colour_task(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """3-channel 8×8 images in [0, 1] whose class is the colour of a bright patch (R, G or B)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = 0.3 * torch.rand(n, 3, 8, 8, generator=g)
    for i in range(n):
        r, c = torch.randint(0, 5, (2,), generator=g).tolist()
        x[i, y[i], r:r + 3, c:c + 3] += 0.6
    return x, y


def test_images_in_the_other_channel_order_are_flagged_and_the_bgr_option_fixes_them(tmp_path):
    from nndiag.io.data import reverse_channels

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 3))
    x, y = _colour_task(600, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(150):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    xt, yt = _colour_task(300, seed=2)
    bgr = reverse_channels(xt)  # what OpenCV would have loaded
    with torch.no_grad():
        acc_rgb = float((model(xt).argmax(1) == yt).float().mean())
        acc_bgr = float((model(bgr).argmax(1) == yt).float().mean())
    assert acc_rgb > 0.95 and acc_bgr < 0.7  # red and blue patches swap classes
    f, scores = input_scale_finding(model, bgr, yt, normalize="none")
    assert f is not None and f.code == "EVAL-INPUT-SCALE" and f.evidence["bgr"] is True
    assert f.evidence["normalize"] == "none" and "DATA?bgr=1" in f.recommendation
    assert scores["bgr"][1] == pytest.approx(acc_rgb) and scores["as given"][1] == pytest.approx(acc_bgr)
    assert input_scale_finding(model, xt, yt, normalize="none")[0] is None  # RGB as trained: nothing
    # the data option does what the finding says
    np.savez(tmp_path / "bgr.npz", x=(bgr.numpy() * 255).round().astype(np.uint8).transpose(0, 2, 3, 1),
             y=yt.numpy())
    fixed = load_data(f"{tmp_path / 'bgr.npz'}?bgr=1")
    with torch.no_grad():
        assert float((model(fixed.x).argmax(1) == yt).float().mean()) == pytest.approx(acc_rgb, abs=0.02)
    with pytest.raises(Exception, match="3-channel"):
        load_data("digits?bgr=1")


def test_diagnose_runs_every_analysis_on_the_rescaled_inputs_and_says_so():
    import nndiag
    from nndiag.errors import InputError

    with limit_threads(1):
        model = _trained_on("digits?split=train&normalize=standard")
        before = {k: v.clone() for k, v in model.state_dict().items()}
        opts = {"hessian": {"n_samples": 64, "top_k": 2}}
        auto = nndiag.diagnose(model, data="digits?split=test", probes="evaluation,hessian", options=opts)
        # the reference: the data given as the finding recommends, analysed as given
        fixed = nndiag.diagnose(model, data="digits?split=test&normalize=standard", probes="evaluation,hessian",
                                options=opts)
        raw = nndiag.diagnose(model, data="digits?split=test", probes="evaluation,hessian", options=opts,
                              inputs="as-given")
        # without the evaluation the finding goes with the first analysis that read the data
        alone = nndiag.diagnose(model, data="digits?split=test", probes="hessian", options=opts)
        with pytest.raises(InputError, match="unknown inputs"):
            nndiag.diagnose(model, data="digits?split=test", probes="evaluation", inputs="normalised")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    m = auto.models[0]
    assert m.info["inputs"] == "normalised as 'standard'" and "inputs" not in raw.models[0].info
    ev = m.result("evaluation")
    assert [f.code for f in ev.findings] == ["EVAL-INPUT-SCALE"]
    f = ev.findings[0]
    assert f.evidence["applied"] is True and "every analysis of this report ran on the inputs" in f.message
    # evaluation and Hessian equal the runs on the data normalised by the DATA option
    for key in ("accuracy", "loss"):
        assert ev.summary[key] == pytest.approx(fixed.models[0].result("evaluation").summary[key], rel=1e-6)
    top = m.result("hessian").summary["eigenvalues"][0]
    assert top == pytest.approx(fixed.models[0].result("hessian").summary["eigenvalues"][0], rel=1e-4)
    assert fixed.models[0].result("evaluation").findings == []
    # as given: the same finding, not applied, and the analyses on the raw inputs
    r = raw.models[0]
    got = [(g.code, g.evidence.get("applied")) for g in r.result("evaluation").findings]
    assert got == [("EVAL-INPUT-SCALE", None)]
    assert r.result("evaluation").summary["accuracy"] == pytest.approx(f.evidence["scores"]["as given"]["accuracy"])
    assert ev.summary["accuracy"] > r.result("evaluation").summary["accuracy"] + 0.1
    assert abs(r.result("hessian").summary["eigenvalues"][0] - top) > 0.1 * top
    assert auto.options["inputs"] == "auto" and raw.options["inputs"] == "as-given"
    hess = alone.models[0].result("hessian")
    assert [g.code for g in hess.findings][0] == "EVAL-INPUT-SCALE" and hess.findings[0].evidence["applied"]
    assert hess.summary["eigenvalues"][0] == pytest.approx(top, rel=1e-4)


def test_rescale_divides_reverses_and_normalises_in_that_order():
    from nndiag.io.data import DataBundle
    from nndiag.report.input_scale import rescale
    from nndiag.report.results import Finding

    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (4, 3, 2, 2), generator=gen).float()
    b = DataBundle(x, torch.arange(4), "pixels.npz", 4, {"normalize": "none"})
    f = Finding("EVAL-INPUT-SCALE", "warn", "m", {"normalize": "imagenet", "divide_by_255": True, "bgr": True})
    out = rescale(b, f)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    ref = (x[:, [2, 1, 0]] / 255.0 - mean) / std
    assert torch.allclose(out.x, ref, atol=1e-6)
    assert out.name == "pixels.npz?normalize=imagenet&bgr=1" and out.meta["normalize"] == "imagenet"
    assert out.meta["rescaled"] == {"divide_by_255": True, "normalize": "imagenet", "bgr": True}
    assert b.meta == {"normalize": "none"} and torch.equal(b.x, x)  # the given bundle unchanged


def test_diagnose_checks_the_training_data_on_their_own():
    import nndiag

    with limit_threads(1):
        model = _trained_on("digits?split=train&normalize=standard")
        opts = {"hessian": {"n_samples": 64, "top_k": 1}}
        good = "digits?split=test&normalize=standard"
        rep = nndiag.diagnose(model, data=good, train_data="digits?split=train", probes="evaluation,hessian",
                              options=opts)
        ref = nndiag.diagnose(model, data=good, train_data="digits?split=train&normalize=standard",
                              probes="evaluation,hessian", options=opts)
    m = rep.models[0]
    assert m.info["inputs"] == "digits?split=train: normalised as 'standard'"
    assert m.result("evaluation").findings == []  # its data were fine
    hess = m.result("hessian")
    assert hess.findings[0].code == "EVAL-INPUT-SCALE" and hess.findings[0].evidence["applied"]
    assert "digits?split=train" in hess.findings[0].message
    assert hess.summary["eigenvalues"][0] == pytest.approx(
        ref.models[0].result("hessian").summary["eigenvalues"][0], rel=1e-4)
