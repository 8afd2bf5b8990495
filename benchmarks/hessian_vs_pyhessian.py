"""nndiag vs PyHessian 0.1: top-1 / top-5 eigenvalues, trace and density, same data, one process.

For each model, a tight reference (nndiag Lanczos to residual 1e-7; exact trace through
the identity basis for small models, else Hutch++ to a 0.2% standard error) is computed
first (cached in ``--ref-cache``); then PyHessian and nndiag run at their usual tolerance
(PyHessian tol 1e-3 on the relative change of the estimate; nndiag tol 1e-3 on the relative
Lanczos residual) and both are checked against the reference. For the trace, nndiag is
asked for the relative standard error that PyHessian's own samples give (std/√n of its
Hutchinson probes), i.e. the same statistical accuracy; both realised errors are printed
too. Times include building the gradient graph; medians of ``--repeats`` runs. PyHessian
takes the examples as one batch (its ``data=(x, y)`` mode); nndiag uses its default batch
size (eval mode on a CPU: batches whose activations stay under 4 MiB,
:mod:`nndiag.landscape.blocking`; the same loss, so the same Hessian).

Usage::

    python benchmarks/hessian_vs_pyhessian.py --models mlp,cnn --repeats 3
    python benchmarks/hessian_vs_pyhessian.py --models resnet20 --resnet-samples 512 --repeats 1

Needs ``pip install 'nndiag[bench]'`` (PyHessian) and, for ResNet20, ../shared.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from nndiag._utils.seeding import fork_rng
from nndiag._utils.threads import limit_threads
from nndiag.landscape import HessianOperator, eigsh, exact_trace, hessian_spectrum, hutchpp


def _models(names: list[str], n: int, resnet_n: int) -> list[tuple[str, torch.nn.Module, torch.Tensor, torch.Tensor]]:
    from nndiag._utils.training import train_classifier
    from nndiag.io.data import load_data
    from nndiag.models import build_model

    out = []
    digits = load_data("digits?split=train")
    for name in names:
        if name in ("mlp", "cnn"):
            with fork_rng(0):
                m = build_model("digits-mlp", hidden=100) if name == "mlp" else build_model("digits-cnn")
            train_classifier(m, digits, epochs=100, max_steps=300, lr=0.05, seed=0, progress=False)
            d = digits.subset(n, seed=1)
            out.append((f"digits-{name}", m.eval(), d.x, d.y))
        elif name == "resnet20":
            from nndiag._utils.shared import shared_path
            from nndiag.io.models import load_model

            ck, data = shared_path("models", "cifar10_resnet20.th"), shared_path("data", "cifar10_test_5k.npz")
            if ck is None or data is None:
                print("resnet20: ../shared assets missing, skipped")
                continue
            m = load_model(str(ck), arch="resnet20").module
            d = load_data(f"{data}?normalize=imagenet", n_samples=resnet_n, seed=0)
            out.append(("resnet20", m.eval(), d.x, d.y))
        else:
            raise SystemExit(f"unknown model {name}; choose mlp, cnn, resnet20")
    return out


class _Counter:
    """Counts PyHessian's Hessian-vector products (wraps its module-level function)."""

    def __init__(self) -> None:
        import importlib

        ph = importlib.import_module("pyhessian.hessian")  # the module, not the class of that name
        self.ph, self.orig, self.n = ph, ph.hessian_vector_product, 0

        def counted(*a, **k):
            self.n += 1
            return self.orig(*a, **k)

        ph.hessian_vector_product = counted

    def restore(self) -> None:
        self.ph.hessian_vector_product = self.orig


def _pyhessian(model, x, y, what: str, seed: int, tol: float = 1e-3) -> tuple[float, object, int]:
    from pyhessian import hessian

    m = copy.deepcopy(model)
    cnt = _Counter()
    try:
        torch.manual_seed(seed)  # PyHessian draws from the global RNG
        t = time.perf_counter()
        h = hessian(m, F.cross_entropy, data=(x, y), cuda=False)
        if what == "top1":
            val = h.eigenvalues(top_n=1, tol=1e-3, maxIter=100)[0]
        elif what == "top5":
            val = h.eigenvalues(top_n=5, tol=1e-3, maxIter=100)[0]
        elif what == "trace":
            val = h.trace(maxIter=100, tol=tol)
        else:
            val = h.density(iter=30, n_v=1)
        return time.perf_counter() - t, val, cnt.n
    finally:
        cnt.restore()


