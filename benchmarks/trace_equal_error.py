"""Trace at equal *realised* accuracy: PyHessian's default stopping vs nndiag at fixed budgets.

PyHessian's ``trace()`` stops when the running mean changes by less than ``tol`` (1e-3 by
default), after a random number of probes. Over ``--seeds`` seeds this script records its
products, seconds and realised relative error against a tight reference (the same references
as ``hessian_vs_pyhessian.py``: the exact trace through the identity basis for the MLP,
Hutch++ to a 0.2 % standard error otherwise). nndiag then runs ``trace_method`` (XTrace by
default) with fixed budgets of products on the same seeds; the smallest budget whose mean
realised error is at most PyHessian's is "equal accuracy", and the ratio of mean seconds is
printed. One process, same data, same thread settings.

Usage::

    python benchmarks/trace_equal_error.py --models mlp,cnn --seeds 10 --threads 2
    python benchmarks/trace_equal_error.py --models resnet20 --samples 128 --seeds 8 --ref-rtol 5e-3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv: list[str] | None = None) -> int:
    from hessian_vs_pyhessian import _models, _pyhessian
    from nndiag._utils.threads import limit_threads
    from nndiag.landscape import HessianOperator, exact_trace, hessian_spectrum, hutchpp

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mlp,cnn")
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--budgets", default="8,12,16,20,24", help="nndiag products per estimate")
    ap.add_argument("--method", default="xtrace", choices=["xtrace", "hutchinson", "split"],
                    help="split: budgets count probes of both kinds (parameter- and output-space)")
    ap.add_argument("--exact-trace-max", type=int, default=20_000)
    ap.add_argument("--ref-rtol", type=float, default=2e-3,
                    help="relative standard error of the Hutch++ reference (models too big for the exact trace)")
    args = ap.parse_args(argv)
    budgets = [int(b) for b in args.budgets.split(",")]
    with limit_threads(args.threads):
        for name, model, x, y in _models(args.models.split(","), args.samples, args.samples):
            op = HessianOperator(model, (x, y))
            t = time.perf_counter()
            if op.dim <= args.exact_trace_max:
                ref = exact_trace(op.matmat, op.dim, block=64)
            else:
                ref = hutchpp(op.matmat, op.dim, sketch=40, n_probes=2000, rtol=args.ref_rtol,
                              generator=torch.Generator().manual_seed(321))
            print(f"\n== {name}: {op.dim:,} parameters, {len(y)} samples; reference trace {ref.value:.6g} "
                  f"({ref.method}, s.e. {ref.stderr:.2g}, {time.perf_counter() - t:.0f} s)")
            del op
            ph_t, ph_e, ph_n = [], [], []
            for s in range(args.seeds):
                tp, vals, n = _pyhessian(model, x, y, "trace", seed=s)
                ph_t.append(tp)
                ph_e.append(abs(float(np.mean(vals)) - ref.value) / abs(ref.value))
                ph_n.append(n)
            pt, pe = statistics.mean(ph_t), statistics.mean(ph_e)
            print(f"PyHessian default (tol 1e-3): mean {pt:.3f} s, {statistics.mean(ph_n):.1f} products "
                  f"(min {min(ph_n)}, max {max(ph_n)}), mean rel. error {pe:.4f} "
                  f"(median {statistics.median(ph_e):.4f})")
            chosen = None
            for b in budgets:
                probes = b // 2 if args.method == "xtrace" else b
                nt, ne, nh = [], [], []
                for s in range(args.seeds):
                    t0 = time.perf_counter()
                    r = hessian_spectrum(model, (x, y), top_k=0, trace=True, trace_method=args.method, trace_rtol=None,
                                         trace_probes=probes, seed=s, threads=args.threads)
                    nt.append(time.perf_counter() - t0)
                    ne.append(abs(r.trace - ref.value) / abs(ref.value))
                    nh.append(r.n_hvp)
                mt, me = statistics.mean(nt), statistics.mean(ne)
                mark = ""
                if chosen is None and me <= pe:
                    chosen, mark = b, "  <- equal accuracy"
                what = f"{b} probes" if args.method == "split" else f"{statistics.mean(nh):.0f} products"
                print(f"nndiag {args.method}, {what}: mean {mt:.3f} s, mean rel. error "
                      f"{me:.4f} (median {statistics.median(ne):.4f}), time ratio nndiag/PyHessian {mt / pt:.2f}{mark}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
