"""NB201 networks from architecture strings, the search space and the benchmark tables."""

from __future__ import annotations

import pytest
import torch

from nndiag.errors import InputError
from nndiag.models import build_model
from nndiag.models.nb201 import OPS, arch_string, nb201, parse_arch
from nndiag.zerocost.nb201 import all_archs, load_benchmark, load_naslib_scores, naslib_key_to_arch
from tests.conftest import shared_asset

ALL3 = "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|nor_conv_3x3~0|nor_conv_3x3~1|nor_conv_3x3~2|"


@pytest.mark.parametrize("bad,needle", [
    ("|conv_5x5~0|+|none~0|none~1|+|none~0|none~1|none~2|", "unknown operation 'conv_5x5'"),
    ("|none~0|+|none~0|none~1|", "3 node groups"),
    ("|none~0|+|none~0|+|none~0|none~1|none~2|", "node 2 needs 2"),
    ("|none~0|+|none~0|none~2|+|none~0|none~1|none~2|", "must read 'none~1'"),
    ("none~0+|none~0|none~1|+|none~0|none~1|none~2|", "start and end"),
    ("", "empty"),
])
def test_malformed_arch_strings_name_the_valid_ops(bad, needle):
    with pytest.raises(InputError) as exc:
        parse_arch(bad)
    assert needle in str(exc.value)
    assert all(op in str(exc.value) for op in OPS) or "start and end" in needle or "node 2" in needle \
        or "must read" in needle


def test_space_enumeration_round_trips():
    archs = all_archs()
    assert len(archs) == 5 ** 6 == len(set(archs))
    for a in archs[::997]:
        assert arch_string(parse_arch(a)) == a


def test_network_shapes_and_known_parameter_count():
    net = build_model("nb201:" + ALL3)
    # 1,531,546 = the published size of NB201's largest CIFAR-10 network (1.53 MB)
    assert sum(p.numel() for p in net.parameters()) == 1531546
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    small = nb201("|none~0|+|skip_connect~0|none~1|+|avg_pool_3x3~0|none~1|nor_conv_1x1~2|",
                  num_classes=100, channels=8, cells_per_stage=1)
    assert small(torch.randn(2, 3, 16, 16)).shape == (2, 100)


def test_parameter_counts_match_naslib_stored_params():
    path = shared_asset("benchmarks", "naslib_zc_nb201_subset.json")
    table = load_naslib_scores(path, "cifar10")
    assert len(table) == 725
    for _, row in table.iloc[::97].iterrows():  # 8 architectures
        n = sum(p.numel() for p in nb201(row["name"]).parameters())
        assert n == round(row["params"] * 1e6), row["name"]


def test_naslib_keys_map_to_benchmark_rows():
    assert naslib_key_to_arch("(0, 1, 2, 3, 4, 0)") == \
        "|skip_connect~0|+|none~0|nor_conv_1x1~1|+|nor_conv_3x3~0|avg_pool_3x3~1|skip_connect~2|"
    with pytest.raises(InputError):
        naslib_key_to_arch("(0, 1, 2)")
    bench = load_benchmark(shared_asset("benchmarks", "nb201_test_accuracy.csv"))
    assert len(bench) == 15625 and set(bench["name"]) == set(all_archs())
    assert bench["cifar10"].idxmax() == 6111 and bench.loc[6111, "cifar10"] == pytest.approx(94.37, abs=0.01)
    nas = load_naslib_scores(shared_asset("benchmarks", "naslib_zc_nb201_subset.json"))
    assert set(nas["name"]) <= set(bench["name"])


def test_data_free_proxies_agree_with_naslib_stored_scores():
    # external check on a few architectures (the full check: benchmarks/nb201_naslib_check.py)
    from scipy import stats

    from nndiag._utils.seeding import fork_rng
    from nndiag.zerocost.proxies import flops, synflow

    table = load_naslib_scores(shared_asset("benchmarks", "naslib_zc_nb201_subset.json"))
    rows = table.iloc[5::60].reset_index(drop=True)  # 13 architectures
    x = torch.zeros(2, 3, 32, 32)
    ours_s, ours_f = [], []
    for arch in rows["name"]:
        with fork_rng(0):
            net = nb201(arch)
        ours_s.append(synflow(net, x))
        ours_f.append(flops(net, x))
    assert stats.spearmanr(ours_s, rows["synflow"]).statistic >= 0.9
    assert stats.spearmanr(ours_f, rows["flops"]).statistic >= 0.9
