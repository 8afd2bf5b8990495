"""Evaluation harness: correlations, vote, failure rows, resumable cache, CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats
from typer.testing import CliRunner

from nndiag.errors import InputError
from nndiag.zerocost.evaluate import correlations, evaluate, rank_vote, score_archs
from nndiag.zerocost.nb201 import sample_archs

A = "|nor_conv_3x3~0|+|nor_conv_1x1~0|skip_connect~1|+|avg_pool_3x3~0|none~1|nor_conv_3x3~2|"
B = "|skip_connect~0|+|none~0|none~1|+|nor_conv_1x1~0|none~1|none~2|"
C = "|none~0|+|none~0|none~1|+|none~0|none~1|none~2|"  # disconnected: chance accuracy
D = "|avg_pool_3x3~0|+|skip_connect~0|nor_conv_1x1~1|+|skip_connect~0|nor_conv_3x3~1|skip_connect~2|"


def test_correlations_match_scipy_and_hit_rate_by_hand():
    rng = np.random.default_rng(0)
    acc = rng.normal(size=40)
    score = acc + rng.normal(scale=0.7, size=40)
    names = [f"a{i}" for i in range(40)]
    sc = pd.DataFrame({"name": names, "p": score})
    ac = pd.DataFrame({"name": names, "cifar10": acc})
    row = correlations(sc, ac, ["p"], top_k=0.1).iloc[0]
    assert row["spearman"] == pytest.approx(stats.spearmanr(score, acc).statistic)
    assert row["kendall"] == pytest.approx(stats.kendalltau(score, acc).statistic)
    top_s, top_a = set(np.argsort(-score)[:4]), set(np.argsort(-acc)[:4])
    assert row["top_k"] == 4 and row["top_k_hit_rate"] == len(top_s & top_a) / 4
    # -inf (e.g. NASWOT of a disconnected cell) ranks last instead of being dropped
    sc.loc[0, "p"] = -np.inf
    assert correlations(sc, ac, ["p"]).iloc[0]["n"] == 40
    with pytest.raises(InputError):
        correlations(sc, ac, ["p"], top_k=0)


def test_rank_vote_is_mean_rank_fraction():
    df = pd.DataFrame({"a": [1.0, 2.0, 3.0], "b": [30.0, 10.0, 20.0]})
    v = rank_vote(df, ["a", "b"])
    assert list(v) == pytest.approx([(1 / 3 + 1) / 2, (2 / 3 + 1 / 3) / 2, (1 + 2 / 3) / 2])


def test_sample_is_seeded_and_prefix_stable():
    t = pd.DataFrame({"name": [f"n{i}" for i in range(50)], "index": range(50)})
    a, b = sample_archs(t, 10, 3), sample_archs(t, 20, 3)
    assert list(a["name"]) == list(b["name"][:10])
    with pytest.raises(InputError):
        sample_archs(t, 51, 0)


def test_failure_rows_and_resumable_cache(tmp_path):
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    cache = tmp_path / "c.jsonl"
    archs = [B, "|bogus~0|+|none~0|none~1|+|none~0|none~1|none~2|", C]
    df = score_archs(archs, x, y, ["synflow", "params", "nwot"], cache=cache)
    assert list(df["status"]) == ["ok", "failed", "ok"]
    assert "valid ops" in df.loc[1, "error"]
    assert df.loc[2, "nwot"] == -math.inf  # a disconnected cell: all codes equal
    lines = cache.read_text().splitlines()
    assert json.loads(lines[0])["header"]["batch_size"] == 4 and len(lines) == 4
    # resuming: nothing recomputed, same values; a new proxy only adds what is missing
    df2 = score_archs(archs, x, y, ["synflow", "params", "nwot"], cache=cache)
    assert len(cache.read_text().splitlines()) == 4
    pd.testing.assert_frame_equal(df.drop(columns="seconds"), df2.drop(columns="seconds"))
    df3 = score_archs(archs[:1], x, y, ["synflow", "flops"], cache=cache)
    assert len(cache.read_text().splitlines()) == 5 and df3.loc[0, "synflow"] == df.loc[0, "synflow"]
    with pytest.raises(InputError, match="other settings"):
        score_archs(archs, x[:2], y[:2], ["synflow"], cache=cache)


@pytest.fixture
def tiny_bench(tmp_path):
    rows = [(A, 93.0, 70.0, 44.0), (B, 80.0, 50.0, 25.0), (C, 10.0, 1.0, 0.83), (D, 91.0, 66.0, 40.0)]
    csv = tmp_path / "bench.csv"
    pd.DataFrame(rows, columns=["ArchitectureString", "CIFAR10TestAccuracy200Epochs",
                                "CIFAR100TestAccuracy200Epochs", "ImageNetTestAccuracy200Epochs"]
                 ).to_csv(csv, index=False)
    g = np.random.default_rng(0)
    npz = tmp_path / "imgs.npz"
    np.savez(npz, x=g.integers(0, 255, (8, 32, 32, 3), dtype=np.uint8), y=np.arange(8) % 4)
    return csv, npz


def test_evaluate_end_to_end(tiny_bench):
    csv, npz = tiny_bench
    res = evaluate(csv, f"{npz}?normalize=cifar", sample=4, seed=0, proxies="synflow,params",
                   batch_size=4, num_classes=10)
    scores, corr = res.tables["scores"], res.tables["correlations"]
    assert list(scores.columns[:2]) == ["name", "index"] and len(scores) == 4
    assert set(corr["proxy"]) == {"synflow", "params", "vote"}
    assert set(corr["dataset"]) == {"cifar10", "cifar100", "imagenet16"}
    acc = pd.read_csv(csv).set_index("ArchitectureString")["CIFAR10TestAccuracy200Epochs"]
    want = stats.spearmanr(scores["params"], acc.loc[scores["name"]].to_numpy()).statistic
    got = corr[(corr.proxy == "params") & (corr.dataset == "cifar10")]["spearman"].item()
    assert got == pytest.approx(want)
    assert res.summary["sample_size"] == 4 and res.summary["failed"] == 0
    json.loads(res.to_json())
    with pytest.raises(InputError, match="at least 2"):
        evaluate(csv, str(npz), sample=2, batch_size=1)


def test_cli_evaluate_and_rank(tiny_bench):
    from nndiag.cli.app import app

    csv, npz = tiny_bench
    runner = CliRunner()
    r = runner.invoke(app, ["zerocost", "evaluate", "--benchmark", str(csv), "--data", str(npz),
                            "--sample", "3", "--proxies", "params,flops", "--batch-size", "4",
                            "--format", "json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["sample_size"] == 3 and set(doc["proxies"]) == {"params", "flops", "vote"}
    assert set(doc["proxies"]["params"]["spearman"]) == {"cifar10", "cifar100", "imagenet16"}
    r = runner.invoke(app, ["zerocost", "rank", "digits-cnn", "digits-mlp", "--data", "digits",
                            "--proxies", "gradsign,synflow,params", "--batch-size", "16",
                            "--format", "json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    table = doc["tables"]["ranking"]
    assert [row["rank"] for row in table] == [1.0, 2.0]
    assert all(row["status"] == "ok" for row in table)
    # an architecture that cannot run on this data is listed as failed, not ranked
    r = runner.invoke(app, ["zerocost", "rank", "digits-cnn", "nb201:" + B, "--data", "digits",
                            "--proxies", "synflow,params", "--batch-size", "8", "--format", "json"])
    assert r.exit_code == 0, r.output
    table = json.loads(r.stdout)["tables"]["ranking"]
    assert [(row["name"], row["rank"], row["status"]) for row in table] == \
        [("digits-cnn", 1.0, "ok"), ("nb201:" + B, None, "failed")]
    assert "channels" in table[1]["error"]
    human = runner.invoke(app, ["zerocost", "rank", "digits-cnn", "nb201:" + B, "--data", "digits",
                                "--proxies", "synflow,params", "--batch-size", "8"])
    assert human.exit_code == 0 and "agreement (mean Kendall τ): n/a" in human.output  # one scored
    r = runner.invoke(app, ["zerocost", "rank", "nb201:|bad~0|", "--data", "digits"])
    assert r.exit_code == 2 and "valid ops" in r.output
    r = runner.invoke(app, ["zerocost", "rank", "digits-cnn", "--data", "digits", "--batch-size", "1"])
    assert r.exit_code == 2 and "at least 2" in r.output


def test_parallel_workers_give_the_same_rows(tmp_path):
    x, y = torch.randn(3, 3, 32, 32), torch.randint(0, 10, (3,))
    serial = score_archs([B, C], x, y, ["params", "synflow"])
    parallel = score_archs([B, C], x, y, ["params", "synflow"], workers=2, cache=tmp_path / "p.jsonl")
    pd.testing.assert_frame_equal(serial.drop(columns="seconds"), parallel.drop(columns="seconds"))
    with pytest.raises(InputError):
        score_archs([B], x, y, ["params"], workers=0)


def test_rank_leaves_out_a_proxy_that_fails_on_every_candidate():
    from torch import nn

    from nndiag.zerocost.rank import rank_models

    def tanh_net(width, seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(6, width), nn.Tanh(), nn.Linear(width, 3))

    x, y = torch.randn(16, 6, generator=torch.Generator().manual_seed(0)), torch.arange(16) % 3
    models = [("w4", tanh_net(4, 0)), ("w32", tanh_net(32, 1)), ("w8", tanh_net(8, 2))]
    df, summary = rank_models(models, x, y, ["params", "grad_norm", "nwot"], at_init=False)
    # nwot needs ReLU-like codes: it fails on all three, which are still ranked on the other two
    assert list(summary["left_out"]) == ["nwot"] and "ReLU" in summary["left_out"]["nwot"]
    assert summary["vote_proxies"] == ["params", "grad_norm"]
    assert (df["status"] == "ok").all() and df["rank"].notna().all()
    by = df.set_index("name")
    for name in by.index:  # the vote by hand: mean of the two proxies' rank fractions
        frac = [(by[p] <= by.loc[name, p]).sum() / 3 for p in ("params", "grad_norm")]
        assert by.loc[name, "vote"] == pytest.approx(sum(frac) / 2)
    # one candidate alone: nothing to compare nwot with either, it is still left out
    _, one = rank_models(models[:1], x, y, ["params", "nwot"], at_init=False)
    assert one["best"] == "w4" and list(one["left_out"]) == ["nwot"]
    # a proxy failing on some candidates only still makes those candidates unranked
    relu = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    df, summary = rank_models([("relu", relu), ("w4", tanh_net(4, 0))], x, y, ["params", "nwot"], at_init=False)
    assert summary["left_out"] == {} and list(df["status"]) == ["ok", "failed"]
    # a candidate that cannot run on the data at all: one line for the cause, not one per proxy
    wrong = nn.Sequential(nn.Linear(7, 3))
    df, summary = rank_models([("relu", relu), ("wrong", wrong)], x, y, ["grad_norm", "synflow"], at_init=False)
    row = df.set_index("name").loc["wrong"]
    assert row["status"] == "failed" and row["error"].startswith("every proxy failed, e.g. grad_norm: RuntimeError")
    assert summary["left_out"] == {} and summary["best"] == "relu"
    df, summary = rank_models([("wrong", wrong)], x, y, ["grad_norm", "synflow"], at_init=False)
    assert list(df["status"]) == ["failed"] and summary["best"] is None and summary["left_out"] == {}
