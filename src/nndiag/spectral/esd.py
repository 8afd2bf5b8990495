"""Empirical spectral densities: eigenvalues of WᵀW, batched, with controlled precision.

The eigenvalues of ``WᵀW`` (``W`` is ``n × m`` with ``n ≥ m``) are the squared
singular values of ``W``. They are computed as ``eigvalsh`` of the smaller Gram
matrix, batched over same-shaped matrices (one ``bmm`` + one batched ``eigvalsh``).

Precision
---------
``"float64"``
    Gram matrix and eigen-solver in float64: every eigenvalue matches
    ``numpy.linalg.svd(W)**2`` to ~1e-10 relative (far below the 1e-6 promised).
``"float32"``
    Both in float32: about 4× cheaper; eigenvalues carry an absolute error of
    order ``1e-6·λmax``, so small eigenvalues of ill-conditioned matrices lose
    relative accuracy.
``"auto"`` (default)
    float32 first; a matrix is recomputed in float64 when more than
    :data:`AUTO_FRACTION` of its eigenvalues lie below :data:`AUTO_COND` ``· λmax``,
    where float32 rounding (about ``1e-5·λmax`` absolute at worst) can reach ~1% of
    their value; the other eigenvalues keep ~1e-4 relative accuracy or better. On
    PyTorch's batched route, a shape whose stack needed that for more than
    :data:`AUTO_DIRECT` of its matrices has its later stacks solved in float64 directly
    (the first :data:`AUTO_PROBE` matrices of its first stack decide for the rest of it).
    Gram matrices up to :data:`AUTO_F64_MAX` (64×64) are solved in float64 at once: float64
    costs little more there. A larger random square matrix (a few eigenvalues near 0) stays in
    float32; a rank-deficient or strongly ill-conditioned one goes to float64. On a CUDA device
    ``auto`` means float64: GPU eigen-solvers on these sizes are bound by latency, not
    arithmetic, so float64 costs little there, and it makes GPU results agree with the
    CPU's float64 route instead of differing by float32 rounding between two libraries
    (measured on an H100: up to 3e-3 in the KS distance D of 4608-eigenvalue pooled convs).

CPU backend
-----------
On the CPU the Gram matrix (from 96×96 up) and its eigenvalues go through SciPy's LAPACK
(OpenBLAS in the wheels, :func:`cpu_backend`); smaller Gram matrices stay on PyTorch's
batched kernels. PyTorch's MKL was slower on both machines measured: ~1.4× for ``ssyevd``
(and ~2× for ``sgemm``) on the 2-core AMD EPYC development machine, 2× for the whole
eigen-solve on a 16-core Intel host. The rule never depends on a timing, so a model gives
the same numbers in every run on a machine.

With several threads allowed, the LAPACK route solves several matrices at once, one per
thread, each with a single-threaded BLAS (:func:`eigvals_stacks`): on the 2-core machine
OpenBLAS's own threading made each eigen-solve *slower* (0.44 s instead of 0.23 s for
eighteen 512×512 slices), while two matrices side by side took half the one-thread time; on
the 16-core Intel host 16 threads took 0.104 s for 34 matrices (3072×768 and 512×512), one
thread 0.79 s, and PyTorch's MKL with its own 16 threads 0.68 s.
"""

from __future__ import annotations

import functools
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future

import numpy as np
import torch

from nndiag.errors import InputError
from nndiag.spectral._lapack import NOGIL, syevd_values

PRECISIONS = ("auto", "float32", "float64")
#: In ``auto`` mode, eigenvalues below ``AUTO_COND·λmax`` count as poorly resolved in float32 ...
AUTO_COND = 1e-3
#: ... and a matrix with more than this fraction of them is recomputed in float64.
AUTO_FRACTION = 0.1


#: A lone Gram matrix at least this large keeps the multi-threaded BLAS (see :func:`_lapack_stacks`).
BLAS_THREADS_MIN = 2048
#: Gram matrices smaller than this stay on PyTorch's batched kernels (one call for the whole
#: stack beats a Python loop of LAPACK calls below ~96×96 on the development machine).
LAPACK_MIN = 96


