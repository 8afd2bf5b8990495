"""The NAS-Bench-201 search space and its benchmark tables.

- :func:`all_archs` enumerates the 5⁶ = 15,625 cells;
- :func:`load_benchmark` reads a table of architectures with their 200-epoch test
  accuracies (the NATS-Bench CSV with columns ``ArchitectureString``,
  ``CIFAR10TestAccuracy200Epochs``, ``CIFAR100TestAccuracy200Epochs``,
  ``ImageNetTestAccuracy200Epochs``; row i = NB201 index i);
- :func:`sample_archs` draws a seeded random sample of it;
- :func:`naslib_key_to_arch` and :func:`load_naslib_scores` read NASLib's stored
  zero-cost scores (NAS-Bench-Suite-Zero), whose keys are op-index tuples.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd

from nndiag.errors import DataError, InputError
from nndiag.models.nb201 import OPS, arch_string, parse_arch

#: Benchmark accuracy columns → short dataset names.
DATASETS: dict[str, str] = {
    "CIFAR10TestAccuracy200Epochs": "cifar10",
    "CIFAR100TestAccuracy200Epochs": "cifar100",
    "ImageNetTestAccuracy200Epochs": "imagenet16",
}
#: NASLib's op order for its tuple keys.
NASLIB_OPS: tuple[str, ...] = ("skip_connect", "none", "nor_conv_3x3", "nor_conv_1x1", "avg_pool_3x3")
#: NASLib's proxy names → nndiag's.
NASLIB_NAMES: dict[str, str] = {"jacov": "jacob_cov"}


def all_archs() -> list[str]:
    """The 15,625 NB201 cell strings (edges 0→1, 0→2, 1→2, 0→3, 1→3, 2→3 in product order)."""
    out = []
    for e01, e02, e12, e03, e13, e23 in itertools.product(OPS, repeat=6):
        out.append(arch_string((((e01, 0),), ((e02, 0), (e12, 1)), ((e03, 0), (e13, 1), (e23, 2)))))
    return out


def load_benchmark(path: str | Path) -> pd.DataFrame:
    """The benchmark table: ``name`` (arch string), ``index``, ``cifar10``, ``cifar100``, ``imagenet16``.

    Raises
    ------
    DataError
        When the file is missing or lacks the architecture column.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"benchmark table {path} not found")
    try:
        raw = pd.read_csv(p)
    except Exception as exc:
        raise DataError(f"cannot read benchmark table {path}: {exc}") from exc
    if "ArchitectureString" not in raw.columns:
        raise DataError(f"{path}: expected an 'ArchitectureString' column "
                        f"(and accuracy columns {', '.join(DATASETS)})")
    df = pd.DataFrame({"name": raw["ArchitectureString"].astype(str), "index": np.arange(len(raw))})
    for col, short in DATASETS.items():
        if col in raw.columns:
            df[short] = raw[col].astype(float)
    if len(df.columns) == 2:
        raise DataError(f"{path}: no accuracy column among {', '.join(DATASETS)}")
    return df


def sample_archs(table: pd.DataFrame, n: int | None, seed: int = 0) -> pd.DataFrame:
    """A seeded random sample of ``n`` rows (every row, shuffled, when ``n`` is None).

    Any prefix of the returned order is itself a uniform random sample.
    """
    if n is not None and (n < 1 or n > len(table)):
        raise InputError(f"--sample must be between 1 and {len(table)}, got {n}")
    order = np.random.default_rng(seed).permutation(len(table))
    return table.iloc[order[: n if n is not None else len(table)]].reset_index(drop=True)


def naslib_key_to_arch(key: str) -> str:
    """NASLib's key ``"(o0, o1, o2, o3, o4, o5)"`` → NB201 string (o2 and o3 swapped)."""
    try:
        o = [int(t) for t in key.strip().strip("()").split(",")]
    except ValueError as exc:
        raise InputError(f"bad NASLib key {key!r}") from exc
    if len(o) != 6 or any(not 0 <= v < len(NASLIB_OPS) for v in o):
        raise InputError(f"bad NASLib key {key!r}: six op indices in 0..4 expected")
    ops = [NASLIB_OPS[v] for v in o]
    s = f"|{ops[0]}~0|+|{ops[1]}~0|{ops[3]}~1|+|{ops[2]}~0|{ops[4]}~1|{ops[5]}~2|"
    parse_arch(s)
    return s


def load_naslib_scores(path: str | Path, dataset: str = "cifar10") -> pd.DataFrame:
    """NASLib's stored scores: ``name`` (arch string), ``val_accuracy`` and one column per proxy.

    Proxy columns use nndiag's names (``jacov`` → ``jacob_cov``).
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"NASLib score file {path} not found")
    doc = json.loads(p.read_text())
    if dataset not in doc:
        raise DataError(f"{path}: no section {dataset!r}; sections: {', '.join(doc)}")
    rows = []
    for key, rec in doc[dataset].items():
        row = {"name": naslib_key_to_arch(key), "val_accuracy": rec.get("val_accuracy")}
        for k, v in rec.items():
            if isinstance(v, dict) and "score" in v:
                row[NASLIB_NAMES.get(k, k)] = v["score"]
        rows.append(row)
    return pd.DataFrame(rows)
