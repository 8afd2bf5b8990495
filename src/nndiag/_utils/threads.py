"""Control of BLAS/OpenMP thread counts.

Oversubscribed BLAS threads on a small machine make SVDs many times slower; every
heavy analysis runs inside :func:`limit_threads`.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any

from nndiag._utils.env import env_count

_controller: tuple[int, Any] | None = None
_pools: dict[int, Any] = {}


def usable_cores() -> int:
    """Cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def _running_elsewhere(samples: int = 3, proc: str = "/proc") -> int | None:
    """Runnable threads of *other* processes right now (Linux), or None where unknown.

    The kernel's count of runnable tasks (``/proc/loadavg``, fourth field) minus this
    process's own runnable threads (state ``R`` in ``/proc/self/task/*/stat``); the
    smallest of ``samples`` readings, so that a thread of ours that changes state between
    the two reads is not taken for a competitor. A CPU-bound process elsewhere is runnable
    at every reading.
    """
    from pathlib import Path

    root, best = Path(proc), None
    for _ in range(samples):
        try:
            running = int((root / "loadavg").read_text().split()[3].split("/")[0])
            tasks = list((root / "self" / "task").iterdir())
        except (OSError, IndexError, ValueError):
            return None
        own = 0
        for task in tasks:
            try:
                stat = (task / "stat").read_text()
            except OSError:  # the thread ended meanwhile
                continue
            own += stat[stat.rindex(")") + 2] == "R"
        others = max(0, running - own)
        best = others if best is None else min(best, others)
    return best


def default_threads() -> int:
    """Threads nndiag uses by default: ``NNDIAG_THREADS``, else the usable cores not busy elsewhere.

    On a loaded machine, BLAS/OpenMP threads beyond the idle cores slow eigen-solvers
    many times over (spinning workers), so the default leaves out the cores other
    processes keep busy (:func:`_running_elsewhere`; at least 1 thread). The 1-minute load
    average, used before, counts this process's own work too: after one analysis had
    kept both cores of the development machine busy, the next ones in the same process
    (``nndiag diagnose``, a script) ran on one thread — a Hessian density at 0.96 instead
    of 0.6 s per product. It is used only where ``/proc`` cannot be read.
    """
    env = env_count("NNDIAG_THREADS")
    if env is not None:
        return env
    cores = usable_cores()
    busy = _running_elsewhere()
    if busy is None:
        try:
            busy = int(round(os.getloadavg()[0] - 0.5))
        except (AttributeError, OSError):  # pragma: no cover - non-Unix
            busy = 0
    return max(1, min(cores, cores - busy))


def controller() -> Any:
    """A ``threadpoolctl.ThreadpoolController``, rebuilt only when modules were imported since.

    Building one scans every loaded shared library (~3 ms), which dominated short analyses
    called in a loop; native thread pools arrive with imports, so the number of imported
    modules tells when the cached scan may be stale.
    """
    global _controller
    from threadpoolctl import ThreadpoolController

    n_modules = len(sys.modules)
    if _controller is None or _controller[0] != n_modules:
        _controller = (n_modules, ThreadpoolController())
    return _controller[1]


def worker_pool(workers: int) -> Any:
    """A process-wide ``ThreadPoolExecutor`` with ``workers`` threads, created once.

    Starting a pool's threads cost ~3 ms each on the 2-core VM (12 ms of a 0.25 s spectral
    analysis); idle workers wait on a queue and exit with the interpreter.
    """
    pool = _pools.get(workers)
    if pool is None:
        from concurrent.futures import ThreadPoolExecutor

        pool = _pools[workers] = ThreadPoolExecutor(workers, thread_name_prefix="nndiag")
    return pool


@contextlib.contextmanager
def limit_threads(n: int | None = None) -> Iterator[int]:
    """Limit BLAS, OpenMP and torch intra-op threads inside the block.

    Parameters
    ----------
    n : int, optional
        Thread count; defaults to :func:`default_threads`.

    Yields
    ------
    int
        The thread count in force.

    Examples
    --------
    >>> with limit_threads(1) as n:
    ...     n
    1
    """
    import torch

    n = default_threads() if n is None else max(1, int(n))
    old = torch.get_num_threads()
    with controller().limit(limits=n):
        torch.set_num_threads(n)
        try:
            yield n
        finally:
            torch.set_num_threads(old)


@contextlib.contextmanager
def gil_switch(seconds: float = 1e-5) -> Iterator[None]:
    """Shorten Python's GIL switch interval inside the block (never lengthen it), then restore it.

    A worker thread that runs many short native calls (PyTorch's batched eigen-solves of
    ``nndiag.spectral``) takes the GIL back after each; while this thread runs Python-level
    work beside it, each hand-over can wait up to the interval (5 ms by default). Pretrained
    ResNet56's spectral analysis on the 2-core VM (medians of 15–20 interleaved runs, eigenvalues
    alone ~50 ms): 77.4 → 72.7 ms with 1 ms; with the stacks' fits batched, 91.5 (1 ms), 80.6
    (0.2 ms), 77.8 ms (0.05 ms) in a slower hour, and 107.6 (0.1 ms), 98.5 (0.02 ms), 94.7 ms
    (0.005 ms) slower still (eigenvalues alone 64.5 ms). ResNet-18 (LAPACK route) unchanged:
    509.1 / 509.0 / 500.9 ms at 0.1 / 0.02 / 0.005 ms.
    """
    old = sys.getswitchinterval()
    sys.setswitchinterval(min(old, seconds))
    try:
        yield
    finally:
        sys.setswitchinterval(old)
