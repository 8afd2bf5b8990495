"""External check of nndiag's proxies against NASLib's stored scores on NB201.

NASLib (NAS-Bench-Suite-Zero) stores zero-cost scores for 725 NB201 architectures
(``../shared/benchmarks/naslib_zc_nb201_subset.json``). This script scores the same
architectures with nndiag (default initialisation, seeded; one batch of the shared JPEG
CIFAR-10 training subset, CIFAR normalisation) and prints, per proxy, Spearman ρ between
nndiag's and NASLib's scores, and each one's Spearman ρ with NB201 CIFAR-10 test accuracy.

Usage::

    python benchmarks/nb201_naslib_check.py --proxies synflow,params,flops --sample 725
    python benchmarks/nb201_naslib_check.py --proxies grad_norm,snip,grasp,fisher,jacob_cov,nwot \
        --sample 60 --batch-size 64
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv: list[str] | None = None) -> int:
    import numpy as np
    from scipy import stats

    from nndiag._utils.shared import shared_path
    from nndiag.zerocost.evaluate import batch_from, score_archs
    from nndiag.zerocost.nb201 import load_benchmark, load_naslib_scores

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--proxies", default="synflow,params,flops")
    ap.add_argument("--sample", type=int, default=725)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--cache", default=None)
    ap.add_argument("--compare-seed", type=int, default=None,
                    help="also score with this initialisation/batch seed and print run-to-run rho")
    args = ap.parse_args(argv)
    zc = shared_path("benchmarks", "naslib_zc_nb201_subset.json")
    bench = shared_path("benchmarks", "nb201_test_accuracy.csv")
    data = shared_path("data", "cifar10_train_5k.npz")
    if zc is None or bench is None or data is None:
        print("shared NASLib scores / NB201 table / CIFAR-10 subset not found", file=sys.stderr)
        return 2
    nas = load_naslib_scores(zc, "cifar10")
    order = np.random.default_rng(args.seed).permutation(len(nas))[: args.sample]
    nas = nas.iloc[order].reset_index(drop=True)
    acc = load_benchmark(bench).set_index("name")["cifar10"]
    proxies = [p.strip() for p in args.proxies.split(",") if p.strip()]
    x, y, name, k = batch_from(f"{data}?normalize=cifar", args.batch_size, args.seed)
    t0 = time.perf_counter()
    ours = score_archs(list(nas["name"]), x, y, proxies, seed=args.seed, num_classes=k,
                       cache=args.cache, data_name=name)
    secs = time.perf_counter() - t0
    print(f"{len(nas)} NASLib architectures, batch {args.batch_size}, seed {args.seed}, "
          f"{secs:.0f} s ({secs / len(nas):.2f} s/arch)")
    print(f"{'proxy':10s} {'rho(nndiag,NASLib)':>19s} {'rho(nndiag,acc)':>16s} {'rho(NASLib,acc)':>16s} n")
    a = acc.loc[nas["name"]].to_numpy()
    for p in proxies:
        mine = ours[p].replace(-np.inf, np.nan).to_numpy()
        theirs = nas[p].replace(-np.inf, np.nan).to_numpy().astype(float)
        ok = np.isfinite(mine) & np.isfinite(theirs)
        r1 = stats.spearmanr(mine[ok], theirs[ok]).statistic
        r2 = stats.spearmanr(mine[ok], a[ok]).statistic
        r3 = stats.spearmanr(theirs[ok], a[ok]).statistic
        print(f"{p:10s} {r1:19.3f} {r2:16.3f} {r3:16.3f} {int(ok.sum())}")
    if args.compare_seed is not None:
        s2 = args.compare_seed
        x2, y2, _, _ = batch_from(f"{data}?normalize=cifar", args.batch_size, s2)
        other = score_archs(list(nas["name"]), x2, y2, proxies, seed=s2, num_classes=k)
        print(f"run-to-run: seed {args.seed} vs seed {s2} (initialisation and batch)")
        for p in proxies:
            a0 = ours[p].replace(-np.inf, np.nan).to_numpy()
            a1 = other[p].replace(-np.inf, np.nan).to_numpy()
            theirs = nas[p].replace(-np.inf, np.nan).to_numpy().astype(float)
            ok = np.isfinite(a0) & np.isfinite(a1) & np.isfinite(theirs)
            print(f"{p:10s} rho(seed {args.seed}, seed {s2}) {stats.spearmanr(a0[ok], a1[ok]).statistic:.3f}  "
                  f"rho(seed {s2}, NASLib) {stats.spearmanr(a1[ok], theirs[ok]).statistic:.3f}  n {int(ok.sum())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
