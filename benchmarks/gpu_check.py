"""CUDA paths of every family, checked against the CPU and timed against the reference tools.

One short script for a lent GPU machine (CI has none). Each section computes the same thing
on the GPU and on the CPU (or against a float64 / dense reference) and prints the largest
relative difference, then times nndiag on the GPU next to the reference tool on the same
GPU where that tool is importable (PyHessian, loss-landscapes) or on the CPU where the tool
has no GPU path (WeightWatcher 0.7.7's default ``analyze``). A section that fails prints its
error and the script goes on. Results are also written as JSON lines to ``--out``.

Usage::

    NNDIAG_SHARED=../shared python benchmarks/gpu_check.py --out gpu_check.jsonl
    python benchmarks/gpu_check.py --device cpu --quick   # dry run of the script itself
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

ROWS: list[dict[str, Any]] = []


def record(section: str, **row: Any) -> None:
    row = {"section": section, **row}
    ROWS.append(row)
    print(json.dumps(row, default=float), flush=True)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], dev: torch.device, repeats: int = 1) -> tuple[float, Any]:
    ts, out = [], None
    for _ in range(repeats):
        sync(dev)
        t = time.perf_counter()
        out = fn()
        sync(dev)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), out


def rel(a: Any, b: Any) -> float:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-12))) if a.size else 0.0


def cifar(n: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    from nndiag._utils.shared import shared_path

    p = shared_path("data", "cifar10_test_5k.npz")
    if p is None:
        g = torch.Generator().manual_seed(0)
        return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g), "gaussian"
    from nndiag.io.data import load_data

    d = load_data(f"{p}?normalize=cifar").subset(n, seed=1)
    return d.x, d.y, "cifar10_test_5k"


def resnet20() -> tuple[nn.Module, str]:
    from nndiag._utils.shared import shared_path
    from nndiag.io.models import load_model

    ck = shared_path("models", "cifar10_resnet20.th")
    if ck is None:
        from nndiag.models import build_model

        torch.manual_seed(0)
        return build_model("resnet20").eval(), "resnet20 (random init)"
    return load_model(str(ck), arch="resnet20").module.eval(), "resnet20 (pretrained)"


# --------------------------------------------------------------------------- spectral
def spectral(dev: torch.device, quick: bool) -> None:
    from nndiag.spectral import analyze
    from spectral_vs_weightwatcher import import_ww, resnet18_like, run_ww, transformer

    cols = ["alpha", "D", "xmin", "lambda_max", "log_norm", "stable_rank"]
    cases = [("resnet20", resnet20()[0])]
    if not quick:
        torch.manual_seed(0)
        cases += [("resnet18_like", resnet18_like()), ("encoder_independent", transformer(True))]
    try:
        ww = import_ww()
    except Exception:  # noqa: BLE001 - WeightWatcher is optional here
        ww = None
    for name, model in cases:
        analyze(model, device=dev)  # warm-up (CUDA context, kernels)
        t_gpu, r_gpu = timed(lambda m=model: analyze(m, device=dev), dev, repeats=3)
        t_cpu, r_cpu = timed(lambda m=model: analyze(m, device="cpu"), torch.device("cpu"))
        a, b = r_gpu.layers.set_index("name"), r_cpu.layers.set_index("name")
        ok = a["alpha"].notna() & b["alpha"].notna()
        diffs = {c: rel(a.loc[ok, c], b.loc[ok, c]) for c in cols}
        row = dict(model=name, layers=len(a), t_device=t_gpu, t_cpu=t_cpu, max_rel_diff=diffs,
                   timing_device=r_gpu.timing, timing_cpu=r_cpu.timing)
        if ww is not None and not quick:
            t_ww, _ = timed(lambda m=model: run_ww(ww, m), torch.device("cpu"))
            row.update(t_weightwatcher_cpu=t_ww, ratio_ww_over_device=t_ww / t_gpu)
        record("spectral", **row)


def spectral_layers(dev: torch.device, quick: bool) -> None:
    """Per-layer alpha of the ResNet-18-like: device float64, CPU float64, CPU ``auto``."""
    from nndiag.spectral import analyze
    from spectral_vs_weightwatcher import resnet18_like

    torch.manual_seed(0)
    model = resnet18_like()
    runs = {"device_f64": analyze(model, device=dev, precision="float64"),
            "cpu_f64": analyze(model, device="cpu", precision="float64"),
            "cpu_auto": analyze(model, device="cpu")}
    tabs = {k: r.layers.set_index("name") for k, r in runs.items()}
    ref = tabs["cpu_f64"]
    for k in ("device_f64", "cpu_auto"):
        d = ((tabs[k]["alpha"] - ref["alpha"]).abs() / ref["alpha"].abs()).astype(float)
        worst = d.idxmax()
        record("spectral_layers", compare=f"{k} vs cpu_f64", max_rel_alpha=float(d.max()), layer=worst,
               alpha=[float(tabs[k].loc[worst, "alpha"]), float(ref.loc[worst, "alpha"])],
               xmin=[float(tabs[k].loc[worst, "xmin"]), float(ref.loc[worst, "xmin"])],
               D=[float(tabs[k].loc[worst, "D"]), float(ref.loc[worst, "D"])],
               t_device_f64=runs["device_f64"].timing)


def trace_equal_accuracy(dev: torch.device, quick: bool) -> None:
    """PyHessian's 100-probe trace (TF32 off, like nndiag) vs nndiag at the same standard error."""
    from nndiag.landscape import hessian_spectrum

    try:
        from pyhessian import hessian as PH
    except ImportError:
        return
    model, label = resnet20()
    x, y, src = cifar(64 if quick else 512)
    m = copy.deepcopy(model).to(dev)
    torch.backends.cudnn.allow_tf32 = False
    try:
        torch.manual_seed(0)
        tp, tr = timed(lambda: PH(m, F.cross_entropy, data=(x.to(dev), y.to(dev)), cuda=dev.type == "cuda")
                       .trace(maxIter=20 if quick else 100, tol=1e-5), dev)
    finally:
        torch.backends.cudnn.allow_tf32 = True
    tr = np.asarray(tr, dtype=float)
    se = float(tr.std(ddof=1) / np.sqrt(tr.size) / abs(tr.mean()))
    tn, rn = timed(lambda: hessian_spectrum(model, (x, y), top_k=0, trace=True, trace_rtol=se, device=dev,
                                            batch_size=len(y)), dev)
    record("trace_equal_accuracy", model=label, data=src, n=len(y), pyhessian_s=tp, pyhessian_probes=int(tr.size),
           pyhessian_trace=float(tr.mean()), pyhessian_rel_se=se, nndiag_s=tn, nndiag_hvp=rn.n_hvp,
           nndiag_trace=rn.trace, nndiag_rel_se=rn.trace_stderr / abs(rn.trace), ratio=tn / tp)


