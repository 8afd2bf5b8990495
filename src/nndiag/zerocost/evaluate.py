"""Evaluate zero-cost proxies against a NAS benchmark.

:func:`evaluate` samples architectures of the NB201 space, scores each freshly
initialised network on one batch (resumable through a JSON-lines cache, optionally in
parallel worker processes) and compares the scores with the benchmark's accuracies:
Spearman ρ, Kendall τ and the top-k hit rate per proxy and dataset.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from nndiag.errors import DataError, InputError, NNDiagError

#: Proxies where lower is better would be negated here; all of ours are "higher is better".
_CACHE_KEYS = ("seed", "batch_size", "data", "num_classes")


def score_arch(arch: str, x: torch.Tensor, y: torch.Tensor, proxies: Sequence[str], seed: int,
               num_classes: int = 10, threads: int = 1) -> dict[str, Any]:
    """Build the NB201 network ``arch`` at seeded default initialisation and score it.

    Never raises for a bad network: errors become NaN scores with messages in ``errors``.
    """
    from nndiag._utils.seeding import fork_rng
    from nndiag._utils.threads import limit_threads
    from nndiag.models.nb201 import nb201
    from nndiag.zerocost.score import compute_proxies

    t0 = time.perf_counter()
    with limit_threads(threads):
        try:
            with fork_rng(seed):
                net = nb201(arch, num_classes=num_classes)
        except NNDiagError as exc:
            row: dict[str, Any] = {p: math.nan for p in proxies}
            row["errors"] = {"build": str(exc)}
        else:
            row = compute_proxies(net, x, y, proxies)
    row["name"] = arch
    row["seconds"] = time.perf_counter() - t0
    return row


def _read_cache(path: Path, header: dict[str, Any]) -> dict[str, dict[str, Any]]:
    if not path.is_file():
        return {}
    rows: dict[str, dict[str, Any]] = {}
    with path.open() as fh:
        lines = [ln for ln in fh if ln.strip()]
    if not lines:
        return {}
    try:
        first = json.loads(lines[0])
    except json.JSONDecodeError as exc:
        raise DataError(f"cache {path} is not a JSON-lines file from nndiag") from exc
    old = first.get("header", {})
    diff = [k for k in _CACHE_KEYS if old.get(k) != header.get(k)]
    if diff:
        raise InputError(f"cache {path} was made with other settings ({', '.join(diff)}); "
                         "use another --cache file or the same settings")
    for ln in lines[1:]:
        try:
            rec = json.loads(ln)
        except json.JSONDecodeError:
            continue  # a line cut by an interruption
        prev = rows.get(rec["name"], {})
        rows[rec["name"]] = {**prev, **{k: v for k, v in rec.items() if v is not None or k not in prev}}
    return rows


def _to_json_row(row: dict[str, Any]) -> str:
    def fix(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
        return v

    return json.dumps({k: fix(v) for k, v in row.items()})


def _from_json_value(v: Any) -> Any:
    if v is None:
        return math.nan
    if v == "inf":
        return math.inf
    if v == "-inf":
        return -math.inf
    return v


def score_archs(
    archs: Sequence[str],
    x: torch.Tensor,
    y: torch.Tensor,
    proxies: Sequence[str],
    *,
    seed: int = 0,
    num_classes: int = 10,
    workers: int = 1,
    cache: str | Path | None = None,
    data_name: str = "data",
    progress: bool | None = None,
    threads: int = 1,
) -> pd.DataFrame:
    """Score every architecture; one row each (``name`` first, ``status``, ``error``).

    With ``cache``, finished rows are appended to a JSON-lines file as they arrive and
    rows already there are not recomputed (resumable). ``workers`` > 1 scores in that
    many processes of ``threads`` threads each.
    """
    from nndiag._utils.progress import progress_bar

    if workers < 1:
        raise InputError(f"workers must be >= 1, got {workers}")
    header = {"seed": int(seed), "batch_size": int(x.shape[0]), "data": data_name,
              "num_classes": int(num_classes), "proxies": list(proxies)}
    cache_path = Path(cache) if cache else None
    done = _read_cache(cache_path, header) if cache_path else {}
    todo = [a for a in dict.fromkeys(archs)
            if not all(p in done.get(a, {}) for p in proxies)]
    fh = None
    if cache_path:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        new = not cache_path.is_file() or cache_path.stat().st_size == 0
        fh = cache_path.open("a")
        if new:
            fh.write(json.dumps({"header": header}) + "\n")
            fh.flush()

    def record(row: dict[str, Any]) -> None:
        prev = done.get(row["name"], {})
        done[row["name"]] = {**prev, **row}
        if fh is not None:
            fh.write(_to_json_row(row) + "\n")
            fh.flush()

    try:
        with progress_bar(len(todo), "scoring architectures", enabled=progress) as bar:
            if workers == 1:
                for a in todo:
                    need = [p for p in proxies if p not in done.get(a, {})]
                    record(score_arch(a, x, y, need, seed, num_classes, threads))
                    bar.advance()
            else:
                import multiprocessing as mp
                from concurrent.futures import ProcessPoolExecutor, as_completed

                with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as ex:
                    futs = [ex.submit(score_arch, a, x, y,
                                      [p for p in proxies if p not in done.get(a, {})],
                                      seed, num_classes, threads) for a in todo]
                    for f in as_completed(futs):
                        record(f.result())
                        bar.advance()
    finally:
        if fh is not None:
            fh.close()
    rows = []
    for a in dict.fromkeys(archs):
        rec = done.get(a, {})
        errors = rec.get("errors") or {}
        row = {"name": a}
        for p in proxies:
            row[p] = float(_from_json_value(rec.get(p)))
        failed = [k for k in errors if k in proxies or k == "build"]
        row["status"] = "failed" if failed else "ok"
        row["error"] = "; ".join(f"{k}: {errors[k]}" for k in failed)
        row["seconds"] = float(rec.get("seconds", math.nan))
        rows.append(row)
    return pd.DataFrame(rows)


def rank_vote(scores: pd.DataFrame, proxies: Sequence[str]) -> pd.Series:
    """Rank-aggregated vote: the mean over proxies of each row's rank fraction (1 = best).

    Ranks are taken within each proxy (ties averaged, NaN ignored) and scaled to (0, 1].
    """
    ranks = [scores[p].rank(method="average", pct=True) for p in proxies if p in scores]
    if not ranks:
        raise InputError("rank_vote needs at least one proxy column")
    return pd.concat(ranks, axis=1).mean(axis=1, skipna=True)


def correlations(scores: pd.DataFrame, accuracy: pd.DataFrame, proxies: Sequence[str],
                 top_k: float = 0.1) -> pd.DataFrame:
    """Spearman ρ, Kendall τ and top-k hit rate of each proxy against each accuracy column.

    Parameters
    ----------
    scores : DataFrame
        ``name`` and one column per proxy.
    accuracy : DataFrame
        ``name`` and one column per dataset.
    proxies : sequence of str
        Proxy columns to assess (plus ``vote`` if present).
    top_k : float
        Fraction (0, 1] of the sample that counts as the top: the hit rate is the share of
        the proxy's top-k architectures that are also among the k most accurate.
    """
    from scipy import stats

    if not 0 < top_k <= 1:
        raise InputError(f"top_k must be in (0, 1], got {top_k}")
    merged = scores.merge(accuracy, on="name", how="inner")
    datasets = [c for c in accuracy.columns if c not in ("name", "index")]
    out = []
    for p in proxies:
        for d in datasets:
            sub = merged[["name", p, d]].replace([np.inf, -np.inf], np.nan)
            # -inf scores (e.g. NASWOT on a disconnected cell) rank last, not dropped
            s = merged[p].replace(-np.inf, np.nan)
            floor = s.min() - 1 if s.notna().any() else 0.0
            col = merged[p].replace(-np.inf, floor).replace(np.inf, np.nan)
            ok = col.notna() & merged[d].notna()
            n = int(ok.sum())
            row = {"proxy": p, "dataset": d, "n": n, "spearman": math.nan, "kendall": math.nan,
                   "top_k": 0, "top_k_hit_rate": math.nan}
            if n >= 3:
                a, b = col[ok].to_numpy(), merged.loc[ok, d].to_numpy()
                row["spearman"] = float(stats.spearmanr(a, b).statistic)
                row["kendall"] = float(stats.kendalltau(a, b).statistic)
                k = max(1, int(math.ceil(top_k * n)))
                top_p = set(np.argsort(-a, kind="stable")[:k])
                top_a = set(np.argsort(-b, kind="stable")[:k])
                row["top_k"] = k
                row["top_k_hit_rate"] = len(top_p & top_a) / k
            del sub
            out.append(row)
    return pd.DataFrame(out)


def batch_from(data: Any, batch_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, str, int]:
    """``(x, y, name, num_classes)``: a seeded batch of ``batch_size`` examples of a DATA spec."""
    from nndiag.io.data import as_data, load_data

    if batch_size < 2:
        raise InputError(f"batch size must be at least 2, got {batch_size}")
    bundle = load_data(data) if isinstance(data, str) else as_data(data)
    if len(bundle) < batch_size:
        raise DataError(f"{bundle.name}: {len(bundle)} examples, fewer than the batch size {batch_size}")
    sub = bundle.subset(batch_size, seed=seed)
    return sub.x, sub.y, bundle.name, bundle.num_classes


def evaluate(
    benchmark: str | Path,
    data: Any,
    *,
    space: str = "nb201",
    sample: int | None = 100,
    seed: int = 0,
    proxies: str | Sequence[str] | None = ("gradsign", "synflow"),
    batch_size: int = 64,
    workers: int = 1,
    cache: str | Path | None = None,
    top_k: float = 0.1,
    num_classes: int | None = None,
    progress: bool | None = None,
    threads: int = 1,
):
    """Proxies vs benchmark accuracy on a seeded random sample of a search space.

    Parameters
    ----------
    benchmark : path
        The NB201 accuracy table (see :func:`nndiag.zerocost.nb201.load_benchmark`).
    data : str or data
        DATA spec (e.g. ``cifar10_train_5k.npz?normalize=cifar``) or tensors.
    space : {"nb201"}
        The search space.
    sample : int, optional
        Number of architectures (all when None).
    seed : int
        Seeds the sample, the batch and every network's initialisation.
    proxies : str or sequence
        Proxy names (``"all"`` for every one); a ``vote`` column is added when several.
    batch_size : int
        Examples in the scoring batch (at least 2).
    workers, cache, progress, threads
        See :func:`score_archs`.
    top_k : float
        Fraction of the sample counted as the top for the hit rate.
    num_classes : int, optional
        Classifier outputs (default: the data's class count).

    Returns
    -------
    Result
        Tables ``scores`` (one row per architecture) and ``correlations`` (one row per
        proxy and dataset); summary: sample size, failures, CIFAR-10 Spearman per proxy.
    """
    from nndiag.report.results import Finding, Result, provenance
    from nndiag.zerocost.nb201 import load_benchmark, sample_archs
    from nndiag.zerocost.score import parse_proxies

    if space != "nb201":
        raise InputError(f"unknown search space {space!r}; valid: nb201")
    names = parse_proxies(proxies)
    table = load_benchmark(benchmark)
    chosen = sample_archs(table, sample, seed)
    x, y, data_name, k = batch_from(data, batch_size, seed)
    t0 = time.perf_counter()
    scores = score_archs(list(chosen["name"]), x, y, names, seed=seed, num_classes=num_classes or k,
                         workers=workers, cache=cache, data_name=data_name, progress=progress,
                         threads=threads)
    elapsed = time.perf_counter() - t0
    scores = scores.merge(chosen[["name", "index"]], on="name", how="left")
    assessed = list(names)
    if len(names) > 1:
        ok = scores["status"] == "ok"
        scores["vote"] = math.nan
        scores.loc[ok, "vote"] = rank_vote(scores.loc[ok], names)
        assessed.append("vote")
    cols = ["name", "index", *assessed, "status", "error", "seconds"]
    scores = scores[cols]
    acc_cols = [c for c in table.columns if c not in ("index",)]
    corr = correlations(scores[scores["status"] == "ok"], table[acc_cols], assessed, top_k)
    n_failed = int((scores["status"] != "ok").sum())
    summary: dict[str, Any] = {"space": space, "sample_size": int(len(scores)),
                               "scored": int(len(scores) - n_failed), "failed": n_failed,
                               "batch_size": int(batch_size), "data": data_name}
    for _, r in corr.iterrows():
        summary[f"spearman_{r['proxy']}_{r['dataset']}"] = r["spearman"]
    findings = []
    if n_failed:
        findings.append(Finding("ZC-ARCH-FAILED", "warn",
                                f"{n_failed} of {len(scores)} architectures could not be scored; "
                                "they are listed with their error and left out of the correlations",
                                {"failed": n_failed}, "read the 'error' column of the scores table"))
    return Result("zerocost-evaluate", tables={"scores": scores, "correlations": corr},
                  summary=summary, findings=findings,
                  params={"benchmark": str(benchmark), "space": space, "sample": sample,
                          "proxies": names, "batch_size": batch_size, "top_k": top_k,
                          "workers": workers, "data": data_name},
                  seed=seed, timing={"scoring": elapsed}, meta=provenance("cpu"))
