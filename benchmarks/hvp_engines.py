"""Hessian-vector product engines: cached double backward vs forward-over-reverse (``torch.func``).

For each model, per HVP (median of interleaved rounds, ``--probes`` vectors per call):

* ``double_backward_loop`` — nndiag's engine: the gradient graph built once
  (``autograd.grad(create_graph=True)``), one ``autograd.grad`` per probe;
* ``double_backward_batched`` — the same graph, all probes in one ``is_grads_batched`` call;
* ``fwd_over_rev_vmap`` — ``torch.func.jvp`` of ``torch.func.grad`` (recomputes the forward
  and backward for every product, in forward mode), ``vmap`` over the probes;
* ``fwd_over_rev_loop`` — the same, one probe at a time.

The rounds are interleaved (each round calls every engine once) so that a machine whose
speed drifts does not favour whichever engine ran first. The relative difference of one
product between the two engines is printed as a check.

Usage::

    python benchmarks/hvp_engines.py --models mlp,cnn --threads 2
    python benchmarks/hvp_engines.py --models resnet20 --resnet-samples 64 --probes 2 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv: list[str] | None = None) -> int:
    from torch.func import functional_call, grad, jvp, vmap

    from hessian_vs_pyhessian import _models
    from nndiag._utils.precision import ieee_float32
    from nndiag._utils.threads import limit_threads
    from nndiag.landscape import HessianOperator

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mlp,cnn")
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--resnet-samples", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--probes", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    print(f"torch {torch.__version__}, device {dev}, {args.threads} thread(s); ms per HVP, medians of "
          f"{args.rounds} interleaved rounds of {args.probes} probes")
    # TF32 off for every engine (nndiag's own methods switch it off; the torch.func ones would not)
    with limit_threads(args.threads), ieee_float32():
        for name, model, x, y in _models(args.models.split(","), args.samples, args.resnet_samples):
            model, x, y = model.to(dev), x.to(dev), y.to(dev)
            op = HessianOperator(model, (x, y), batch_size=len(y), engine="double-backward")
            params = {k: v.detach() for k, v in op.params.items()}
            bufs = op.buffers

            def loss(p: dict[str, torch.Tensor], model=model, bufs=bufs, x=x, y=y) -> torch.Tensor:
                return F.cross_entropy(functional_call(model, {**bufs, **p}, (x,)), y)

            g = grad(loss)

            def fwd_over_rev(vd: dict[str, torch.Tensor], g=g, params=params) -> dict[str, torch.Tensor]:
                return jvp(g, (params,), (vd,))[1]

            V = torch.randn(args.probes, op.dim, generator=torch.Generator().manual_seed(0)).to(dev)
            vds = [op.unflatten(v) for v in V]
            stacked = {k: torch.stack([vd[k] for vd in vds]) for k in vds[0]}
            engines = {
                "double_backward_loop": lambda op=op, V=V: op.matmat(V, batched=False),
                "double_backward_batched": lambda op=op, V=V: op.matmat(V, batched=True),
                "fwd_over_rev_vmap": lambda f=fwd_over_rev, s=stacked: vmap(f)(s),
                "fwd_over_rev_loop": lambda f=fwd_over_rev, vds=vds: [f(vd) for vd in vds],
            }
            times: dict[str, list[float]] = {k: [] for k in engines}
            failed: dict[str, str] = {}
            for k, f in list(engines.items()):  # warm-up; drop an engine that fails on this model
                try:
                    f()
                except (RuntimeError, NotImplementedError) as exc:
                    failed[k] = str(exc).splitlines()[0][:80]
                    del engines[k], times[k]
            for _ in range(args.rounds):
                for k, f in engines.items():
                    sync()
                    t = time.perf_counter()
                    f()
                    sync()
                    times[k].append((time.perf_counter() - t) / args.probes)
            a = op.matvec(V[0])
            hv = fwd_over_rev(vds[0])
            b = torch.cat([hv[k].reshape(-1) for k in op.names])
            rel = float((a - b).norm() / a.norm())
            cells = ", ".join(f"{k} {1e3 * statistics.median(v):.2f}" for k, v in times.items())
            best = min(times, key=lambda k: statistics.median(times[k]))
            print(f"{name} ({op.dim:,} params, {len(y)} samples): {cells}; fastest {best}; "
                  f"engines differ by {rel:.1e}" + (f"; failed: {failed}" if failed else ""), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
