"""Symmetric eigenvalues through LAPACK ``?syevd`` without holding Python's GIL.

SciPy's ``scipy.linalg.eigh`` keeps the GIL while LAPACK runs, so eigen-solvers in
several Python threads run one after another. This module calls the same LAPACK
routine (``ssyevd``/``dsyevd`` from SciPy's public ``scipy.linalg.cython_lapack``
table of function pointers) through :mod:`ctypes`, which releases the GIL for the
call: several matrices are then solved at once, one single-threaded BLAS per thread.

On the 2-core development machine OpenBLAS's own two threads made a 512×512 ``ssyevd``
*slower* than one thread, while two matrices solved side by side in two threads took
0.55–0.65 of the sequential time (measured with this module, 256² to 768² Gram matrices).

When the function table cannot be used (an unusual SciPy build), :func:`syevd_values`
falls back to ``scipy.linalg.eigh`` (same numbers, GIL held) and :data:`NOGIL` is False.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable

import numpy as np

_P = ctypes.c_void_p
_PROTO = ctypes.CFUNCTYPE(None, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P)


@functools.cache
def _routine(name: str) -> Callable[..., None] | None:
    """The ctypes function for LAPACK ``name`` (``ssyevd``/``dsyevd``), or None."""
    try:
        from scipy.linalg import cython_lapack

        capsule = cython_lapack.__pyx_capi__[name]
        get_name = ctypes.pythonapi.PyCapsule_GetName
        get_name.restype = ctypes.c_char_p
        get_name.argtypes = [ctypes.py_object]
        get_ptr = ctypes.pythonapi.PyCapsule_GetPointer
        get_ptr.restype = ctypes.c_void_p
        get_ptr.argtypes = [ctypes.py_object, ctypes.c_char_p]
        ptr = get_ptr(capsule, get_name(capsule))
    except Exception:  # noqa: BLE001 - any failure means: use scipy.linalg.eigh
        return None
    return _PROTO(ptr) if ptr else None


def _available() -> bool:
    return _routine("ssyevd") is not None and _routine("dsyevd") is not None


#: True when eigenvalues are computed without the GIL (the ctypes route works here).
NOGIL = _available()


@functools.cache
def _workspace(n: int, char: str) -> tuple[int, int]:
    """Optimal ``lwork``/``liwork`` for ``?syevd('N', 'L', n)`` (a LAPACK workspace query).

    The optimal (not the minimal ``2n+1``) workspace lets LAPACK use its blocked,
    BLAS-3 tridiagonal reduction: ~1.4× faster at n = 512.
    """
    dtype = np.float32 if char == "s" else np.float64
    a = np.zeros((n, n), dtype=dtype, order="F")
    w = np.empty(n, dtype=dtype)
    wq = np.empty(1, dtype=dtype)
    iq = np.empty(1, dtype=np.int32)
    info = _call(char, a, w, wq, -1, iq, -1)
    if info != 0:  # pragma: no cover - a query cannot fail on valid sizes
        return 2 * n + 1, 1
    return max(2 * n + 1, int(wq[0])), max(1, int(iq[0]))


def _call(char: str, a: np.ndarray, w: np.ndarray, work: np.ndarray, lwork: int,
          iwork: np.ndarray, liwork: int) -> int:
    fn = _routine(f"{char}syevd")
    assert fn is not None
    n = ctypes.c_int(a.shape[0])
    lw, liw, info = ctypes.c_int(lwork), ctypes.c_int(liwork), ctypes.c_int(0)
    jobz, uplo = ctypes.c_char(b"N"), ctypes.c_char(b"L")
    fn(ctypes.byref(jobz), ctypes.byref(uplo), ctypes.byref(n), a.ctypes.data, ctypes.byref(n),
       w.ctypes.data, work.ctypes.data, ctypes.byref(lw), iwork.ctypes.data, ctypes.byref(liw),
       ctypes.byref(info))
    return int(info.value)


def syevd_values(gram: np.ndarray) -> np.ndarray:
    """Ascending eigenvalues of a symmetric float32/float64 matrix (``?syevd``, values only).

    Parameters
    ----------
    gram : ndarray
        ``(n, n)`` symmetric; overwritten (pass a temporary).

    Returns
    -------
    ndarray
        ``(n,)`` of ``gram``'s dtype, ascending.

    Examples
    --------
    >>> import numpy as np
    >>> g = np.diag([3.0, 1.0, 2.0])
    >>> syevd_values(g.copy()).tolist()
    [1.0, 2.0, 3.0]
    """
    char = "s" if gram.dtype == np.float32 else "d"
    if not NOGIL or gram.dtype not in (np.float32, np.float64):
        from scipy.linalg import eigh

        return eigh(gram, eigvals_only=True, overwrite_a=True, check_finite=False, driver="evd")
    # symmetric: the C-ordered array read in Fortran order is its transpose, i.e. itself
    a = gram if gram.flags.c_contiguous else np.ascontiguousarray(gram)
    n = a.shape[0]
    lwork, liwork = _workspace(n, char)
    w = np.empty(n, dtype=a.dtype)
    work = np.empty(lwork, dtype=a.dtype)
    iwork = np.empty(liwork, dtype=np.int32)
    info = _call(char, a, w, work, lwork, iwork, liwork)
    if info != 0:
        raise np.linalg.LinAlgError(f"{char}syevd did not converge (info {info})")
    return w
