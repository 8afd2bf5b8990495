"""How much memory an analysis may take for its stored vectors (Lanczos bases, sketches).

Krylov methods keep parameter-sized vectors: full reorthogonalisation stores every Lanczos
vector, so 100 steps on a 124M-parameter model (GPT-2 small, float32) want 50 GB. The
analyses ask :func:`vectors_that_fit` how many vectors of their size fit in a share of the
memory available now, and restart (:func:`nndiag.landscape.lanczos.eigsh`) or
reorthogonalise against a window (:func:`nndiag.landscape.density.slq`) beyond it.
"""

from __future__ import annotations

import os

import torch

from nndiag._utils.env import env_count

#: Share of the memory available when an analysis starts that its stored vectors may take.
BASIS_FRACTION = 0.25
#: Assumed available memory where it cannot be read (no /proc/meminfo, no CUDA query).
FALLBACK_BYTES = 8 << 30


def available_bytes(device: torch.device | str = "cpu") -> int:
    """Memory available for new allocations on ``device``, in bytes.

    CPU: ``MemAvailable`` of ``/proc/meminfo`` (what the kernel can hand out without
    swapping), else free pages; CUDA: the driver's free memory on that device.
    """
    device = torch.device(device)
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except (RuntimeError, AssertionError):  # pragma: no cover - no driver
            return FALLBACK_BYTES
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return FALLBACK_BYTES


def vectors_that_fit(dim: int, dtype: torch.dtype, device: torch.device | str = "cpu",
                     fraction: float = BASIS_FRACTION) -> int:
    """How many vectors of ``dim`` entries of ``dtype`` fit in ``fraction`` of the available memory.

    ``NNDIAG_MAX_BASIS`` (a vector count) overrides the estimate, for tests and for users
    who know better.
    """
    env = env_count("NNDIAG_MAX_BASIS")
    if env is not None:
        return env
    per = max(1, int(dim) * torch.empty((), dtype=dtype).element_size())
    return int(available_bytes(device) * fraction // per)