def _trace_rows(args, rows, name, model, x, y, ref_trace, ph_tol) -> None:
    """Trace: nndiag is asked for the relative standard error PyHessian's own samples give."""
    pt, pe, ph_ns, ph_se = [], [], [], []
    for r in range(args.repeats):
        tp, samples, ph_n = _pyhessian(model, x, y, "trace", seed=r, tol=ph_tol)
        val = float(np.mean(samples))
        pt.append(tp)
        pe.append(abs(val - ref_trace) / abs(ref_trace))
        ph_ns.append(ph_n)
        ph_se.append(float(np.std(samples, ddof=1) / np.sqrt(len(samples)) / abs(val)))
    target = _median(ph_se)
    nt, ne, nd_ns, nd_se = [], [], [], []
    for r in range(args.repeats):
        t0 = time.perf_counter()
        res = hessian_spectrum(model, (x, y), top_k=0, trace=True, trace_method=args.trace_method,
                               trace_rtol=target, trace_probes=1000, seed=r,
                               threads=args.threads)
        nt.append(time.perf_counter() - t0)
        ne.append(abs(res.trace - ref_trace) / abs(ref_trace))
        nd_ns.append(res.trace_estimate.n_matvec)  # products, or probes of the split estimator
        nd_se.append(res.trace_stderr / abs(res.trace))
    row = {"model": name, "task": f"trace (PyHessian tol {ph_tol:g})", "pyhessian_s": _median(pt),
           "nndiag_s": _median(nt),
           "ratio": _median(nt) / _median(pt), "pyhessian_rel_err": _median(pe), "nndiag_rel_err": _median(ne),
           "pyhessian_rel_se": target, "nndiag_rel_se": _median(nd_se),
           "pyhessian_hvp": int(_median(ph_ns)), "nndiag_hvp": int(_median(nd_ns))}
    rows.append(row)
    print(f"trace, PyHessian tol {ph_tol:g}: PyHessian {row['pyhessian_s']:.3f} s ({row['pyhessian_hvp']} HVP, "
          f"rel.s.e. {target:.1e}, "
          f"rel.err {row['pyhessian_rel_err']:.1e}) | nndiag {args.trace_method} {row['nndiag_s']:.3f} s "
          f"({row['nndiag_hvp']} products/probes, rel.s.e. {row['nndiag_rel_se']:.1e}, "
          f"rel.err {row['nndiag_rel_err']:.1e})"
          f" | ratio {row['ratio']:.2f}")


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def run(args: argparse.Namespace) -> list[dict]:
    rows = []
    for name, model, x, y in _models(args.models.split(","), args.samples, args.resnet_samples):
        dim = sum(p.numel() for p in model.parameters())
        print(f"\n== {name}: {dim:,} parameters, {len(y)} samples, {args.threads} thread(s)")
        # --- references (cached: the exact trace of the MLP takes minutes) ----------------
        cache = Path(args.ref_cache) / f"ref_{name}_{len(y)}.json" if args.ref_cache else None
        if cache is not None and cache.exists():
            c = json.loads(cache.read_text())
            ref_top, ref_trace, ref_note = np.asarray(c["top5"]), c["trace"], c["note"] + " (cached)"
        else:
            t = time.perf_counter()
            op = HessianOperator(model, (x, y))
            ref = eigsh(op.matvec, op.dim, top_k=5, tol=1e-7, max_iter=args.ref_iter,
                        generator=torch.Generator().manual_seed(123), vectors=False)
            if dim <= args.exact_trace_max:
                ref_tr = exact_trace(op.matmat, op.dim, block=64)
            else:
                ref_tr = hutchpp(op.matmat, op.dim, sketch=40, n_probes=2000, rtol=args.ref_trace_rtol,
                                 generator=torch.Generator().manual_seed(321))
            del op
            ref_top, ref_trace = ref.eigenvalues, ref_tr.value
            ref_note = (f"Lanczos residual ≤ {ref.residuals.max():.1e}; trace {ref_tr.method} "
                        f"s.e. {ref_tr.stderr:.2g}; {time.perf_counter() - t:.0f} s")
            if cache is not None:
                cache.parent.mkdir(parents=True, exist_ok=True)
                cache.write_text(json.dumps({"top5": ref_top.tolist(), "trace": ref_trace, "note": ref_note}))
        print(f"reference: top-5 {np.round(ref_top, 5).tolist()}, trace {ref_trace:.5g} ({ref_note})")
        # --- eigenvalues ----------------------------------------------------------------
        for what, k in (("top1", 1), ("top5", 5)):
            if what not in args.tasks:
                continue
            pt, pe, nt, ne, ph_n, nd_n = [], [], [], [], 0, 0
            for r in range(args.repeats):
                tp, vals, ph_n = _pyhessian(model, x, y, what, seed=r)
                pt.append(tp)
                pe.append(float(np.max(np.abs(np.sort(vals)[::-1] - ref_top[:k]) / np.abs(ref_top[:k]))))
                t0 = time.perf_counter()
                res = hessian_spectrum(model, (x, y), top_k=k, tol=1e-3, seed=r,
                                       threads=args.threads)
                nt.append(time.perf_counter() - t0)
                ne.append(float(np.max(np.abs(res.eigenvalues - ref_top[:k]) / np.abs(ref_top[:k]))))
                nd_n = res.n_hvp
            row = {"model": name, "task": what, "pyhessian_s": _median(pt), "nndiag_s": _median(nt),
                   "ratio": _median(nt) / _median(pt), "pyhessian_rel_err": _median(pe),
                   "nndiag_rel_err": _median(ne), "pyhessian_hvp": ph_n, "nndiag_hvp": nd_n}
            rows.append(row)
            print(f"{what}: PyHessian {row['pyhessian_s']:.3f} s ({ph_n} HVP, rel.err {row['pyhessian_rel_err']:.1e})"
                  f" | nndiag {row['nndiag_s']:.3f} s ({nd_n} HVP, rel.err {row['nndiag_rel_err']:.1e})"
                  f" | ratio nndiag/PyHessian {row['ratio']:.2f}")
        # --- trace: nndiag is asked for PyHessian's own standard error ---------------------
        for ph_tol in [float(t) for t in args.trace_tols.split(",")] if "trace" in args.tasks else []:
            _trace_rows(args, rows, name, model, x, y, ref_trace, ph_tol)
        if "density" not in args.tasks:
            continue
        # --- density --------------------------------------------------------------------
        try:
            tp, _, _ = _pyhessian(model, x, y, "density", seed=0)
            ph_density = f"ok in {tp:.2f} s"
        except Exception as exc:  # the released version calls the removed torch.eig
            ph_density = f"fails: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
        t0 = time.perf_counter()
        res = hessian_spectrum(model, (x, y), top_k=0, density=True, slq_runs=1, slq_steps=30,
                               threads=args.threads)
        nd = time.perf_counter() - t0
        crit = {k: round(res.criteria[k], 4) for k in ("re", "Kh", "Ct")}
        rows.append({"model": name, "task": "density", "pyhessian": ph_density, "nndiag_s": nd, "criteria": crit})
        print(f"density (SLQ, 1 run × 30 steps): PyHessian {ph_density} | nndiag {nd:.2f} s, criteria {crit}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="mlp,cnn,resnet20")
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--resnet-samples", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ref-iter", type=int, default=300)
    ap.add_argument("--exact-trace-max", type=int, default=20_000)
    ap.add_argument("--ref-trace-rtol", type=float, default=2e-3, help="Standard error of the reference trace.")
    ap.add_argument("--ref-cache", default=None, help="Folder caching the tight references.")
    ap.add_argument("--tasks", default="top1,top5,trace,density")
    ap.add_argument("--trace-tols", default="1e-3", help="PyHessian trace tolerances to compare at.")
    ap.add_argument("--trace-method", default="auto", choices=["auto", "split", "hutchpp", "xtrace", "hutchinson"])
    ap.add_argument("--json", default=None, help="Also write the rows as JSON.")
    args = ap.parse_args()
    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, torch {torch.__version__}")
    with limit_threads(args.threads):
        rows = run(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
