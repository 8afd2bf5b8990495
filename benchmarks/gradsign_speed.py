"""GradSign: reference per-sample loop vs nndiag's fast path, and the fast path's memory.

One process, the same thread count for both (``--threads``; 2 = this machine's cores), the
same networks and batch for both: 20 randomly sampled NB201
architectures (C=16, N=5, default initialisation, seeded), a batch of 64 images of the
shared CIFAR-10 training subset (CIFAR normalisation). Prints each architecture's loop and
fast times (median of ``--repeats``), whether the integer scores agree, and the ratio. Then,
in fresh subprocesses, the peak resident memory of the fast path at batch 64 and 256 with
the default chunking and with chunking switched off (one chunk = the whole batch).

Usage::

    python benchmarks/gradsign_speed.py --archs 20 --batch-size 64 --repeats 3 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

_MEM_CHILD = r"""
import os, sys, threading, time, torch
from nndiag._utils.threads import limit_threads
from nndiag.models.nb201 import nb201
from nndiag.zerocost.gradsign import gradsign
arch, batch, chunk = sys.argv[1], int(sys.argv[2]), sys.argv[3]
page = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * page
torch.manual_seed(0)
net = nb201(arch)
x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
peak, stop = [0], [False]
def watch():
    while not stop[0]:
        peak[0] = max(peak[0], rss())
        time.sleep(0.002)
with limit_threads(1):
    gradsign(net, x[:2], y[:2])
    base = rss()
    t = threading.Thread(target=watch, daemon=True)
    t.start()
    gradsign(net, x, y, chunk_size=None if chunk == "auto" else int(chunk))
    stop[0] = True
    t.join()
print((max(peak[0], rss()) - base) / 2**20)
"""


def _peak_mb(arch: str, batch: int, chunk: str) -> float:
    out = subprocess.run([sys.executable, "-c", _MEM_CHILD, arch, str(batch), chunk],
                         capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    import torch

    from nndiag._utils.seeding import fork_rng
    from nndiag._utils.shared import shared_path
    from nndiag._utils.threads import limit_threads
    from nndiag.models.nb201 import nb201
    from nndiag.zerocost.evaluate import batch_from
    from nndiag.zerocost.gradsign import auto_chunk_size, gradsign_detail
    from nndiag.zerocost.nb201 import all_archs

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="BLAS/OpenMP threads for both paths")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--memory-only", action="store_true")
    args = ap.parse_args(argv)
    data = shared_path("data", "cifar10_train_5k.npz")
    if data is not None:
        x, y, _, _ = batch_from(f"{data}?normalize=cifar", args.batch_size, args.seed)
        src = "CIFAR-10 train_5k (JPEG subset)"
    else:
        g = torch.Generator().manual_seed(args.seed)
        x, y = torch.randn(args.batch_size, 3, 32, 32, generator=g), torch.randint(0, 10, (args.batch_size,))
        src = "Gaussian images (shared data absent)"
    import numpy as np

    archs = [all_archs()[i] for i in np.random.default_rng(args.seed).permutation(15625)[: args.archs]]
    print(f"torch {torch.__version__}, {args.threads} thread(s), batch {args.batch_size} of {src}, "
          f"median of {args.repeats}")
    ratios, t_loop_all, t_fast_all, agree = [], [], [], 0
    with limit_threads(args.threads):
        for i, arch in enumerate(archs if not args.memory_only else []):
            with fork_rng(args.seed):
                net = nb201(arch)
            gradsign_detail(net, x[:2], y[:2])  # warm-up
            tl, tf = [], []
            for _ in range(args.repeats):
                t = time.perf_counter()
                a = gradsign_detail(net, x, y, method="loop")
                tl.append(time.perf_counter() - t)
                t = time.perf_counter()
                b = gradsign_detail(net, x, y, method="fast", track_zero=False)
                tf.append(time.perf_counter() - t)
            ml, mf = statistics.median(tl), statistics.median(tf)
            same = a.tau == b.tau
            agree += same
            rel = abs(a.tau - b.tau) / max(a.tau, 1)
            ratios.append(ml / mf)
            t_loop_all.append(ml)
            t_fast_all.append(mf)
            print(f"{i:2d} loop {ml:6.2f} s  fast {mf:6.2f} s  ratio {ml / mf:4.2f}  "
                  f"tau {a.tau} vs {b.tau} ({'same' if same else f'rel. diff {rel:.1e}'})  {arch}")
    if not args.memory_only:
        print(f"total loop {sum(t_loop_all):.1f} s, fast {sum(t_fast_all):.1f} s, "
              f"ratio of totals {sum(t_loop_all) / sum(t_fast_all):.2f}, median ratio "
              f"{statistics.median(ratios):.2f}; identical integer score on {agree}/{len(archs)}")
    if not args.no_memory:
        big = "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|nor_conv_3x3~0|nor_conv_3x3~1|nor_conv_3x3~2|"
        n_w = sum(m.weight.numel() for m in nb201(big).modules()
                  if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
        print(f"peak resident memory above the pre-call level, fast path, largest NB201 network "
              f"({n_w:,} scored weights, auto chunk = {auto_chunk_size(n_w)} samples):")
        for batch in (64, 256):
            for chunk in ("auto", str(batch)):
                label = "auto chunks" if chunk == "auto" else "one chunk "
                print(f"  batch {batch:3d}, {label}: {_peak_mb(big, batch, chunk):7.0f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