# --------------------------------------------------------------------------- hessian
def dense_check(dev: torch.device) -> None:
    from nndiag.landscape import hessian_spectrum

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 4)).double()
    x, y = torch.randn(32, 1, 6, 6, dtype=torch.float64), torch.randint(0, 4, (32,))
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for p in net.parameters()]

    def loss_of(flat: torch.Tensor) -> torch.Tensor:
        ps, i = {}, 0
        for n, s in zip(names, shapes, strict=True):
            ps[n] = flat[i:i + s.numel()].view(s)
            i += s.numel()
        return F.cross_entropy(torch.func.functional_call(net, ps, (x,)), y)

    flat = torch.cat([p.detach().flatten() for p in net.parameters()])
    h = torch.autograd.functional.hessian(loss_of, flat)
    ev = torch.linalg.eigvalsh(h).numpy()[::-1]
    r = hessian_spectrum(net.float(), (x.float(), y), top_k=3, trace=True, trace_method="hutchpp",
                         trace_rtol=1e-3, device=dev, tol=1e-6)
    record("hessian_dense", device=str(dev), top3=r.eigenvalues.tolist(), dense_top3=ev[:3].tolist(),
           top3_rel_err=rel(r.eigenvalues, ev[:3]), trace=r.trace, trace_stderr=r.trace_stderr,
           dense_trace=float(ev.sum()), trace_z=abs(r.trace - ev.sum()) / max(r.trace_stderr, 1e-12))


