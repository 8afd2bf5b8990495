"""Zoo builder: grid training, resumability, room-for-improvement labels, CLI."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from nndiag.cli.app import app
from nndiag.diagnosis.zoo import RECORDS, ZooConfig, build_zoo, label_frame, zoo_frame
from nndiag.errors import DataError, InputError

TINY = ZooConfig(dataset="digits", widths=(4, 16), batch_sizes=(32, 512), data_fractions=(1.0,),
                 seeds=(0, 1), epochs=2, curve_epochs=1, hessian_samples=50)


def _brute_labels(df: pd.DataFrame) -> pd.DataFrame:
    # the paper's definitions, one configuration at a time with plain loops
    out = []
    acc = {(r.width, r.data, r.bs): r.test_acc for r in df.itertuples()}
    for r in df.itertuples():
        cur = r.test_acc
        inc_t = max(acc[(r.width, r.data, b)] for b in df.bs.unique() if b <= r.bs) - cur
        dec_t = max(acc[(r.width, r.data, b)] for b in df.bs.unique() if b >= r.bs) - cur
        inc_w = max(acc[(w, r.data, r.bs)] for w in df.width.unique() if w >= r.width) - cur
        inc_d = max(acc[(r.width, d, r.bs)] for d in df.data.unique() if d >= r.data) - cur
        t = max(inc_t, dec_t)
        out.append({
            "rfi_inc_temp": inc_t, "rfi_dec_temp": dec_t, "rfi_width": inc_w, "rfi_data": inc_d,
            "bs_failure": "small" if inc_t > dec_t else "large" if inc_t < dec_t else "optimal",
            "width_vs_batch": "width" if inc_w > t else "batch" if inc_w < t else "optimal",
            "data_vs_batch": "data" if inc_d > t else "batch" if inc_d < t else "optimal",
        })
    return pd.DataFrame(out)


def test_labels_match_the_paper_definitions():
    rng = np.random.default_rng(0)
    grid = [(w, d, b) for w in (2, 4, 8) for d in (0.5, 1.0) for b in (16, 64, 256, 1024)]
    df = pd.DataFrame(grid, columns=["width", "data", "bs"])
    df["test_acc"] = np.round(rng.uniform(50, 90, len(df)), 0)  # rounding makes ties (optimal)
    got = label_frame(df)
    want = _brute_labels(df)
    for col in want.columns:
        if col.startswith("rfi"):
            np.testing.assert_allclose(got[col], want[col])
        else:
            assert got[col].tolist() == want[col].tolist()
    assert (got[["rfi_inc_temp", "rfi_dec_temp", "rfi_width", "rfi_data"]] >= 0).all().all()
    with pytest.raises(DataError, match="incomplete"):
        label_frame(df.iloc[:-1])
    # means of exact ratios that differ only by float noise are ties ("optimal")
    tie = pd.DataFrame({"width": [1, 1], "data": [1.0, 1.0], "bs": [8, 16], "test_acc": [0.1 + 0.2, 0.3]})
    assert label_frame(tie)["bs_failure"].tolist() == ["optimal", "optimal"]


def test_build_is_resumable_and_labelled(tmp_path):
    d = tmp_path / "zoo"
    part = build_zoo(d, TINY, limit=1, progress=False)
    assert len(part) == 1 and "bs_failure" not in part.columns
    first = (d / RECORDS).read_text()
    full = build_zoo(d, progress=False)  # resumes from zoo.json
    assert (d / RECORDS).read_text().startswith(first)  # the first record was kept, not retrained
    assert len(full) == 4 and len((d / RECORDS).read_text().splitlines()) == 4
    for col in ("train_error", "test_error", "train_loss", "test_loss", "CKA", "mode_connectivity_peak",
                "hessian_t", "log_data_amount", "log_para_amount", "bs_failure", "width_vs_batch"):
        assert col in full.columns and full[col].notna().all(), col
    assert (full["mode_connectivity_peak"] <= 0).all()
    assert full["CKA"].between(0, 1).all()
    # a batch of 512 for two epochs is 6 steps: far worse than batch 32 (temperature too small)
    small_b = full[(full.bs == 32)].set_index("width")["test_acc"]
    large_b = full[(full.bs == 512)].set_index("width")["test_acc"]
    assert (small_b > large_b).all()
    assert (full[full.bs == 512]["bs_failure"] == "small").all()
    # a cut-off last line (interrupted write) is ignored and that configuration reruns
    lines = (d / RECORDS).read_text().splitlines()
    (d / RECORDS).write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])
    assert len(zoo_frame(d)) == 3
    with pytest.raises(InputError, match="another configuration"):
        build_zoo(d, ZooConfig(dataset="digits", widths=(4,), batch_sizes=(32,), data_fractions=(1.0,)))


def test_config_validation():
    with pytest.raises(InputError, match="two distinct seeds"):
        ZooConfig(seeds=(0,))
    with pytest.raises(InputError, match="digits or mnist1d"):
        ZooConfig(dataset="cifar")
    with pytest.raises(InputError, match="fractions"):
        ZooConfig(data_fractions=(0.0, 1.0))
    with pytest.raises(DataError, match="no zoo records"):
        zoo_frame("/nonexistent-zoo")


def test_cli_zoo_build_json(tmp_path):
    d = tmp_path / "z"
    res = CliRunner().invoke(app, ["zoo", "build", str(d), "--widths", "4", "--batch-sizes", "32,512",
                                   "--data-fractions", "1.0", "--epochs", "1", "--limit", "1",
                                   "--format", "json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["done"] == 1 and doc["total"] == 2
    bad = CliRunner().invoke(app, ["zoo", "build", str(tmp_path / "y"), "--seeds", "0"])
    assert bad.exit_code == 2 and "two distinct seeds" in bad.output


def test_cli_zoo_fit_reproduces_shipped_thresholds(tmp_path):
    from nndiag.diagnosis.shipped import default_thresholds_path, load_thresholds
    from nndiag.diagnosis.zoo import CONFIG, default_zoo

    folder = default_thresholds_path().parent
    if not (folder / "zoo_digits.csv").is_file():
        pytest.skip("no committed zoo table")
    df = pd.read_csv(folder / "zoo_digits.csv")
    fields = ["width", "data", "bs", "data_amount", "para_amount", "train_acc", "train_loss", "test_acc",
              "test_loss", "CKA", "mode_connectivity", "mode_connectivity_peak", "hessian_t", "hessian_e",
              "seconds"]
    (tmp_path / CONFIG).write_text(json.dumps(default_zoo("digits").to_dict()))
    with open(tmp_path / RECORDS, "w") as fh:
        for r in df.to_dict(orient="records"):
            fh.write(json.dumps({"key": r["name"], **{k: r[k] for k in fields}}) + "\n")
    out = tmp_path / "t.json"
    res = CliRunner().invoke(app, ["zoo", "fit", str(tmp_path), "--out", str(out)])
    assert res.exit_code == 0, res.output
    ours, shipped = load_thresholds(out), load_thresholds()
    for q in shipped.trees:
        # the CSV stores 10 significant digits; train_error = 100 - train_acc is recomputed here
        np.testing.assert_allclose(ours.trees[q].thresholds, shipped.trees[q].thresholds, rtol=1e-4)
        np.testing.assert_array_equal(ours.trees[q].leaf_counts, shipped.trees[q].leaf_counts)
    res = CliRunner().invoke(app, ["zoo", "fit", str(tmp_path / "none"), "--out", str(out)])
    assert res.exit_code == 2 and "no zoo records" in res.output


def test_parallel_build_matches_serial(tmp_path):
    from nndiag.diagnosis.zoo import train_config

    cfg = ZooConfig(dataset="digits", widths=(4,), batch_sizes=(64, 512), data_fractions=(0.5,), epochs=1,
                    curve_epochs=1, hessian_samples=50)
    par = build_zoo(tmp_path / "p", cfg, jobs=2, progress=False).set_index("name")
    ser = train_config(cfg, 4, 0.5, 512)
    for k in ("train_acc", "test_loss", "CKA", "mode_connectivity_peak", "hessian_t"):
        assert par.loc["w4_d0.5_b512", k] == pytest.approx(ser[k], rel=1e-6), k