@functools.cache
def cpu_backend() -> str:
    """``"lapack"`` (SciPy's LAPACK, :mod:`~nndiag.spectral._lapack`) or ``"torch"`` for CPU eigenvalues.

    ``"torch"`` only when SciPy's LAPACK cannot be loaded. The rule used to prefer PyTorch's
    MKL on Intel processors; measured on a 16-core Intel host (the H100 machine) MKL took
    1.57 s for 34 matrices one thread, OpenBLAS 0.79 s, and MKL ignores a per-thread limit,
    so it cannot share matrices out among threads.
    """
    try:
        from scipy.linalg import cython_lapack  # noqa: F401
    except ImportError:  # pragma: no cover - SciPy is a dependency
        return "torch"
    return "lapack"


#: Rows converted to float64 at a time for a float64 Gram matrix (bounds the extra memory per
#: thread to ``GRAM64_ROWS × m`` doubles instead of a float64 copy of the whole matrix).
GRAM64_ROWS = 8192


def _gram64(x: np.ndarray) -> np.ndarray:
    """``xᵀx`` in float64, converting at most :data:`GRAM64_ROWS` rows at a time."""
    if x.dtype == np.float64 or x.shape[0] <= GRAM64_ROWS:
        x64 = np.ascontiguousarray(x, dtype=np.float64)
        return x64.T @ x64
    g = np.zeros((x.shape[1], x.shape[1]))
    for i in range(0, x.shape[0], GRAM64_ROWS):
        b = x[i : i + GRAM64_ROWS].astype(np.float64)
        g += b.T @ b
    return g


def _lapack_one(x: np.ndarray, precision: str) -> np.ndarray:
    """float64 eigenvalues of ``xᵀx`` for one ``(n, m)`` matrix through LAPACK (``precision`` rules)."""
    if precision == "float64" or x.dtype == np.float64:
        return syevd_values(_gram64(x))
    x32 = x.astype(np.float32, copy=False)
    if x32.flags.f_contiguous and not x32.flags.c_contiguous:
        y = x32.T  # a transposed C-ordered weight (e.g. Linear(3072 → 768)): no copy needed
        gram = y @ y.T
    else:
        x32 = np.ascontiguousarray(x32)
        gram = x32.T @ x32  # NumPy uses syrk for both forms: half a matrix product
    ev = syevd_values(gram).astype(np.float64)
    if precision == "auto" and _poorly_resolved(ev):
        ev = syevd_values(_gram64(x32))
    return ev


def _poorly_resolved(ev: np.ndarray) -> bool:
    """``auto`` rule: more than :data:`AUTO_FRACTION` of the (ascending) values below ``AUTO_COND·λmax``."""
    k = min(ev.shape[-1] - 1, int(AUTO_FRACTION * ev.shape[-1]))
    return bool(ev[k] < AUTO_COND * max(float(ev[-1]), 0.0))


def _lapack_stacks(stacks: list[np.ndarray], precision: str,
                   done: Callable[[int, np.ndarray], None] | None = None) -> list[np.ndarray]:
    """LAPACK eigenvalues of every matrix of every stack, several matrices at once.

    With ``w = torch.get_num_threads()`` threads allowed (set by
    :func:`~nndiag._utils.threads.limit_threads`) and at least two matrices, ``w``
    Python threads each solve whole matrices with a single-threaded BLAS (the LAPACK
    calls release the GIL, :mod:`~nndiag.spectral._lapack`); a lone matrix gets the BLAS
    threads only from :data:`BLAS_THREADS_MIN` up. Every matrix goes through the same routine.
    ``done(i, eigenvalues)`` is called, in the thread that solved its last matrix, as soon
    as stack ``i`` is complete (values clipped at 0).
    """
    # dearest first (Gram n·m², solve m³), so that no thread is left alone with a big one at the end
    jobs = sorted(((i, b) for i, x in enumerate(stacks) for b in range(x.shape[0])),
                  key=lambda j: -(stacks[j[0]].shape[1] + stacks[j[0]].shape[2]) * stacks[j[0]].shape[2] ** 2)
    outs = [np.empty((x.shape[0], x.shape[2]), dtype=np.float64) for x in stacks]
    workers = min(torch.get_num_threads(), len(jobs)) if NOGIL else 1

    left = [x.shape[0] for x in stacks]
    lock = threading.Lock()

    def run(job: tuple[int, int]) -> None:
        i, b = job
        outs[i][b] = _lapack_one(stacks[i][b], precision)
        if done is not None:
            with lock:
                left[i] -= 1
                last = left[i] == 0
            if last:
                done(i, np.maximum(outs[i], 0.0, out=outs[i]))

    from nndiag._utils.threads import controller, worker_pool

    if workers <= 1:
        # a lone matrix below 2048² gains nothing from BLAS threads here (a 768² float64 solve
        # took 0.13 s with OpenBLAS's two threads, 0.05 s with one); from 4096² up they pay
        big = max(x.shape[2] for x in stacks) >= BLAS_THREADS_MIN
        one = not big and torch.get_num_threads() > 1  # (limit_threads(1) has set BLAS to 1 already)
        with controller().limit(limits=1 if one else None, user_api="blas"):
            for job in jobs:
                run(job)
        return outs
    with controller().limit(limits=1, user_api="blas"):
        list(worker_pool(workers).map(run, jobs))
    return outs


