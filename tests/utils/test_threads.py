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


def test_default_threads_ignores_this_process_own_load(monkeypatch):
    # the 1-minute load average counts our own past work: a high one must not cut the default
    monkeypatch.delenv("NNDIAG_THREADS", raising=False)
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (8.0, 8.0, 8.0))
    monkeypatch.setattr(threads, "_running_elsewhere", lambda samples=3: 0)
    assert threads.default_threads() == threads.usable_cores()
    monkeypatch.setattr(threads, "_running_elsewhere", lambda samples=3: 1)
    assert threads.default_threads() == max(1, threads.usable_cores() - 1)
    monkeypatch.setattr(threads, "_running_elsewhere", lambda samples=3: None)  # no /proc: load average
    assert threads.default_threads() == max(1, threads.usable_cores() - 8)  # busy: round(8 - 0.5)


def test_running_elsewhere_subtracts_own_runnable_threads(tmp_path):
    (tmp_path / "loadavg").write_text("0.90 0.80 0.70 5/321 4242\n")
    for tid, name, state in ((1, "python", "R"), (2, "pt_main) (R", "S"), (3, "omp", "R"), (4, "io", "D")):
        (tmp_path / "self" / "task" / str(tid)).mkdir(parents=True)
        (tmp_path / "self" / "task" / str(tid) / "stat").write_text(f"{tid} ({name}) {state} 1 1 1 0 -1\n")
    assert threads._running_elsewhere(proc=str(tmp_path)) == 3  # 5 runnable, 2 of them ours
    assert threads._running_elsewhere(proc=str(tmp_path / "missing")) is None


def test_own_busy_threads_are_not_competitors_but_other_processes_are():
    import subprocess
    import threading
    import time

    import pytest

    if threads._running_elsewhere() is None:
        pytest.skip("/proc/loadavg is not readable here")
    idle_before = threads._running_elsewhere()
    if idle_before > 2:  # (e.g. pytest -n 8 on a GPU machine: 55 runnable, then 69 — no stable baseline)
        pytest.skip(f"{idle_before} threads run elsewhere: too busy to compare counts")
    stop = time.perf_counter() + 0.5
    a = torch.randn(400, 400)

    def work() -> None:  # matrix products release the GIL: this thread stays runnable
        while time.perf_counter() < stop:
            a @ a

    t = threading.Thread(target=work)
    t.start()
    time.sleep(0.1)
    own_busy = threads._running_elsewhere()
    t.join()
    idle_after = threads._running_elsewhere()
    # our own busy thread and the calling one are not competitors (counted, they would add 2);
    # a process elsewhere may queue behind our work (one more) or show in the idle readings
    assert own_busy <= max(idle_before, idle_after) + 1
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        assert threads._running_elsewhere() >= 1  # a busy process elsewhere is counted
    finally:
        proc.kill()
        proc.wait()


def test_gil_switch_shortens_and_restores_the_interval():
    old = sys.getswitchinterval()
    try:
        sys.setswitchinterval(0.005)
        with threads.gil_switch(1e-3):
            assert abs(sys.getswitchinterval() - 1e-3) < 1e-5  # (kept in whole microseconds)
        assert abs(sys.getswitchinterval() - 0.005) < 1e-5
        sys.setswitchinterval(2e-4)  # a user's shorter interval is kept, and restored after an error
        try:
            with threads.gil_switch(1e-3):
                assert abs(sys.getswitchinterval() - 2e-4) < 1e-5
                raise RuntimeError("boom")
        except RuntimeError:
            pass
        assert abs(sys.getswitchinterval() - 2e-4) < 1e-5
    finally:
        sys.setswitchinterval(old)
