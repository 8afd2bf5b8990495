"""Thread limits: one cached threadpoolctl controller, rebuilt after imports."""

from __future__ import annotations

import sys

import torch
from threadpoolctl import threadpool_info

from nndiag._utils import threads


def test_limit_threads_sets_and_restores_counts():
    before = torch.get_num_threads()
    outside = {(i["internal_api"], i["filepath"]): i["num_threads"] for i in threadpool_info()}
    with threads.limit_threads(1) as n:
        assert n == 1 and torch.get_num_threads() == 1
        assert all(i["num_threads"] == 1 for i in threadpool_info())
    assert torch.get_num_threads() == before
    after = {(i["internal_api"], i["filepath"]): i["num_threads"] for i in threadpool_info()}
    assert all(after[k] == v for k, v in outside.items() if k in after)


def test_controller_cached_until_a_module_is_imported(monkeypatch):
    first = threads.controller()
    assert threads.controller() is first  # no import in between: the same scan
    monkeypatch.setitem(sys.modules, "nndiag_test_fake_module", object())
    rebuilt = threads.controller()
    assert rebuilt is not first
    assert {lib.filepath for lib in rebuilt.lib_controllers} == {lib.filepath for lib in first.lib_controllers}