def hessian(dev: torch.device, quick: bool) -> None:
    from nndiag.landscape import hessian_spectrum

    model, label = resnet20()
    x, y, src = cifar(64 if quick else 512)
    kw = dict(device=dev, batch_size=512)
    t_ref, ref = timed(lambda: hessian_spectrum(model, (x, y), top_k=5, tol=1e-7, dtype=torch.float64, **kw), dev)
    t5, r5 = timed(lambda: hessian_spectrum(model, (x, y), top_k=5, tol=1e-3, **kw), dev)
    row = dict(model=label, data=src, n=len(y), t_ref_float64=t_ref, ref_top5=ref.eigenvalues.tolist(),
               t_nndiag_top5=t5, nndiag_top5_rel_err=rel(r5.eigenvalues, ref.eigenvalues), nndiag_hvp=r5.n_hvp)
    tt, rt = timed(lambda: hessian_spectrum(model, (x, y), top_k=0, trace=True, trace_rtol=1e-2, **kw), dev)
    row.update(t_nndiag_trace=tt, trace=rt.trace, trace_stderr=rt.trace_stderr, trace_hvp=rt.n_hvp)
    td, rd = timed(lambda: hessian_spectrum(model, (x, y), top_k=0, density=True, **kw), dev)
    row.update(t_nndiag_density=td, criteria=rd.criteria)
    try:
        from pyhessian import hessian as PH
    except ImportError:
        PH = None
    if PH is not None:
        m = copy.deepcopy(model).to(dev)
        xd, yd = x.to(dev), y.to(dev)
        torch.manual_seed(0)
        tp, ev = timed(lambda: PH(m, F.cross_entropy, data=(xd, yd), cuda=dev.type == "cuda")
                       .eigenvalues(top_n=5, tol=1e-3, maxIter=100)[0], dev)
        row.update(t_pyhessian_top5=tp, pyhessian_top5_rel_err=rel(sorted(ev, reverse=True), ref.eigenvalues),
                   ratio_top5=t5 / tp)
        torch.manual_seed(0)
        tpt, tr = timed(lambda: PH(m, F.cross_entropy, data=(xd, yd), cuda=dev.type == "cuda")
                        .trace(maxIter=100, tol=1e-3), dev)
        row.update(t_pyhessian_trace=tpt, pyhessian_trace=float(np.mean(tr)), pyhessian_trace_probes=len(tr))
        try:
            PH(m, F.cross_entropy, data=(xd, yd), cuda=dev.type == "cuda").density(iter=30, n_v=1)
            row.update(pyhessian_density="ran")
        except Exception as e:  # noqa: BLE001 - the known crash on torch >= 2 is the point
            row.update(pyhessian_density=f"{type(e).__name__}: {str(e)[:80]}")
    record("hessian", **row)


