"""Ranking power of zero-cost proxies on a random NAS-Bench-201 sample (resumable).

Scores N randomly sampled NB201 architectures at default initialisation on one batch of
CIFAR-10 training images (the shared JPEG 5k subset, CIFAR normalisation) and prints
Spearman ρ / Kendall τ / top-10% hit rate against the 200-epoch test accuracies of
CIFAR-10, CIFAR-100 and ImageNet16-120. Rows go to a JSON-lines cache as they finish, so
an interrupted run resumes where it stopped.

Usage::

    nice -n 10 python benchmarks/nb201_evaluate.py --sample 1000 --seed 0 --batch-size 32 \
        --proxies gradsign,synflow,nwot,jacob_cov,params,flops --cache runs/nb201_s0.jsonl \
        --out runs/nb201_s0.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from nndiag._utils.shared import shared_path
    from nndiag.zerocost.evaluate import evaluate

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sample", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--proxies", default="gradsign,synflow,nwot,jacob_cov,params,flops")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--cache", default="runs/nb201_eval.jsonl")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    bench = shared_path("benchmarks", "nb201_test_accuracy.csv")
    data = shared_path("data", "cifar10_train_5k.npz")
    if bench is None or data is None:
        print("shared NB201 table / CIFAR-10 subset not found", file=sys.stderr)
        return 2
    res = evaluate(bench, f"{data}?normalize=cifar", sample=args.sample, seed=args.seed,
                   proxies=args.proxies, batch_size=args.batch_size, workers=args.workers,
                   cache=args.cache, threads=1)
    corr = res.tables["correlations"]
    print(f"sample {res.summary['sample_size']} (scored {res.summary['scored']}, "
          f"failed {res.summary['failed']}), batch {args.batch_size}, seed {args.seed}, "
          f"scoring {res.timing['scoring']:.0f} s")
    print(corr.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    secs = res.tables["scores"]["seconds"]
    print(f"seconds per architecture: median {secs.median():.2f}, mean {secs.mean():.2f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res.to_dict(), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
