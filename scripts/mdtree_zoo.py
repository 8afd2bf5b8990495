"""Build nndiag's MD tree zoos, fit the shipped thresholds and validate them by transfer.

Reproducible and resumable (rerun it after an interruption):

    .venv/bin/python scripts/mdtree_zoo.py [--out build/mdtree-zoo] [--jobs 1]

1. builds zoos of 2-layer MLPs — two on scikit-learn's digits (train split), the grid
   ``widths 4,8,16,32,64 × data 25/50/100 % × batch 8…512``, seeds 0 and 1,
   30 epochs of SGD (lr 0.1, momentum 0.9): ``digits`` (clean labels) and ``digits-noise10``
   (10 % of the training labels flipped) — the paper's clean → noisy transfer — and a
   third on mnist1d (4,000 training signals of length 40; widths 8…64, data 25/50 %)
   for a transfer across data sets;
2. writes their tables to ``src/nndiag/diagnosis/data/zoo_*.csv``;
3. fits the three MD trees on the clean zoo (improved ``exact`` mode) and writes
   ``src/nndiag/diagnosis/data/thresholds.json`` (the shipped default);
4. prints the transfer accuracies (fit on clean digits, test on noisy digits / mnist1d) of MD tree (paper's
   Brent and exact) against the validation and hyper-parameter baselines.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd

from nndiag.diagnosis.shipped import evaluate_transfer, fit_threshold_set
from nndiag.diagnosis.zoo import build_zoo, default_zoo

DATA = Path(__file__).resolve().parents[1] / "src" / "nndiag" / "diagnosis" / "data"
ZOOS = {"digits": default_zoo("digits"), "digits-noise10": default_zoo("digits", label_noise=0.1),
        "mnist1d": default_zoo("mnist1d", widths=(8, 16, 32, 64), data_fractions=(0.25, 0.5))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="build/mdtree-zoo", help="where the zoos are trained")
    ap.add_argument("--jobs", type=int, default=1, help="worker processes (one thread each)")
    args = ap.parse_args()
    frames = {}
    for name, cfg in ZOOS.items():
        t0 = time.perf_counter()
        frames[name] = build_zoo(Path(args.out) / name, cfg, jobs=args.jobs, progress=False)
        secs = frames[name]["seconds"].sum()
        print(f"{name}: {len(frames[name])} configurations ({secs / 60:.1f} CPU-min of training, "
              f"{time.perf_counter() - t0:.0f} s this run)")
        frames[name].to_csv(DATA / f"zoo_{name.replace('-', '_')}.csv", index=False, float_format="%.10g")
    # refit from the CSV as written, so that the shipped thresholds follow from committed data
    clean = pd.read_csv(DATA / "zoo_digits.csv")
    noisy = pd.read_csv(DATA / "zoo_digits_noise10.csv")
    ts = fit_threshold_set(clean, method="exact", meta={
        "zoo": "zoo_digits.csv", "produced_by": "scripts/mdtree_zoo.py",
        "zoo_config": ZOOS["digits"].to_dict()})
    ts.save(DATA / "thresholds.json")
    for q, tree in ts.trees.items():
        print(f"{q}: thresholds {[round(t, 4) for t in tree.thresholds]}, "
              f"train accuracy {100 * tree.train_accuracy:.1f}%")
    pd.set_option("display.width", 200)
    print("transfer digits (clean) -> digits (10% label noise), test accuracy %:")
    print(evaluate_transfer(clean, noisy).round(2).to_string(index=False))
    print("transfer digits (10% label noise) -> digits (clean), test accuracy %:")
    print(evaluate_transfer(noisy, clean).round(2).to_string(index=False))
    other = pd.read_csv(DATA / "zoo_mnist1d.csv")
    print("transfer digits (clean) -> mnist1d (another data set), test accuracy %:")
    print(evaluate_transfer(clean, other).round(2).to_string(index=False))


if __name__ == "__main__":
    main()
