"""Reproduction of the MD tree paper's five diagnosis cases from its released tables.

The two tables (``dataframe_normal_public.csv``: clean labels, the training pool;
``dataframe_noise_public.csv``: 10 % label noise, the test set) hold 1,690
ResNet-18/CIFAR-10 configurations each. Every case trains on a subset of the clean
table and is scored on all non-``optimal`` rows of the noisy table, for each seed
in ``[42, 90, 38, 18, 72]``; the reported figure is the mean test accuracy (%).

======  ====  =======================================================  ======================
case    task  training set (per seed)                                  paper MD tree / valid. / hyper.
======  ====  =======================================================  ======================
1       Q1    8 random (data, width) groups of 130 (data-major order)  87.70 / 72.82 / 49.56
2       Q1    data fraction ≤ 1 (5K images)                            75.89 / 51.73 / 64.74
3       Q1    width 2 only                                             82.56 / 67.55 / 60.12
4       Q2a   1 random data fraction                                   74.10 / 55.79 / 53.54
5       Q2a   data fraction ≤ 1                                        78.16 / 63.61 / 53.54
======  ====  =======================================================  ======================

Random draws follow the paper exactly: ``np.random.seed(seed)`` then
``np.random.choice(n, k, replace=False)`` (the global NumPy generator is saved and
restored around each draw, so callers' random state is untouched).

Examples
--------
>>> res = run_benchmark("../shared/benchmarks/mdtree")  # doctest: +SKIP
>>> res.table("cases")[["case", "mdtree", "validation", "hyperparameter"]]  # doctest: +SKIP
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from nndiag.diagnosis.baselines import baseline_features, fit_tree_baseline
from nndiag.diagnosis.mdtree import MDTree, get_spec
from nndiag.errors import DataError, InputError
from nndiag.report.results import Result, provenance

SEEDS: tuple[int, ...] = (42, 90, 38, 18, 72)
TABLE_FILES = {"normal": "dataframe_normal_public.csv", "noise": "dataframe_noise_public.csv"}
REQUIRED_COLUMNS: tuple[str, ...] = (
    "width", "data", "bs", "log_data_amount", "log_para_amount",
    "train_error", "train_loss", "test_loss", "test_error",
    "mode_connectivity_peak", "hessian_t", "CKA", "bs_failure", "width_vs_batch",
)
LABELS = {"bs_failure": ("small", "large", "optimal"), "width_vs_batch": ("width", "batch", "optimal"),
          "data_vs_batch": ("data", "batch", "optimal")}


@dataclass(frozen=True)
class Case:
    """One reproduction case: a tree, a training-set rule and the paper's figures."""

    number: int
    name: str
    tree: str
    sampling: str  # random_groups | random_data | data_limit | width_limit
    factor: int
    description: str
    paper: tuple[float, float, float]  # MD tree, validation, hyperparameter


CASES: tuple[Case, ...] = (
    Case(1, "dataset-transfer", "temp", "random_groups", 8,
         "Q1 temperature; train on 8 random (data, width) groups of clean labels", (87.70, 72.82, 49.56)),
    Case(2, "scale-transfer-data", "temp", "data_limit", 1,
         "Q1 temperature; train on data fraction <= 1 (5K images)", (75.89, 51.73, 64.74)),
    Case(3, "scale-transfer-width", "temp", "width_limit", 2,
         "Q1 temperature; train on width 2 only", (82.56, 67.55, 60.12)),
    Case(4, "width-dataset-transfer", "width", "random_data", 1,
         "Q2a width vs temperature; train on 1 random data fraction", (74.10, 55.79, 53.54)),
    Case(5, "width-scale-transfer-data", "width", "data_limit", 1,
         "Q2a width vs temperature; train on data fraction <= 1", (78.16, 63.61, 53.54)),
)


def _read_csv(path: Path, required: Sequence[str]) -> pd.DataFrame:
    if not path.is_file():
        raise DataError(f"{path}: file not found (expected the MD tree table {path.name})")
    try:
        df = pd.read_csv(path)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DataError(f"{path}: cannot read CSV ({first})") from None
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}")
    if df.empty:
        raise DataError(f"{path}: no rows")
    numeric = [c for c in required if c not in LABELS]
    bad = [c for c in numeric if not pd.api.types.is_numeric_dtype(df[c]) or not np.isfinite(df[c]).all()]
    if bad:
        raise DataError(f"{path}: column(s) {', '.join(bad)} must be finite numbers")
    for col, valid in LABELS.items():
        if col in df.columns:
            unknown = sorted(set(df[col].astype(str)) - set(valid))
            if unknown:
                raise DataError(f"{path}: column {col} has unknown label(s) {', '.join(unknown)}; "
                                f"valid: {', '.join(valid)}")
    return df


