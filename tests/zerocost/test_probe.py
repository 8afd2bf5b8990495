"""The ``zerocost`` probe for ``nndiag diagnose`` and at-initialisation re-initialisation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nndiag._utils.model_state import same_snapshot, snapshot
from nndiag.errors import AnalysisError, InputError
from nndiag.io.data import load_data
from nndiag.io.models import load_model
from nndiag.report.probes import load_probe
from nndiag.zerocost.gradsign import gradsign
from nndiag.zerocost.rank import reinitialised


def test_probe_scores_a_reinitialised_copy_and_labels_it():
    probe = load_probe("zerocost")
    assert probe.NAME == "zerocost" and probe.NEEDS_DATA is True
    lm = load_model("digits-cnn")
    data = load_data("digits")
    with torch.no_grad():  # "trained" weights: the probe must ignore them
        for p in lm.module.parameters():
            p.mul_(3.0)
    before = snapshot(lm.module)
    res = probe.run(lm, data, seed=1, device="cpu", batch_size=32, proxies=["gradsign", "params"])
    assert same_snapshot(before, snapshot(lm.module))
    assert res.summary["at_initialisation"] is True
    assert [f.code for f in res.findings][0] == "ZC-AT-INIT"
    sub = data.subset(32, seed=1)
    expected = gradsign(reinitialised(lm.module, 1), sub.x, sub.y)
    assert res.summary["gradsign_at_init"] == expected
    assert expected != gradsign(lm.module, sub.x, sub.y)
    assert set(probe.figures(res)) == {"gradsign"}
    with pytest.raises(InputError, match="at least 2"):
        probe.run(lm, data.subset(1), seed=0, device="cpu")


def test_probe_flags_weights_that_never_get_a_gradient():
    class Dead(nn.Module):
        def __init__(self):
            super().__init__()
            self.live = nn.Linear(64, 10)
            self.dead = nn.Linear(64, 200)
            self.head = nn.Linear(200, 10)

        def forward(self, x):
            x = x.flatten(1)
            return self.live(x) + 0.0 * self.head(self.dead(x))

    probe = load_probe("zerocost")
    data = load_data("digits")
    res = probe.run(Dead(), data, seed=0, device="cpu", batch_size=16, proxies=["gradsign"])
    codes = {f.code: f for f in res.findings}
    assert "ZC-DEAD-WEIGHTS" in codes
    # the dead branch, plus the live weights on pixels that are 0 in every example of the batch
    blank = int((data.subset(16, seed=0).x.flatten(1) == 0).all(0).sum())
    frac = (64 * 200 + 200 * 10 + blank * 10) / (64 * 10 + 64 * 200 + 200 * 10)
    assert res.summary["dead_weight_fraction"] == pytest.approx(frac)


def test_reinitialised_is_seeded_and_leaves_rng_alone():
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    state = torch.random.get_rng_state()
    a, b = reinitialised(net, 7), reinitialised(net, 7)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(a[0].weight, reinitialised(net, 8)[0].weight)

    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(3))

    with pytest.raises(AnalysisError, match="reset_parameters"):
        reinitialised(Custom(), 0)


def test_reinitialised_draws_bare_position_tables_and_class_tokens():
    # a ViT's cls_token / pos_embed are bare parameters: truncated normal with the model's
    # initializer_range (0.02 by default); other bare parameters still cannot be re-drawn
    class ViTish(nn.Module):
        def __init__(self, config=None):
            super().__init__()
            self.config = config
            self.cls_token = nn.Parameter(torch.full((1, 1, 64), 5.0))
            self.pos_embed = nn.Parameter(torch.full((1, 500, 64), 5.0))
            self.fc = nn.Linear(64, 3)

    for config, std in ((None, 0.02), (type("Cfg", (), {"initializer_range": 0.1})(), 0.1)):
        net = reinitialised(ViTish(config), 0)
        pos = net.pos_embed.detach().double()
        assert pos.abs().max() <= 2 * std + 1e-7 and float(pos.std()) == pytest.approx(0.88 * std, rel=0.05)
        assert net.cls_token.abs().max() <= 2 * std + 1e-7
    bad = ViTish()
    bad.gamma = nn.Parameter(torch.ones(64))  # a layer scale: no rule for it
    with pytest.raises(AnalysisError, match="gamma"):
        reinitialised(bad, 0)


def test_diagnose_runs_the_zerocost_probe():
    import nndiag

    rep = nndiag.diagnose("digits-mlp", data="digits?split=test", probes=["zerocost"],
                          options={"zerocost": {"batch_size": 16, "proxies": "gradsign,synflow"}})
    run = rep.models[0].run("zerocost")
    assert run.status == "ok", run
    assert run.result.summary["at_initialisation"] is True
    assert run.result.summary["gradsign_at_init"] > 0
