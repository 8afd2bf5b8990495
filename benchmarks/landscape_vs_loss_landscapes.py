"""nndiag vs loss-landscapes 3.0.6: a 21×21 filter-normalised random plane, same batch, one process.

Both evaluate 441 grid points of the mean cross-entropy on the same fixed batch
(the digits CNN on 512 images by default; ``--model resnet20`` takes the pretrained
CIFAR-10 ResNet20 and CIFAR test images from ../shared), single-threaded unless
``--threads``; medians of ``--repeats`` interleaved runs. loss-landscapes edits the model
it is given, so it gets a deep copy. nndiag runs with its defaults (batch size chosen by
:mod:`nndiag.landscape.blocking`; the size used is printed).

Usage::

    python benchmarks/landscape_vs_loss_landscapes.py --repeats 3
    python benchmarks/landscape_vs_loss_landscapes.py --model resnet20 --steps 11 --repeats 1 --threads 2
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from nndiag._utils.seeding import fork_rng
from nndiag._utils.threads import limit_threads
from nndiag.landscape import surface

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="digits-cnn")
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--steps", type=int, default=21)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (both tools on that device)")
    ap.add_argument("--ieee", action="store_true",
                    help="CUDA: run loss-landscapes without TF32 too (nndiag always computes in IEEE float32)")
    args = ap.parse_args()

    import loss_landscapes
    import loss_landscapes.metrics

    from hessian_vs_pyhessian import _models
    from nndiag._utils.training import train_classifier
    from nndiag.io.data import load_data
    from nndiag.models import build_model

    print(f"machine: {platform.platform()}, torch {torch.__version__}, {args.threads} thread(s)")
    if args.model == "resnet20":
        found = _models(["resnet20"], args.samples, args.samples)
        if not found:
            return
        _, model, x, y = found[0]
    else:
        digits = load_data("digits?split=train")
        with fork_rng(0):
            model = build_model(args.model)
        train_classifier(model, digits, epochs=100, max_steps=300, lr=0.05, seed=0, progress=False)
        model.eval()
        d = digits.subset(args.samples, seed=1)
        x, y = d.x, d.y
    dev = torch.device(args.device)
    model, x, y = model.to(dev), x.to(dev), y.to(dev)
    if dev.type == "cuda":
        print(f"device: {torch.cuda.get_device_name(dev)}")
    n_par = sum(p.numel() for p in model.parameters())
    print(f"{args.model}: {n_par:,} parameters, {len(y)} samples, {args.steps}×{args.steps} plane")
    ll_t, nd_t, strategies = [], [], []
    from nndiag._utils.precision import ieee_float32

    with limit_threads(args.threads), ieee_float32() if args.ieee else contextlib.nullcontext():
        metric = loss_landscapes.metrics.Loss(F.cross_entropy, x, y)
        for r in range(args.repeats):
            m = copy.deepcopy(model)
            t = time.perf_counter()
            # loss-landscapes draws its directions with torch.randn on the default device and
            # fails for a CUDA model ("found at least two devices"): run it with CUDA as default
            with dev if dev.type == "cuda" else contextlib.nullcontext():
                grid_ll = loss_landscapes.random_plane(m, metric, distance=1, steps=args.steps,
                                                       normalization="filter")
            ll_t.append(time.perf_counter() - t)
            t = time.perf_counter()
            s = surface(model, (x, y), dim=2, steps=args.steps, norm="filter", seed=r, threads=args.threads)
            nd_t.append(time.perf_counter() - t)
            strategies.append(s.params["strategy"])
            print(f"run {r}: loss-landscapes {ll_t[-1]:.3f} s | nndiag {nd_t[-1]:.3f} s, grid {s.timing['grid']:.3f} s "
                  f"({s.params['strategy']}, batches of {s.params['batch_size']})")
    a, b = statistics.median(ll_t), statistics.median(nd_t)
    # each run's pair ran back to back: their ratio is less exposed to a drifting host than the
    # ratio of the two medians
    paired = statistics.median(x / y for x, y in zip(ll_t, nd_t, strict=True))
    print(f"median: loss-landscapes {a:.3f} s, nndiag {b:.3f} s, speed-up {a / b:.2f}× "
          f"(median of the runs' own ratios {paired:.2f}×) "
          f"(grid ranges: loss-landscapes {np.nanmin(grid_ll):.3f}..{np.nanmax(grid_ll):.3f}, "
          f"nndiag {np.nanmin(s.losses):.3f}..{np.nanmax(s.losses):.3f}, origin {s.origin_loss:.4f})")


if __name__ == "__main__":
    main()
