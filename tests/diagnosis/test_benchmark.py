"""The paper's five cases reproduced from its released tables (../shared assets)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from nndiag.cli.app import app
from nndiag.diagnosis.benchmark import CASES, load_tables, run_benchmark
from nndiag.errors import DataError
from tests.conftest import shared_asset

PAPER_MDTREE = [87.70, 75.89, 82.56, 74.10, 78.16]
PAPER_VALIDATION = [72.82, 51.73, 67.55, 55.79, 63.61]
PAPER_HYPER = [49.56, 64.74, 60.12, 53.54, 53.54]


@pytest.fixture(scope="module")
def bench():
    folder = shared_asset("benchmarks", "mdtree")
    return run_benchmark(folder)


def test_md_tree_reproduces_paper_within_a_tenth(bench):
    cases = bench.table("cases")
    assert cases["case"].tolist() == [1, 2, 3, 4, 5]
    np.testing.assert_allclose(cases["mdtree"], PAPER_MDTREE, atol=0.1)


def test_baselines_reproduce_paper(bench):
    cases = bench.table("cases")
    np.testing.assert_allclose(cases["validation"], PAPER_VALIDATION, atol=0.1)
    np.testing.assert_allclose(cases["hyperparameter"], PAPER_HYPER, atol=0.1)


def test_improved_mode_figures_are_recorded(bench):
    # the improved mode's figures, as documented in docs/BENCHMARKS.md (not a claim that it wins)
    cases = bench.table("cases")
    np.testing.assert_allclose(cases["mdtree_improved"], [87.55, 84.94, 84.74, 76.36, 77.02], atol=0.01)


def test_case_one_training_sets_are_eight_groups(bench):
    seeds = bench.table("seeds")
    one = seeds[seeds["case"] == 1]
    assert one["seed"].tolist() == [42, 90, 38, 18, 72]
    # 8 groups of 13 batch sizes minus the 'optimal' rows
    assert (one["n_train"] <= 8 * 13).all() and (one["n_train"] > 8 * 13 - 13).all()
    assert (seeds["n_test"][seeds["case"] <= 3] == 1560).all()


def test_global_numpy_random_state_is_left_alone():
    folder = shared_asset("benchmarks", "mdtree")
    np.random.seed(123)  # noqa: NPY002 - checking the legacy global state
    before = np.random.get_state()[1].copy()  # noqa: NPY002
    run_benchmark(folder, cases=[1], seeds=[42])
    assert np.array_equal(np.random.get_state()[1], before)  # noqa: NPY002


def test_cli_json_fields():
    folder = shared_asset("benchmarks", "mdtree")
    res = CliRunner().invoke(app, ["mdtree", "benchmark", str(folder), "--format", "json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert [d["case"] for d in doc] == [1, 2, 3, 4, 5]
    for d, paper in zip(doc, PAPER_MDTREE, strict=True):
        assert {"case", "mdtree", "validation", "hyperparameter", "mdtree_improved"} <= set(d)
        assert abs(d["mdtree"] - paper) <= 0.1


def test_missing_column_is_exit_2(tmp_path):
    folder = shared_asset("benchmarks", "mdtree")
    for name in ("dataframe_normal_public.csv", "dataframe_noise_public.csv"):
        shutil.copy(folder / name, tmp_path / name)
    df = pd.read_csv(tmp_path / "dataframe_noise_public.csv").drop(columns=["hessian_t"])
    df.to_csv(tmp_path / "dataframe_noise_public.csv", index=False)
    with pytest.raises(DataError, match="missing column.*hessian_t"):
        load_tables(tmp_path)
    res = CliRunner().invoke(app, ["mdtree", "benchmark", str(tmp_path)])
    assert res.exit_code == 2
    assert "hessian_t" in res.output


def test_bad_tables_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="not a folder"):
        load_tables(tmp_path / "nope")
    with pytest.raises(DataError, match="file not found"):
        load_tables(tmp_path)
    folder = shared_asset("benchmarks", "mdtree")
    for name in ("dataframe_normal_public.csv", "dataframe_noise_public.csv"):
        df = pd.read_csv(folder / name)
        if "normal" in name:
            df.loc[0, "bs_failure"] = "tiny"
        df.to_csv(tmp_path / name, index=False)
    with pytest.raises(DataError, match="unknown label"):
        load_tables(tmp_path)
    (tmp_path / "dataframe_normal_public.csv").write_text("")
    with pytest.raises(DataError, match="cannot read"):
        load_tables(tmp_path)
    assert len(CASES) == 5
