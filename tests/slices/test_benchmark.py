"""The planted-slice benchmark (acceptance test) on a small configuration, and plants."""

from __future__ import annotations

import numpy as np
import pytest

from nndiag._utils.threads import limit_threads
from nndiag.errors import InputError
from nndiag.io.data import load_data
from nndiag.slices.benchmark import BenchmarkConfig, plant_membership, run_benchmark


def test_plants_are_coherent_subgroups_of_one_class():
    d = load_data("digits")
    x, y = d.x.numpy(), d.y.numpy()
    low = plant_membership(x, y, 3, "low_ink", 0)
    assert set(np.unique(y[low])) == {3}
    ink = x.reshape(len(x), -1).sum(1)
    assert ink[low].max() <= ink[(y == 3) & ~low].min()
    assert abs(low.sum() - (y == 3).sum() / 3) <= 2
    km = plant_membership(x, y, 5, "kmeans", 0)
    assert set(np.unique(y[km])) == {5} and (y == 5).sum() / 3 <= km.sum() < (y == 5).sum()
    with pytest.raises(InputError, match="unknown plant"):
        plant_membership(x, y, 5, "stripes", 0)


def test_planted_slice_benchmark_passes():
    """Five seeds, digits MLP, k-means plant: the spotlight must find the planted slice
    (AP >= 8x base rate and >= 60 % of the slice in its support, no collapse) in >= 4."""
    cfg = BenchmarkConfig(steps=400, methods=("spotlight", "loss_rank"))
    with limit_threads(1):
        r = run_benchmark(cfg)
    runs = r.tables["runs"]
    sp = runs[runs["method"] == "spotlight"]
    assert r.summary["accepted_seeds"] >= 4, runs[["seed", "rejected"]]
    assert r.summary["passed"], sp[["seed", "ap", "base_rate", "in_support", "collapsed"]]
    assert not sp["collapsed"].any()
    ok = (sp["ap"] >= 8 * sp["base_rate"]) & (sp["in_support"] >= 0.6)
    assert int(ok.sum()) >= 4
    assert r.findings[0].code == "SLICE-BENCH-PASS"
    # the plant took: the slice is mostly misclassified while the model is accurate elsewhere
    assert (sp["slice_accuracy"] <= 0.5).all() and (sp["accuracy"] > 0.85).all()