#: In ``auto`` mode, once a stack of one shape had more than this fraction of its matrices
#: recomputed in float64, later stacks of that shape are solved in float64 directly: float32
#: plus the recomputations then cost more than float64 alone (pretrained ResNet56's 153 pooled
#: 64×64 slices: 45 % recomputed, 31 ms against 22 ms in float64, one thread, this machine).
AUTO_DIRECT = 0.3
#: ... and the first stack of a shape (from twice this many matrices on) is solved in two parts:
#: its first matrices decide for the rest as an earlier stack would. Pretrained ResNet56 (one
#: thread, medians of 30 interleaved runs): eigenvalues 45.6–47.0 ms against 49.3–49.4 ms
#: with its first stacks of pooled 16×16 and 64×64 slices solved twice (126 and 27 of them
#: recomputed in float64); the float32 route kept where it pays (32×32: 36 of 153). Only the
#: cost depends on it: each matrix is still checked, or solved in float64.
AUTO_PROBE = 4
#: ``auto`` solves Gram matrices up to this size in float64 directly: on the CPU a float64
#: stack costs 1.1–1.4× a float32 one (one thread: 162 of 16×16 2.24 vs 1.87 ms, 153 of 32×32
#: 7.57 vs 5.48 ms, 153 of 64×64 25.9 vs 22.8 ms) and pretrained weights send many of them to
#: float64 anyway (ResNet56: 126 of its first 162 16×16 slices, 27 of 36 64×64). Its whole
#: analysis, two threads, medians of 15 interleaved runs: 70.7 → 61.8 ms (eigenvalues alone 42.9 →
#: 41.1 ms); a ResNet-18-like model's (mostly on the LAPACK route) unchanged, 332 vs 334 ms.
AUTO_F64_MAX = 64


def _eig_gram_torch(mats: torch.Tensor, precision: str,
                    direct: dict[tuple[int, ...], bool] | None = None) -> torch.Tensor:
    """PyTorch's batched route: one ``bmm`` and one batched ``eigvalsh`` per stack.

    In ``auto`` precision Gram matrices up to :data:`AUTO_F64_MAX` are solved in float64.
    ``direct`` (``auto`` only) records, per matrix shape, whether earlier stacks of that
    shape were mostly recomputed in float64 (:data:`AUTO_DIRECT`); this stack then skips
    the float32 pass. The first stack of a shape is solved as :data:`AUTO_PROBE` matrices, then
    the rest. Stacks of one shape must be solved in order (one thread).
    """
    shape = tuple(mats.shape[1:])
    if precision == "auto" and mats.shape[2] <= AUTO_F64_MAX:
        precision = "float64"
    if (precision == "auto" and direct is not None and shape not in direct and not mats.is_cuda
            and mats.dtype != torch.float64 and mats.shape[0] >= 2 * AUTO_PROBE):
        head = _eig_gram_torch(mats[:AUTO_PROBE], precision, direct)  # (decides direct[shape])
        return torch.cat([head, _eig_gram_torch(mats[AUTO_PROBE:], precision, direct)])
    if (precision == "float64" or mats.dtype == torch.float64 or (precision == "auto" and mats.is_cuda)
            or (direct is not None and direct.get(shape, False))):
        x = mats.to(torch.float64)
        return torch.linalg.eigvalsh(x.mT @ x)
    x = mats.to(torch.float32)
    ev = torch.linalg.eigvalsh(x.mT @ x).to(torch.float64)
    if precision == "auto":
        lmax = ev[:, -1].clamp_min(0)
        k = min(ev.shape[1] - 1, int(AUTO_FRACTION * ev.shape[1]))
        bad = ev[:, k] < AUTO_COND * lmax  # ev ascending: more than k values below the bar
        n_bad = int(bad.sum())
        if n_bad:
            x64 = mats[bad].to(torch.float64)
            ev[bad] = torch.linalg.eigvalsh(x64.mT @ x64)
        if direct is not None:
            direct[shape] = n_bad > AUTO_DIRECT * ev.shape[0]
    return ev


