"""Rank users' own candidate networks by zero-cost proxies at initialisation."""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Sequence
from typing import Any

import pandas as pd
import torch
from torch import nn

from nndiag.errors import AnalysisError, InputError


def reinitialised(model: nn.Module, seed: int) -> nn.Module:
    """A copy of ``model`` with every parameter re-drawn by its layer's default initialiser.

    Calls ``reset_parameters()`` on every module that has one, under a forked global RNG
    seeded with ``seed`` (the caller's RNG stream and ``model`` are untouched). Position
    tables and class/mask tokens held as bare parameters (a ViT's ``cls_token`` and
    ``position_embeddings``, timm's ``pos_embed``: 2-D or more, named ``pos``/``cls``/
    ``token``/``emb``) are drawn from a normal distribution truncated at ±2σ, σ the model
    configuration's ``initializer_range`` when it has one, else 0.02 — the convention of
    BERT, GPT-2, ViT and timm.

    Raises
    ------
    AnalysisError
        When other parameters belong to modules without ``reset_parameters`` (they could
        not be re-initialised, so the score would not be an at-initialisation score).
    """
    from nndiag._utils.seeding import fork_rng

    net = copy.deepcopy(model)
    covered: set[int] = set()
    with fork_rng(seed), torch.no_grad():
        for m in net.modules():
            reset = getattr(m, "reset_parameters", None)
            if callable(reset):
                reset()
                covered.update(id(p) for p in m.parameters(recurse=False))
            if hasattr(m, "reset_running_stats") and callable(m.reset_running_stats):
                m.reset_running_stats()
        std = _initializer_range(net)
        for n, p in net.named_parameters():
            leaf = n.rsplit(".", 1)[-1].lower()
            if id(p) not in covered and p.ndim >= 2 and any(h in leaf for h in _TABLE_HINTS):
                nn.init.trunc_normal_(p, mean=0.0, std=std, a=-2 * std, b=2 * std)
                covered.add(id(p))
    missing = [n for n, p in net.named_parameters() if id(p) not in covered]
    if missing:
        raise AnalysisError(f"cannot re-initialise {len(missing)} parameter(s) without a "
                            f"reset_parameters() method (e.g. {missing[0]}); score the model as is")
    return net


#: Bare parameters re-drawn as tables or tokens (see :func:`reinitialised`).
_TABLE_HINTS = ("pos", "cls", "token", "emb")
#: Their standard deviation when the model's configuration names none.
DEFAULT_INITIALIZER_RANGE = 0.02


def _initializer_range(net: nn.Module) -> float:
    """``config.initializer_range`` of a (Hugging Face) model or the model it wraps, else the default."""
    for m in net.modules():
        value = getattr(getattr(m, "config", None), "initializer_range", None)
        if isinstance(value, (int, float)) and value > 0:
            return float(value)
    return DEFAULT_INITIALIZER_RANGE


def proxy_agreement(scores: pd.DataFrame, proxies: Sequence[str]) -> float:
    """Mean pairwise Kendall τ between the proxies' rankings of the candidates (NaN if < 2)."""
    from scipy import stats

    taus = []
    for a, b in itertools.combinations([p for p in proxies if p in scores], 2):
        ok = scores[a].notna() & scores[b].notna()
        if ok.sum() >= 2:
            t = stats.kendalltau(scores.loc[ok, a], scores.loc[ok, b]).statistic
            if t == t:
                taus.append(float(t))
    return float(sum(taus) / len(taus)) if taus else math.nan


def rank_models(
    models: Sequence[tuple[str, nn.Module]],
    x: torch.Tensor,
    y: torch.Tensor,
    proxies: Sequence[str],
    *,
    seed: int = 0,
    at_init: bool = True,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Score each ``(name, module)`` and rank by the rank-aggregated vote (1 = best).

    A proxy that fails on every candidate (NWOT on a network without ReLU-like
    activations, say) is left out of the vote and named in the summary; a candidate on
    which another proxy fails, or that cannot be scored at all, is listed unranked
    (``status`` "failed").

    Returns the table (``name``, ``rank``, ``vote``, one column per proxy, ``status``,
    ``error``) and a summary (``best``, ``proxy_agreement``, ``vote_proxies``,
    ``left_out`` {proxy: first error}).
    """
    from nndiag._utils.threads import limit_threads
    from nndiag.zerocost.evaluate import rank_vote
    from nndiag.zerocost.score import compute_proxies

    if not models:
        raise InputError("no models to rank")
    rows = []
    errors: list[dict[str, str]] = []
    ran: list[bool] = []  # scored at all: no model-level error and some proxy worked
    for name, module in models:
        row: dict[str, Any] = {"name": name}
        try:
            net = reinitialised(module, seed) if at_init else module
            with limit_threads():
                res = compute_proxies(net, x, y, proxies)
        except AnalysisError as exc:
            res = {p: math.nan for p in proxies}
            res["errors"] = {"model": str(exc)}
        for p in proxies:
            row[p] = res[p]
        errs = res["errors"]
        every = all(p in errs for p in proxies)
        errors.append(errs)
        ran.append("model" not in errs and not every)
        if len(proxies) > 1 and every:  # one cause, not one line per proxy
            first = next(iter(errs))
            row["error"] = f"every proxy failed, e.g. {first}: {errs[first]}"
        else:
            row["error"] = "; ".join(f"{k}: {v}" for k, v in errs.items())
        rows.append(row)
    # a proxy that failed on every candidate that runs at all says nothing about any of them:
    # it is left out of the vote (a candidate on which every proxy fails is simply failed)
    runs = [e for e, r in zip(errors, ran, strict=True) if r]
    left_out = {p: next(e[p] for e in runs) for p in proxies
                if len(proxies) > 1 and runs and all(p in e for e in runs)}
    voting = [p for p in proxies if p not in left_out]
    for row, errs, r in zip(rows, errors, ran, strict=True):
        row["status"] = "ok" if r and not any(p in errs for p in voting) else "failed"
    df = pd.DataFrame(rows)
    ok = df["status"] == "ok"  # a model with a failed proxy is listed, unranked
    df["vote"] = math.nan
    if ok.any() and voting:
        df.loc[ok, "vote"] = rank_vote(df.loc[ok], voting)
    df["rank"] = df["vote"].rank(ascending=False, method="min")
    df = df.sort_values(["rank", "name"], na_position="last").reset_index(drop=True)
    df = df[["name", "rank", "vote", *proxies, "status", "error"]]
    summary = {"models": len(df), "best": df["name"].iloc[0] if df["vote"].notna().any() else None,
               "proxy_agreement": proxy_agreement(df[df["status"] == "ok"], voting),
               "vote_proxies": voting, "left_out": left_out,
               "failed": int((df["status"] != "ok").sum()), "at_init": at_init}
    return df, summary