def hvp(dev: torch.device, quick: bool) -> None:
    """Seconds per Hessian-vector product: nndiag's engine and PyHessian's, TF32 off and on."""
    from nndiag.landscape import HessianOperator

    model, label = resnet20()
    x, y, src = cifar(64 if quick else 512)
    op = HessianOperator(model, (x, y), batch_size=len(y), device=dev)
    g = torch.Generator(device=dev).manual_seed(0)
    v = torch.randn(op.dim, device=dev, generator=g)
    V = torch.randn(10, op.dim, device=dev, generator=g)
    row: dict[str, Any] = dict(model=label, data=src, n=len(y))
    for tf32 in (False, True):
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = tf32
        tag = "tf32" if tf32 else "ieee"
        mv = HessianOperator.matvec.__wrapped__  # type: ignore[attr-defined]  # skip the TF32 guard
        mm = HessianOperator.matmat.__wrapped__  # type: ignore[attr-defined]
        mv(op, v)
        row[f"nndiag_matvec_{tag}"] = timed(lambda f=mv: f(op, v), dev, repeats=5)[0]
        mm(op, V, batched=True)
        row[f"nndiag_matmat10_batched_{tag}"] = timed(lambda f=mm: f(op, V, batched=True), dev, repeats=3)[0]
        row[f"nndiag_matmat10_loop_{tag}"] = timed(lambda f=mm: f(op, V, batched=False), dev, repeats=3)[0]
        try:
            from pyhessian import hessian as PH
            from pyhessian.utils import hessian_vector_product
        except ImportError:
            continue
        m = copy.deepcopy(model).to(dev)
        h = PH(m, F.cross_entropy, data=(x.to(dev), y.to(dev)), cuda=dev.type == "cuda")
        vs = [torch.randn_like(p) for p in h.params]
        hessian_vector_product(h.gradsH, h.params, vs)
        row[f"pyhessian_hvp_{tag}"] = timed(lambda h=h, vs=vs: hessian_vector_product(h.gradsH, h.params, vs),
                                            dev, repeats=5)[0]
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = True, False  # PyTorch defaults
    record("hvp", **row)


# --------------------------------------------------------------------------- landscape
def landscape(dev: torch.device, quick: bool) -> None:
    from nndiag.landscape import surface

    model, label = resnet20()
    x, y, src = cifar(64 if quick else 512)
    steps = 5 if quick else 21
    with torch.no_grad():
        m0 = copy.deepcopy(model).to(dev)
        origin = float(F.cross_entropy(m0(x.to(dev)), y.to(dev)))
    row = dict(model=label, data=src, n=len(y), steps=steps, model_loss=origin)
    for strategy in ("auto", "loop"):
        surface(model, (x, y), dim=2, steps=3, norm="filter", device=dev, strategy=strategy, progress=False)
        t, s = timed(lambda st=strategy: surface(model, (x, y), dim=2, steps=steps, norm="filter", device=dev,
                                                 strategy=st, progress=False), dev)
        row[f"t_nndiag_{strategy}"] = t
        row[f"chosen_{strategy}"] = s.params["strategy"]
        row[f"origin_rel_err_{strategy}"] = rel(s.origin_loss, origin)
    record("landscape", **row)
    try:
        import loss_landscapes
        import loss_landscapes.metrics
    except ImportError:
        return
    try:
        metric = loss_landscapes.metrics.Loss(F.cross_entropy, x.to(dev), y.to(dev))
        t, grid = timed(lambda: loss_landscapes.random_plane(copy.deepcopy(model).to(dev), metric, distance=1,
                                                             steps=steps, normalization="filter"), dev)
        record("landscape_reference", t_loss_landscapes=t,
               ratio=t / min(row["t_nndiag_auto"], row["t_nndiag_loop"]))
    except Exception as e:  # noqa: BLE001 - the reference tool's own failure on this device
        record("landscape_reference", error=f"loss-landscapes failed: {type(e).__name__}: {str(e)[:120]}")