def _as_numpy(mats: torch.Tensor) -> np.ndarray:
    x = mats.detach()
    return (x if x.dtype in (torch.float32, torch.float64) else x.float()).numpy()


def uses_lapack(mats: torch.Tensor) -> bool:
    """Whether a ``(B, n, m)`` stack (``n ≥ m``) takes the CPU LAPACK route."""
    return mats.device.type == "cpu" and mats.shape[2] >= LAPACK_MIN and cpu_backend() == "lapack"


def eigvals_stacks(stacks: list[torch.Tensor], precision: str = "auto",
                   done: Callable[[int, torch.Tensor], None] | None = None,
                   stream: TorchStream | None = None) -> list[torch.Tensor]:
    """Eigenvalues of ``XᵀX`` for several stacks of matrices in one call.

    Parameters
    ----------
    stacks : list of Tensor
        Each ``(B, n, m)``; shapes may differ between stacks.
    precision : {"auto", "float32", "float64"}
        See the module docstring.
    done : callable, optional
        ``done(i, eigenvalues)`` as soon as stack ``i`` is complete (the same values as
        returned), possibly from a worker thread while other stacks are still being solved:
        work on finished stacks (``analyze`` fits their power laws there) overlaps the
        eigen-solves of the others.
    stream : TorchStream, optional
        Solve the stacks of PyTorch's route through this stream (holding nothing yet; its
        float64 decisions carry over from earlier stacks), instead of a new one.

    Returns
    -------
    list of Tensor
        ``(B, min(n, m))`` float64 on the CPU or the stack's device, ascending, clipped at 0.
        On the CPU's LAPACK route the matrices of all stacks are shared out among the
        allowed threads (:func:`_lapack_stacks`).
    """
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision '{precision}'; choose one of {', '.join(PRECISIONS)}")
    oriented = []
    for mats in stacks:
        if mats.ndim != 3:
            raise InputError(f"expected a (B, n, m) stack of matrices, got shape {tuple(mats.shape)}")
        oriented.append(mats.mT if mats.shape[1] < mats.shape[2] else mats)
    out: list[torch.Tensor | None] = [None] * len(oriented)
    lapack = [i for i, m in enumerate(oriented) if uses_lapack(m)]
    if lapack:
        # (from this thread, and never beside PyTorch's route: PyTorch's stacks solved beside
        # the LAPACK workers, or the LAPACK route started from a worker thread, made the solves
        # ~10× slower, ResNet-18-like 0.34 → 3.3 s; PyTorch's stacks first gained nothing)
        arrays = [_as_numpy(oriented[i]) for i in lapack]
        on = None if done is None else (lambda j, ev: done(lapack[j], torch.from_numpy(ev)))
        for i, ev in zip(lapack, _lapack_stacks(arrays, precision, on), strict=True):
            out[i] = torch.from_numpy(ev)
    rest = [i for i in range(len(oriented)) if out[i] is None]
    # with ``done`` a worker solves the next stack while this thread runs ``done`` on the last
    if stream is None:
        stream = TorchStream(precision, threaded=done is not None and len(rest) > 1)
    for i in rest:
        stream.submit(oriented[i], i)

    def finish(i: int, ev: torch.Tensor) -> None:
        out[i] = ev
        if done is not None:
            done(i, ev)

    stream.collect(finish)
    return [ev.clamp_min_(0.0) for ev in out if ev is not None]


