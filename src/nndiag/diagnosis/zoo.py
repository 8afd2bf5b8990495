"""Model zoos: a grid of small trainings over temperature (batch size), width and data amount.

:func:`build_zoo` trains, for every (width, data fraction, batch size) of the grid,
two or more seeds of a small network with fixed learning rate and epochs (so the
batch size sets the SGD temperature ∝ lr/B, as in the MD tree paper), measures test
and training metrics and the MD tree features, and appends one JSON line per
configuration to ``DIR/records.jsonl`` — a rerun skips configurations already there
(resumable). :func:`zoo_frame` turns the records into the paper's table, with the
room-for-improvement labels defined exactly as the paper does: along each knob the
best mean test accuracy reachable by moving that knob only in one direction (the
current value included) minus the current one; ``bs_failure`` is ``small`` when
lowering B (raising the temperature) helps more than raising it, ``large`` when
less, ``optimal`` on ties; ``width_vs_batch`` and ``data_vs_batch`` compare
``rfi_width`` / ``rfi_data`` with the better temperature move.

Examples
--------
>>> cfg = ZooConfig(dataset="digits", widths=(8,), batch_sizes=(32, 256), data_fractions=(1.0,))
>>> build_zoo("zoo-dir", cfg)  # doctest: +SKIP
>>> zoo_frame("zoo-dir")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from nndiag.errors import DataError, InputError

RECORDS = "records.jsonl"
CONFIG = "zoo.json"


@dataclass(frozen=True)
class ZooConfig:
    """The grid and training recipe of a zoo.

    Attributes
    ----------
    dataset : str
        ``digits`` or ``mnist1d`` (their train/test splits).
    widths, batch_sizes, data_fractions : tuples
        The grid (hidden width of a 2-layer MLP; SGD batch size; fraction of the
        training split).
    seeds : tuple of int
        At least two (CKA and connectivity need two).
    epochs, lr, momentum : training recipe, fixed over the grid.
    label_noise : float
        Fraction of training labels replaced by a random other class (seeded, fixed per zoo).
    curve_epochs : int
        Bezier curve training epochs.
    hessian_samples : int
    depth : int
        MLP hidden layers.
    """

    dataset: str = "digits"
    widths: tuple[int, ...] = (4, 8, 16, 32, 64)
    batch_sizes: tuple[int, ...] = (8, 16, 32, 64, 128, 256, 512)
    data_fractions: tuple[float, ...] = (0.25, 0.5, 1.0)
    seeds: tuple[int, ...] = (0, 1)
    epochs: int = 30
    lr: float = 0.1
    momentum: float = 0.9
    label_noise: float = 0.0
    curve_epochs: int = 3
    hessian_samples: int = 200
    depth: int = 2

    def __post_init__(self) -> None:
        if self.dataset not in ("digits", "mnist1d"):
            raise InputError(f"zoo dataset must be digits or mnist1d, got '{self.dataset}'")
        if len(set(self.seeds)) < 2:
            raise InputError("a zoo needs at least two distinct seeds (CKA and mode connectivity use two)")
        for name in ("widths", "batch_sizes", "data_fractions"):
            v = getattr(self, name)
            if not v or len(set(v)) != len(v):
                raise InputError(f"zoo {name} must be a non-empty list of distinct values")
        if any(not 0 < f <= 1 for f in self.data_fractions):
            raise InputError("zoo data fractions must lie in (0, 1]")
        if any(b < 1 for b in self.batch_sizes) or any(w < 1 for w in self.widths):
            raise InputError("zoo widths and batch sizes must be positive")
        if not 0 <= self.label_noise < 1:
            raise InputError("label_noise must lie in [0, 1)")

    def grid(self) -> list[tuple[int, float, int]]:
        """(width, data fraction, batch size) for every configuration."""
        return [(w, d, b) for w in self.widths for d in self.data_fractions for b in self.batch_sizes]

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ZooConfig:
        fields = cls.__dataclass_fields__
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in fields})


def config_key(width: int, data: float, bs: int) -> str:
    """The record key of one configuration."""
    return f"w{width}_d{data:g}_b{bs}"


def _splits(cfg: ZooConfig) -> tuple[Any, Any]:
    return _splits_cached(cfg.dataset, cfg.label_noise)


@lru_cache(maxsize=4)
def _splits_cached(dataset: str, label_noise: float) -> tuple[Any, Any]:
    """(train, test) bundles, built once per process (mnist1d generation takes seconds)."""
    import torch

    from nndiag.io.data import load_data

    train = load_data(f"{dataset}?split=train")
    test = load_data(f"{dataset}?split=test")
    if label_noise > 0:
        rng = np.random.default_rng(12345)
        y = train.y.numpy().copy()
        flip = rng.random(len(y)) < label_noise
        shift = rng.integers(1, train.num_classes, len(y))
        y[flip] = (y[flip] + shift[flip]) % train.num_classes
        train = replace(train, y=torch.as_tensor(y))
    return train, test


def _data_subset(train: Any, fraction: float) -> Any:
    n = max(2, int(round(fraction * len(train))))
    return train.subset(n, seed=777) if n < len(train) else train


def _make_model(cfg: ZooConfig, width: int, in_features: int, seed: int) -> Any:
    from nndiag._utils.seeding import fork_rng
    from nndiag.models.small import MLP

    with fork_rng(seed):
        return MLP(in_features, width, 10, cfg.depth)


def train_config(cfg: ZooConfig, width: int, data: float, bs: int) -> dict[str, Any]:
    """Train every seed of one configuration and measure its metrics and features."""
    from nndiag._utils.training import evaluate, train_classifier
    from nndiag.diagnosis.features import compute_features, hessian_features

    t0 = time.perf_counter()
    train_all, test = _splits(cfg)
    train = _data_subset(train_all, data)
    in_features = int(np.prod(train.input_shape))
    models, rec = [], {"key": config_key(width, data, bs), "width": width, "data": data, "bs": bs,
                       "data_amount": len(train)}
    tr_acc, tr_loss, te_acc, te_loss, traces, tops = [], [], [], [], [], []
    for s in cfg.seeds:
        m = _make_model(cfg, width, in_features, s)
        train_classifier(m, train, epochs=cfg.epochs, batch_size=bs, lr=cfg.lr, momentum=cfg.momentum,
                         seed=s, progress=False)
        lo, acc = evaluate(m, train)
        tr_acc.append(100 * acc)
        tr_loss.append(lo)
        lo, acc = evaluate(m, test)
        te_acc.append(100 * acc)
        te_loss.append(lo)
        h = hessian_features(m, train, n_samples=min(cfg.hessian_samples, len(train)), seed=s, threads=1)
        traces.append(h["hessian_trace"])
        tops.append(h["hessian_top"])
        models.append(m)
    rec["para_amount"] = int(sum(p.numel() for p in models[0].parameters()))
    feats = compute_features(models[0], models[1], train, curve_epochs=cfg.curve_epochs, hessian=False,
                             seed=cfg.seeds[0], threads=1)
    rec.update({
        "train_acc": float(np.mean(tr_acc)), "train_loss": float(np.mean(tr_loss)),
        "test_acc": float(np.mean(te_acc)), "test_loss": float(np.mean(te_loss)),
        "CKA": feats["CKA"], "mode_connectivity": feats["mode_connectivity"],
        "mode_connectivity_peak": feats["mode_connectivity_peak"],
        "hessian_t": math.log(np.mean(traces)) if np.mean(traces) > 0 else float("nan"),
        "hessian_e": math.log(np.mean(tops)) if np.mean(tops) > 0 else float("nan"),
        "curve_errors": feats.curve.errors.tolist(),
        "seconds": time.perf_counter() - t0,
    })
    return rec


def _read_records(directory: Path) -> dict[str, dict[str, Any]]:
    path = directory / RECORDS
    out: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by an interruption: that configuration reruns
        out[rec["key"]] = rec
    return out


def _worker(args: tuple[dict[str, Any], int, float, int]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    cfg_d, w, d, b = args
    return train_config(ZooConfig.from_dict(cfg_d), w, d, b)


def build_zoo(directory: str | Path, cfg: ZooConfig | None = None, *, jobs: int = 1,
              limit: int | None = None, progress: bool | None = None) -> pd.DataFrame:
    """Train the zoo into ``directory`` (resumable) and return its table.

    Parameters
    ----------
    directory : str or Path
        Output folder: ``zoo.json`` (the configuration) and ``records.jsonl``.
    cfg : ZooConfig, optional
        The grid; required for a new folder, read from ``zoo.json`` otherwise (a
        different configuration for an existing folder is an error).
    jobs : int
        Worker processes (one thread each).
    limit : int, optional
        Train at most this many new configurations (for tests / time slices).
    progress : bool, optional

    Returns
    -------
    DataFrame
        :func:`zoo_frame` of the folder.
    """
    from nndiag._utils.progress import progress_bar
    from nndiag._utils.threads import limit_threads

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    cfg_path = d / CONFIG
    if cfg_path.is_file():
        stored = ZooConfig.from_dict(json.loads(cfg_path.read_text()))
        if cfg is not None and cfg != stored:
            raise InputError(f"{d}: holds a zoo with another configuration; use a new folder")
        cfg = stored
    elif cfg is None:
        raise InputError(f"{d}: no zoo.json there; give a zoo configuration")
    else:
        cfg_path.write_text(json.dumps(cfg.to_dict(), indent=2))
    done = _read_records(d)
    todo = [g for g in cfg.grid() if config_key(*g) not in done]
    if limit is not None:
        todo = todo[:limit]
    with open(d / RECORDS, "a") as fh, progress_bar(len(todo), "zoo", enabled=progress) as bar:
        def write(rec: dict[str, Any]) -> None:
            fh.write(json.dumps(rec) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
            bar.advance()

        if jobs > 1 and len(todo) > 1:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            # spawn, not fork: a forked child of a process whose autograd ran on CUDA hangs or fails
            with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as ex:
                for rec in ex.map(_worker, [(cfg.to_dict(), *g) for g in todo]):
                    write(rec)
        else:
            with limit_threads(1):
                for g in todo:
                    write(train_config(cfg, *g))
    return zoo_frame(d)


def _rfi(acc: np.ndarray, axis: int, increase: bool) -> np.ndarray:
    """Best accuracy reachable moving along ``axis`` (up if ``increase``) minus the current one."""
    a = np.moveaxis(acc, axis, -1)
    if increase:
        best = np.flip(np.maximum.accumulate(np.flip(a, -1), -1), -1)
    else:
        best = np.maximum.accumulate(a, -1)
    return np.moveaxis(best - a, -1, axis)


def label_frame(df: pd.DataFrame) -> pd.DataFrame:
    """Add ``rfi_*`` and the three labels to a complete grid (columns width, data, bs, test_acc)."""
    widths = sorted(df["width"].unique())
    datas = sorted(df["data"].unique())
    bss = sorted(df["bs"].unique())
    if len(df) != len(widths) * len(datas) * len(bss):
        raise DataError(f"the zoo grid is incomplete ({len(df)} of {len(widths) * len(datas) * len(bss)} "
                        "configurations): finish it with 'nndiag zoo build' before labelling")
    acc = np.full((len(bss), len(widths), len(datas)), np.nan)
    pos = {}
    for i, r in df.reset_index(drop=True).iterrows():
        idx = (bss.index(r["bs"]), widths.index(r["width"]), datas.index(r["data"]))
        acc[idx] = r["test_acc"]
        pos[i] = idx
    rfi = {
        "rfi_inc_temp": _rfi(acc, 0, increase=False),  # smaller batch = higher temperature
        "rfi_dec_temp": _rfi(acc, 0, increase=True),
        "rfi_width": _rfi(acc, 1, increase=True),
        "rfi_data": _rfi(acc, 2, increase=True),
    }
    out = df.reset_index(drop=True).copy()
    for k, arr in rfi.items():
        out[k] = [0.0 if abs(v) < 1e-9 else v for v in (float(arr[pos[i]]) for i in range(len(out)))]

    def cmp(a: float, b: float, hi: str, lo: str) -> str:
        # accuracies are means of exact ratios: differences below 1e-9 pp are float noise (a tie)
        return hi if a > b + 1e-9 else lo if a < b - 1e-9 else "optimal"

    temp = np.maximum(out["rfi_inc_temp"], out["rfi_dec_temp"])
    out["bs_failure"] = [cmp(a, b, "small", "large")
                         for a, b in zip(out["rfi_inc_temp"], out["rfi_dec_temp"], strict=True)]
    out["width_vs_batch"] = [cmp(a, b, "width", "batch") for a, b in zip(out["rfi_width"], temp, strict=True)]
    out["data_vs_batch"] = [cmp(a, b, "data", "batch") for a, b in zip(out["rfi_data"], temp, strict=True)]
    return out


def zoo_frame(directory: str | Path) -> pd.DataFrame:
    """The zoo's table in the paper's column layout, labelled when the grid is complete."""
    d = Path(directory)
    recs = _read_records(d)
    if not recs:
        raise DataError(f"{d}: no zoo records ({RECORDS}); build one with 'nndiag zoo build'")
    df = pd.DataFrame(list(recs.values())).drop(columns=["curve_errors"], errors="ignore")
    df["train_error"] = 100 - df["train_acc"]
    df["test_error"] = 100 - df["test_acc"]
    df["log_data_amount"] = np.log(df["data_amount"])
    df["log_para_amount"] = np.log(df["para_amount"])
    df["log_bs"] = np.log(df["bs"])
    df.insert(0, "name", df.pop("key"))
    df = df.sort_values(["width", "data", "bs"]).reset_index(drop=True)
    cfg_path = d / CONFIG
    if cfg_path.is_file():
        cfg = ZooConfig.from_dict(json.loads(cfg_path.read_text()))
        if len(df) == len(cfg.grid()):
            return label_frame(df)
    return df


def default_zoo(dataset: str = "digits", label_noise: float = 0.0, **overrides: Any) -> ZooConfig:
    """The configuration of the zoos nndiag ships thresholds for (see scripts/mdtree_zoo.py)."""
    return ZooConfig(dataset=dataset, label_noise=label_noise, **overrides)


__all__: Sequence[str] = ["ZooConfig", "build_zoo", "zoo_frame", "label_frame", "train_config",
                          "config_key", "default_zoo"]
