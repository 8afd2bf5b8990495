"""nndiag.spectral.smooth vs WeightWatcher 0.7.7's SVDSmoothing / SVDSharpness: time and accuracy.

Both tools, in one process, on the same thread setting and the same model: WeightWatcher's
transform runs on a deep copy (it edits the model it is given); nndiag returns a copy.
Cases: ``resnet20``/``resnet56`` (pretrained CIFAR-10 ResNets from ../shared, test accuracy
on 2,000 images of ../shared's CIFAR-10 test subset before and after), ``encoder`` (a randomly
initialised 12-layer, 768-wide ``nn.TransformerEncoder``: time only). nndiag runs in
WeightWatcher's conventions, so both keep the same components (``ceil(k / rf)`` per kernel
position, nndiag's default too); the accuracy of ``per_position=False`` (the ``k`` largest
eigenvalues over all positions) is printed beside.
Prints median wall seconds of ``--repeats`` runs, the ratio, and the accuracies.

    .venv/bin/python benchmarks/smooth_vs_weightwatcher.py [--cases resnet20,resnet56,encoder]
        [--methods detx,sharpen] [--threads 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from spectral_vs_weightwatcher import import_ww, transformer  # noqa: E402

WW_METHOD = {"detx": "detX", "lambda_min": "alpha_min", "percent": "svd"}


def load_case(name: str):
    """(model, data or None), or None when a shared asset is missing."""
    from nndiag._utils.shared import shared_path

    if name == "encoder":
        return transformer(independent=True), None
    from nndiag.io.data import load_data
    from nndiag.io.models import load_model

    ckpt, data = shared_path("models", f"cifar10_{name}.th"), shared_path("data", "cifar10_test_5k.npz")
    if ckpt is None or data is None:
        return None
    return (load_model(ckpt, arch=name).module.eval(),
            load_data(f"{data}?normalize=imagenet").take(torch.arange(2000)))


def ww_transform(ww, model, method: str):
    theirs = copy.deepcopy(model)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        watcher = ww.WeightWatcher(model=theirs)
        if method == "sharpen":
            watcher.SVDSharpness(model=theirs)
        else:
            watcher.SVDSmoothing(model=theirs, method=WW_METHOD[method])
    return theirs


def timed(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="resnet20,resnet56,encoder")
    ap.add_argument("--methods", default="detx,sharpen")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from nndiag._utils.threads import limit_threads
    from nndiag._utils.training import accuracy
    from nndiag.spectral.smoothing import smooth

    ww = import_ww()
    print(f"threads={args.threads} repeats={args.repeats} torch={torch.__version__}")
    print("| model | method | WW s | nndiag s (ww conventions) | WW / nndiag | accuracy: original / WW / "
          "nndiag / nndiag per_position=False | layers changed (nndiag) | mean ‖ΔW‖/‖W‖ |")
    print("|---|---|---|---|---|---|---|---|")
    for case in args.cases.split(","):
        loaded = load_case(case)
        if loaded is None:
            print(f"| {case} | skipped: ../shared assets missing | | | | | | |")
            continue
        model, data = loaded
        for method in args.methods.split(","):
            with limit_threads(args.threads):
                t_ww, theirs = timed(lambda m=model, k=method: ww_transform(ww, m, k), args.repeats)
                t_nd, res = timed(lambda m=model, k=method: smooth(m, k, conventions="ww", threads=args.threads),
                                  args.repeats)
                pooled = smooth(model, method, per_position=False, threads=args.threads)
                acc = "–"
                if data is not None:
                    with torch.no_grad():
                        accs = [accuracy(m.eval(), data, batch_size=250)
                                for m in (model, theirs, res.model, pooled.model)]
                    acc = " / ".join(f"{a:.4f}" for a in accs)
            s = res.summary
            rel = "–" if s["mean_rel_change"] is None else f"{s['mean_rel_change']:.3f}"
            print(f"| {case} | {method} | {t_ww:.2f} | {t_nd:.2f} | {t_ww / t_nd:.1f}× | {acc} | "
                  f"{s['layers_changed']} | {rel} |", flush=True)


if __name__ == "__main__":
    main()