class TorchStream:
    """PyTorch's batched route, stack by stack, in submission order, beside the caller.

    :meth:`submit` hands a stack to one worker thread (when more than one thread is allowed)
    and returns at once; :meth:`collect` passes the stacks' eigenvalues to a callback in
    submission order as they finish. ``analyze`` submits stacks while it still prepares later
    layers and fits them in :meth:`collect` while the worker solves the next. Stacks of one shape go
    through one thread in order, so ``auto``'s float64 decision (:data:`AUTO_DIRECT`) depends
    on the model only, never on timing. Never run beside the LAPACK route's workers
    (:func:`eigvals_stacks`).

    Parameters
    ----------
    precision : {"auto", "float32", "float64"}
        See the module docstring.
    threaded : bool
        Solve in a worker thread when more than one thread is allowed; otherwise each stack
        is solved here, in :meth:`collect`.
    """

    def __init__(self, precision: str, threaded: bool = True) -> None:
        self.precision = precision
        self.threaded = threaded and torch.get_num_threads() > 1
        self.direct: dict[tuple[int, ...], bool] = {}
        self.queue: deque[tuple[Future[torch.Tensor] | None, Callable[[], torch.Tensor], object]] = deque()

    def submit(self, mats: torch.Tensor | Callable[[], torch.Tensor], tag: object) -> None:
        """Queue a ``(B, n, m)`` stack, or a function that builds it (run in the worker, so
        that a ``torch.cat`` of many layers does not start a second OpenMP team here)."""
        def solve() -> torch.Tensor:
            x = mats() if callable(mats) else mats
            x = x.mT if x.shape[1] < x.shape[2] else x
            return _eig_gram_torch(x, self.precision, self.direct).clamp_min_(0.0)

        fut = None
        if self.threaded:
            from nndiag._utils.threads import worker_pool

            fut = worker_pool(1).submit(solve)
        self.queue.append((fut, solve, tag))

    def collect(self, done: Callable[[object, torch.Tensor], None]) -> None:
        """``done(tag, eigenvalues)`` for every stack, in submission order, each as soon as it
        is solved (the queue is empty on return)."""
        while self.queue:
            fut, solve, tag = self.queue.popleft()
            done(tag, solve() if fut is None else fut.result())


def eigvals_batched(mats: torch.Tensor, precision: str = "auto") -> torch.Tensor:
    """Eigenvalues of ``XᵀX`` for a stack of matrices.

    Parameters
    ----------
    mats : Tensor
        ``(B, n, m)`` with ``n ≥ m`` (any float dtype, any device).
    precision : {"auto", "float32", "float64"}
        See the module docstring.

    Returns
    -------
    Tensor
        ``(B, m)`` float64, ascending, clipped at 0 (tiny negative rounding removed).
    """
    return eigvals_stacks([mats], precision)[0]


def esd(W: torch.Tensor | np.ndarray, *, conv_mode: str = "ww", precision: str = "float64",
        scale: float = 1.0) -> np.ndarray:
    """Eigenvalues of ``WᵀW`` for one weight (pooled over kernel positions for convolutions).

    Parameters
    ----------
    W : Tensor or ndarray
        A 2-D matrix or a 3-/4-/5-D convolution kernel ``(out, in, *k)``.
    conv_mode : {"ww", "unfold"}
        ``ww``: one ``out × in`` matrix per kernel position, eigenvalues pooled;
        ``unfold``: the ``out × (in·k…)`` matrix.
    precision : {"auto", "float32", "float64"}
        See the module docstring.
    scale : float
        Multiply the eigenvalues by this (WeightWatcher conventions use 0.5 for conv2d).

    Returns
    -------
    ndarray
        Sorted ascending, float64; ``min(shape)`` (× kernel positions) values.

    Examples
    --------
    >>> import numpy as np
    >>> W = np.random.default_rng(0).normal(size=(50, 20))
    >>> ev = esd(W)
    >>> bool(np.allclose(ev, np.sort(np.linalg.svd(W, compute_uv=False) ** 2)))
    True
    """
    t = torch.as_tensor(W)
    if not torch.is_floating_point(t):
        t = t.to(torch.float64)
    if t.ndim == 2:
        mats = t[None]
    elif t.ndim in (3, 4, 5):
        out, inp = t.shape[0], t.shape[1]
        if conv_mode == "ww":
            mats = t.reshape(out, inp, -1).permute(2, 0, 1)
        elif conv_mode == "unfold":
            mats = t.reshape(out, -1)[None]
        else:
            raise InputError(f"unknown conv_mode '{conv_mode}'; choose ww or unfold")
    else:
        raise InputError(f"esd needs a 2-D to 5-D weight, got shape {tuple(t.shape)}")
    if t.dtype in (torch.float16, torch.bfloat16):
        mats = mats.float()
    if not bool(torch.isfinite(mats).all()):
        raise InputError(f"esd: the weight (shape {tuple(t.shape)}) has NaN or Inf entries")
    ev = eigvals_batched(mats, precision).reshape(-1).cpu().numpy()
    return np.sort(ev) * scale