def load_tables(directory: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The (clean, noisy) tables from a folder holding the two released CSVs.

    Raises
    ------
    DataError
        When a file is absent, unreadable, lacks a column or holds bad values.
    """
    d = Path(directory)
    if not d.is_dir():
        raise DataError(f"{d}: not a folder (expected one holding {', '.join(TABLE_FILES.values())})")
    return (_read_csv(d / TABLE_FILES["normal"], REQUIRED_COLUMNS),
            _read_csv(d / TABLE_FILES["noise"], REQUIRED_COLUMNS))


def _with_legacy_seed(seed: int, fn: Callable[[], np.ndarray]) -> np.ndarray:
    state = np.random.get_state()  # noqa: NPY002 - the paper uses the legacy generator
    try:
        np.random.seed(seed)  # noqa: NPY002 - the paper's protocol uses the legacy generator
        return fn()
    finally:
        np.random.set_state(state)  # noqa: NPY002


def sample_training_rows(frame: pd.DataFrame, case: Case, seed: int) -> pd.DataFrame:
    """The training rows of ``case`` for ``seed`` (``frame`` already without ``optimal``)."""
    data_list = sorted(set(frame["data"]))
    width_list = sorted(set(frame["width"]))
    if case.sampling == "random_groups":
        groups = [(d, w) for d in data_list for w in width_list]  # data-major
        if case.factor > len(groups):
            raise InputError(f"case {case.number}: {case.factor} groups asked, table has {len(groups)}")
        idx = _with_legacy_seed(seed, lambda: np.random.choice(len(groups), case.factor, replace=False))  # noqa: NPY002
        chosen = {groups[i] for i in idx}
        mask = [(d, w) in chosen for d, w in zip(frame["data"], frame["width"], strict=True)]
        return frame[np.asarray(mask, dtype=bool)]
    if case.sampling == "random_data":
        if case.factor > len(data_list):
            raise InputError(f"case {case.number}: {case.factor} data fractions asked, table has {len(data_list)}")
        picked = _with_legacy_seed(seed, lambda: np.random.choice(data_list, case.factor, replace=False))  # noqa: NPY002
        return frame[frame["data"].isin(picked)]
    if case.sampling == "data_limit":
        return frame[frame["data"] <= case.factor]
    if case.sampling == "width_limit":
        return frame[frame["width"] <= case.factor]
    raise InputError(f"unknown sampling rule '{case.sampling}'")


def run_case(normal: pd.DataFrame, noise: pd.DataFrame, case: Case, seeds: Sequence[int] = SEEDS,
             *, methods: Sequence[str] = ("paper", "exact"), baselines: bool = True) -> pd.DataFrame:
    """Per-seed test accuracies (%) of MD tree (paper and exact) and both baselines."""
    spec = get_spec(case.tree)
    label = spec.label
    train_pool = normal[normal[label] != "optimal"]
    test = noise[noise[label] != "optimal"]
    y_test = test[label].astype(str).to_numpy()
    rows = []
    for seed in seeds:
        train = sample_training_rows(train_pool, case, seed)
        if train.empty:
            raise DataError(f"case {case.number}: the training subset for seed {seed} is empty")
        y = train[label].astype(str).to_numpy()
        X = train[list(spec.features)].to_numpy(float)
        Xt = test[list(spec.features)].to_numpy(float)
        row = {"case": case.number, "seed": int(seed), "n_train": len(train), "n_test": len(test)}
        for method, col in (("paper", "mdtree"), ("exact", "mdtree_improved")):
            if method not in methods:
                continue
            tree = MDTree.fit(X, y, spec, method=method)
            row[col] = 100.0 * tree.score(Xt, y_test)
            row[f"{col}_thresholds"] = list(tree.thresholds)
        for kind in ("validation", "hyperparameter") if baselines else ():
            cols = list(baseline_features(kind, label))
            clf = fit_tree_baseline(train[cols].to_numpy(float), y, seed=int(seed))
            row[kind] = 100.0 * float(np.mean(clf.predict(test[cols].to_numpy(float)) == y_test))
        rows.append(row)
    return pd.DataFrame(rows)


def run_benchmark(directory: str | Path, *, cases: Sequence[int] | None = None,
                  seeds: Sequence[int] = SEEDS) -> Result:
    """Run the paper's cases on the released tables in ``directory``.

    Parameters
    ----------
    directory : str or Path
        Folder with ``dataframe_normal_public.csv`` and ``dataframe_noise_public.csv``.
    cases : sequence of int, optional
        Case numbers (default all five).
    seeds : sequence of int
        Sampling seeds (the paper's five by default).

    Returns
    -------
    Result
        ``kind="mdtree-benchmark"``; table ``cases`` (one row per case: mean accuracies
        of ``mdtree``, ``validation``, ``hyperparameter``, ``mdtree_improved`` and the
        paper's figures) and table ``seeds`` (one row per case and seed).
    """
    t0 = time.perf_counter()
    normal, noise = load_tables(directory)
    chosen = CASES if cases is None else tuple(c for c in CASES if c.number in set(cases))
    if cases is not None and len(chosen) != len(set(cases)):
        raise InputError(f"unknown case number in {list(cases)}; valid: 1-{len(CASES)}")
    if not seeds:
        raise InputError("at least one seed is needed")
    per_seed, rows = [], []
    for case in chosen:
        df = run_case(normal, noise, case, seeds)
        per_seed.append(df)
        rows.append({
            "name": case.name, "case": case.number, "tree": case.tree, "description": case.description,
            "mdtree": float(df["mdtree"].mean()), "validation": float(df["validation"].mean()),
            "hyperparameter": float(df["hyperparameter"].mean()),
            "mdtree_improved": float(df["mdtree_improved"].mean()),
            "paper_mdtree": case.paper[0], "paper_validation": case.paper[1],
            "paper_hyperparameter": case.paper[2],
        })
    table = pd.DataFrame(rows)
    seeds_table = pd.concat(per_seed, ignore_index=True)
    seeds_table.insert(0, "name", [CASES[c - 1].name for c in seeds_table["case"]])
    summary = {
        "cases": len(table),
        "max_abs_diff_mdtree_vs_paper": float((table["mdtree"] - table["paper_mdtree"]).abs().max()),
        "mean_mdtree": float(table["mdtree"].mean()),
        "mean_mdtree_improved": float(table["mdtree_improved"].mean()),
        "mean_validation": float(table["validation"].mean()),
    }
    return Result("mdtree-benchmark", tables={"cases": table, "seeds": seeds_table}, summary=summary,
                  params={"directory": str(directory), "seeds": list(seeds),
                          "cases": [c.number for c in chosen]},
                  seed=None, timing={"total": time.perf_counter() - t0}, meta=provenance())