# --------------------------------------------------------------------------- zero-cost
def zerocost(dev: torch.device, quick: bool) -> None:
    from nndiag._utils.seeding import fork_rng
    from nndiag.models.nb201 import nb201
    from nndiag.zerocost.gradsign import gradsign_detail
    from nndiag.zerocost.nb201 import all_archs
    from nndiag.zerocost.score import compute_proxies, parse_proxies

    x, y, src = cifar(64)
    archs = [all_archs()[i] for i in np.random.default_rng(0).permutation(15625)[: 2 if quick else 4]]
    for arch in archs:
        with fork_rng(0):
            net = nb201(arch, channels=4 if quick else 16, cells_per_stage=1 if quick else 5)
        gpu = copy.deepcopy(net).to(dev)
        gradsign_detail(gpu, x[:2], y[:2])
        tl, a = timed(lambda g=gpu: gradsign_detail(g, x, y, method="loop"), dev)
        tf, b = timed(lambda g=gpu: gradsign_detail(g, x, y, method="fast", track_zero=False), dev)
        c = gradsign_detail(net, x, y, method="fast", track_zero=False)
        names = parse_proxies("all")
        pg, pc = compute_proxies(gpu, x, y, names), compute_proxies(net, x, y, names)
        prox = {k: rel(pg[k], pc[k]) for k in names if np.isfinite(pc[k])}
        prox["errors"] = {**pg["errors"], **pc["errors"]}
        record("zerocost", arch=arch, data=src, t_loop=tl, t_fast=tf, ratio=tl / tf, tau_loop=a.tau,
               tau_fast=b.tau, tau_cpu_fast=c.tau, rel_loop_fast=abs(a.tau - b.tau) / max(a.tau, 1),
               rel_device_cpu=abs(b.tau - c.tau) / max(c.tau, 1), proxies_rel_device_cpu=prox)


# --------------------------------------------------------------------------- slices + report
def slices_and_report(dev: torch.device, quick: bool, out: Path) -> None:
    from nndiag._utils.seeding import fork_rng
    from nndiag._utils.training import train_classifier
    from nndiag.io.data import load_data
    from nndiag.models import build_model
    from nndiag.slices import find_slices

    digits = load_data("digits?split=train")
    test = load_data("digits?split=test")
    with fork_rng(0):
        model = build_model("digits-cnn")
    train_classifier(model, digits, epochs=20, max_steps=200, lr=0.05, seed=0, progress=False)
    model.eval()
    gpu = copy.deepcopy(model).to(dev)
    t, rg = timed(lambda: find_slices(gpu, test, size=0.05, n=3, seed=0), dev)
    rc = find_slices(model, test, size=0.05, n=3, seed=0)
    record("slices", t_device=t, device_summary=rg.summary, cpu_summary=rc.summary)
    path = out / "digits_cnn.pt"
    torch.save(model.state_dict(), path)
    from nndiag import diagnose

    t, rep = timed(lambda: diagnose(str(path), data="digits?split=test", arch="digits-cnn", device=dev,
                                    progress=False), dev)
    (out / "gpu_report.html").write_text(rep.to_html())
    errors = [f for f in rep.findings() if f.get("code") == "PROBE-ERROR"]
    record("diagnose", t_device=t, probe_errors=errors, severities=rep.severities(),
           counts={m.name: m.counts() for m in rep.models})


SECTIONS: dict[str, Callable[..., None]] = {
    "dense": lambda d, q, o: dense_check(d), "spectral": lambda d, q, o: spectral(d, q),
    "spectral_layers": lambda d, q, o: spectral_layers(d, q),
    "trace": lambda d, q, o: trace_equal_accuracy(d, q),
    "hessian": lambda d, q, o: hessian(d, q), "hvp": lambda d, q, o: hvp(d, q),
    "landscape": lambda d, q, o: landscape(d, q),
    "zerocost": lambda d, q, o: zerocost(d, q), "slices": slices_and_report,
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--sections", default=",".join(SECTIONS))
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a dry run of the script")
    ap.add_argument("--out", default="gpu_check.jsonl")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    info = dict(torch=torch.__version__, cuda=torch.version.cuda, device=str(dev),
                name=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                cpu_threads=torch.get_num_threads())
    record("env", **info)
    for name in args.sections.split(","):
        t = time.perf_counter()
        try:
            SECTIONS[name](dev, args.quick, out.parent)
        except Exception as e:  # noqa: BLE001 - report and go on to the next section
            record(name, error=f"{type(e).__name__}: {e}", trace=traceback.format_exc()[-1500:])
        print(f"[{name}: {time.perf_counter() - t:.1f} s]", flush=True)
        out.write_text("\n".join(json.dumps(r, default=float) for r in ROWS) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
