"""SVD smoothing and sharpening: WeightWatcher's two weight transforms, exact and on a copy.

``smooth(model, method)`` keeps, in every analysed layer, the components of its singular value
decomposition that the layer's own spectrum marks as signal, and drops the rest (a low-rank
approximation, the best one of its rank in Frobenius norm):

- ``detx``: the ``detX_num`` largest eigenvalues (the det X = 1 condition; WeightWatcher's default);
- ``lambda_min``: the power-law tail, eigenvalues at or above the fitted ``xmin`` (``num_pl_spikes``);
- ``rmt``: the spikes above the Marchenko–Pastur bulk edge (``num_spikes``);
- ``auto``: ``rmt`` for a layer with ``alpha > 6`` (under-trained: a random-like bulk), else ``detx``;
- ``percent``: ``int(percent · num_evals)`` components.

``method="sharpen"`` (WeightWatcher's ``SVDSharpness``) clips correlation traps, the few large
entries that make a layer's *element-shuffled* matrix show spikes above its Marchenko–Pastur
bulk (``num_traps`` of ``analyze(randomize=True)``): each matrix's entries are shuffled (seeded),
the shuffled matrix loses its components above the bulk edge, and the entries go back to their
places. Correlated structure does not survive the shuffle, so what is removed is what the
large entries put there.

What nndiag does differently from WeightWatcher 0.7.7's ``SVDSmoothing`` / ``SVDSharpness``:

- the user's model is never edited: the result holds a transformed *copy* (``result.model``) or,
  for a weights file without an architecture, the transformed tensors (``result.state_dict()``),
  which :meth:`SmoothResult.save` writes as safetensors or a PyTorch file;
- the truncation is exact (the projection on the right singular vectors of the kept components,
  from the float64 eigendecomposition of ``WᵀW``); WeightWatcher's CPU path uses scikit-learn's
  randomised ``TruncatedSVD`` (7 power iterations), an approximation of it;
- a pooled convolution's ``k`` components (counted on its pooled spectrum) are shared among its
  ``rf`` kernel positions as WeightWatcher does by default, conservatively: ``ceil(k / rf)`` kept in
  every position, or ``floor(k / rf)`` removed from every position (so a convolution with fewer
  traps than kernel positions is not sharpened). ``per_position=False`` instead keeps (or removes)
  exactly the ``k`` largest eigenvalues over all positions. On the pretrained CIFAR-10 ResNets the
  per-position rule kept more accuracy (``docs/BENCHMARKS.md``);
- WeightWatcher 0.7.7's ``SVDSharpness`` counts the traps on the shuffled matrix but then removes
  that many leading components of the *unshuffled* weights (it rewrites the layer's stored
  weights, not its shuffled copy), which is a different transform: on the pretrained CIFAR-10
  ResNets it changed nothing (``docs/BENCHMARKS.md``);
- fused attention weights are transformed per Q, K, V part, as they are analysed; LoRA products,
  parametrised weights and integer or quantised weights are left as they are, with the reason.
"""

from __future__ import annotations

import copy
import io
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from nndiag.errors import InputError
from nndiag.report.results import Result, jsonable, provenance

METHODS = ("detx", "lambda_min", "rmt", "auto", "percent", "sharpen")
#: File endings :meth:`SmoothResult.save` writes.
SAVE_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
LAYER_COLUMNS = ["name", "tensor", "kind", "N", "M", "rf", "num_evals", "alpha", "rule", "selected",
                 "kept", "removed", "energy_kept", "rel_change", "status", "reason"]


@dataclass(frozen=True)
class SmoothResult(Result):
    """A :class:`~nndiag.report.results.Result` with the transformed weights.

    ``tables["layers"]``: one row per analysed layer (``status`` ``changed``, ``unchanged`` or
    ``skipped``, with ``kept`` / ``removed`` components, ``energy_kept`` = Σ kept σ² / Σ σ² and
    ``rel_change`` = ‖W′ − W‖_F / ‖W‖_F). ``model`` is the transformed copy of the module (None
    for weights without an architecture); ``changed`` maps each rewritten tensor's name to its
    new value (original dtype).
    """

    model: torch.nn.Module | None = field(default=None, repr=False, compare=False)
    changed: dict[str, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)
    source: Any = field(default=None, repr=False, compare=False)

    @property
    def layers(self) -> pd.DataFrame:
        return self.tables["layers"]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor of the transformed model, by name (the model's own ``state_dict`` when
        there is a module; else the source's stored tensors with the changed ones replaced)."""
        if self.model is not None:
            return self.model.state_dict()
        return {i.name: self.changed.get(i.name, self.source.get(i.name))
                for i in self.source.infos() if not i.computed}

    def save(self, path: str | Path) -> Path:
        """Write :meth:`state_dict` to ``path`` (``.safetensors``, else ``torch.save``) atomically."""
        from nndiag._utils.files import atomic_write, check_writable

        p = check_writable(path, SAVE_SUFFIXES, "smoothed weights file")
        state = self.state_dict()
        if p.suffix.lower() == ".safetensors":
            from safetensors.torch import save

            seen: set[int] = set()
            out = {}
            for k, v in state.items():
                v = v.detach()
                key = v.untyped_storage().data_ptr()
                # safetensors refuses tensors that share memory (tied weights): those are copied
                out[k] = v.clone().contiguous() if key in seen or not v.is_contiguous() else v
                seen.add(key)
            return atomic_write(p, save(out))
        buf = io.BytesIO()
        torch.save(state, buf)
        return atomic_write(p, buf.getvalue())


def _selected(row: dict[str, Any], method: str, percent: float) -> tuple[int, str, str]:
    """``(k, rule, reason)``: how many pooled components a smoothing method keeps in this layer,
    from the analysis' columns, the rule that chose them, and why none when there is no count."""
    rule = method
    if method == "auto":
        alpha = row.get("alpha")
        rule = "rmt" if alpha is not None and math.isfinite(alpha) and alpha > 6.0 else "detx"
    if rule == "percent":
        return int(percent * int(row["num_evals"])), rule, ""
    if rule == "lambda_min":
        if row.get("status") != "success":
            return 0, rule, f"no power-law fit ({row.get('reason') or row.get('status')})"
        k = row.get("num_pl_spikes")
    elif rule == "detx":
        k = row.get("detX_num")
    else:  # rmt
        k = row.get("num_spikes")
    if k is None or not math.isfinite(float(k)):
        return 0, rule, f"no {rule} count for this layer"
    return int(k), rule, ""


def _mask(s: torch.Tensor, k: int, remove: bool, per_slice: bool) -> torch.Tensor:
    """Which singular values ``s`` ``(B, m)`` (each row descending) are kept: the ``k`` largest
    over all rows, or all but those (``remove``); ``per_slice``: the ``ceil(k / B)`` largest of
    each row, or all but its ``floor(k / B)`` largest."""
    B, m = s.shape
    top = torch.zeros(B * m, dtype=torch.bool)
    if per_slice:
        kk = min(m, k // B if remove else math.ceil(k / B))
        top.view(B, m)[:, :kk] = True
    else:
        order = torch.argsort((s * s).reshape(-1).cpu(), descending=True, stable=True)
        top[order[: min(k, B * m)]] = True
    top = top.view(B, m).to(s.device)
    return ~top if remove else top


def _project(x: torch.Tensor, vecs: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``x`` projected on the right singular vectors ``vecs`` flagged in ``keep`` ``(B, m)``.

    When every matrix keeps the same directions (one matrix, or the same count in each kernel
    position), only the smaller of the kept or the dropped set is multiplied through:
    ``x·V_k·V_kᵀ`` or ``x − x·V_r·V_rᵀ``.
    """
    if bool((keep == keep[:1]).all()):
        kept = keep[0]
        if int(kept.sum()) <= kept.numel() // 2:
            v = vecs[:, :, kept]
            return (x @ v) @ v.mT
        v = vecs[:, :, ~kept]
        return x - (x @ v) @ v.mT
    return (x @ (vecs * keep[:, None, :])) @ vecs.mT


def _permutation(mats: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """A random order of each matrix's entries: ``(B, n·m)`` indices, ``rng.permutation`` per
    matrix (an argsort of random keys took 0.27 s for a 3072×768 matrix)."""
    n = mats[0].numel()
    return torch.as_tensor(np.stack([rng.permutation(n) for _ in range(mats.shape[0])]), device=mats.device)


def _traps(s: torch.Tensor, spec: Any) -> int:
    """Correlation traps: eigenvalues of the element-shuffled matrices (singular values ``s``,
    pooled, any order) above their Marchenko–Pastur bulk edge (``num_traps`` of
    ``analyze(randomize=True)``)."""
    from nndiag.spectral.mp import fit_mp

    ev = np.sort((s * s).reshape(-1).cpu().numpy())
    return int(fit_mp(ev, spec.N / spec.M, spec.M).num_spikes)


def _write(spec: Any, wf: torch.Tensor, mats: torch.Tensor, new: torch.Tensor) -> None:
    """Put a layer's new ``(B, n, m)`` stack back where :func:`layer_matrices` took ``mats``
    from in ``wf`` (a view of it, or a grouped Q/K/V part's row blocks)."""
    if mats.untyped_storage().data_ptr() == wf.untyped_storage().data_ptr():
        mats.copy_(new)
        return
    if spec.groups is not None and spec.rows is not None:
        start, stop = spec.rows
        block = wf.reshape(spec.groups, -1, wf.shape[1])[:, start:stop]
        m2 = new[0] if new.shape[1] == spec.groups * (stop - start) else new[0].mT
        block.copy_(m2.reshape(spec.groups, stop - start, wf.shape[1]))
        return
    raise RuntimeError(f"{spec.name}: cannot write the transformed matrices back")  # pragma: no cover


def _unwritable(spec: Any, info: Any) -> str:
    """Why a layer's tensor cannot be rewritten ("" when it can)."""
    if spec.kind == "lora-b":
        return "a LoRA product B·A: its factors are left as they are"
    if info.computed:
        return "computed from a parametrisation: no stored tensor to rewrite"
    if not info.dtype.startswith(("float", "bfloat")):
        return f"{info.dtype} weights are not rewritten"
    return ""


def smooth(
    model: Any,
    method: str = "detx",
    *,
    percent: float = 0.8,
    conv_mode: str = "ww",
    conventions: str = "nndiag",
    per_position: bool = True,
    seed: int = 0,
    layers: list[str] | None = None,
    device: str | torch.device = "auto",
    threads: int | None = None,
    hf_config: dict[str, Any] | None = None,
    **analyze_options: Any,
) -> SmoothResult:
    """A copy of the model with each layer's weights truncated to the components its spectrum selects.

    Parameters
    ----------
    model : nn.Module, str, Path, LoadedModel or state dict
        Anything :func:`nndiag.spectral.analyze` accepts. It is never modified.
    method : {"detx", "lambda_min", "rmt", "auto", "percent", "sharpen"}
        Which components stay (see the module docstring); ``sharpen`` clips correlation traps.
    percent : float
        Fraction of each layer's components kept by ``method="percent"`` (0 < percent ≤ 1).
    conv_mode : {"ww", "unfold"}
        Convolutions per kernel position (pooled) or unfolded, as in ``analyze``.
    conventions : {"nndiag", "ww"}
        The analysis' conventions (``ww``: WeightWatcher's small-sample fit rule; counts
        do not depend on its ×0.5 conv scale).
    per_position : bool
        A pooled convolution's components shared equally among its kernel positions
        (``ceil(k / rf)`` kept or ``floor(k / rf)`` removed in each, as WeightWatcher); else the
        ``k`` largest eigenvalues over all positions.
    seed : int
        Seed of ``sharpen``'s element shuffles.
    layers : list of str, optional
        Only these layers (names or tensor names).
    device : str or torch.device
        Where the SVDs run (``auto`` = CUDA when present); float64 everywhere.
    threads : int, optional
        BLAS/OpenMP threads (as ``analyze``).
    hf_config : dict, optional
        A Hugging Face config for fused Q/K/V layouts (as ``analyze``).
    **analyze_options
        Further options of :func:`~nndiag.spectral.analyze.analyze` (``min_evals``, fit options).

    Returns
    -------
    SmoothResult

    Examples
    --------
    >>> import torch
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <...>
    >>> net = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Linear(128, 10))
    >>> res = smooth(net, "percent", percent=0.5)
    >>> list(res.layers["kept"])
    [32, 5]
    >>> int(torch.linalg.matrix_rank(res.model[0].weight))
    32
    """
    from nndiag._utils.device import resolve_device
    from nndiag._utils.threads import limit_threads
    from nndiag.io.models import load_model
    from nndiag.spectral.analyze import _source, analyze
    from nndiag.spectral.matrices import grouped_qkv, layer_matrices, plan_layers

    if method not in METHODS:
        raise InputError(f"unknown smoothing method '{method}'; choose one of {', '.join(METHODS)}")
    if method == "percent" and not 0.0 < percent <= 1.0:
        raise InputError(f"percent must be in (0, 1], got {percent}")
    t0 = time.perf_counter()
    if isinstance(model, (str, Path, torch.nn.Module)):
        model = load_model(model)
    source, module, name, config = _source(model)
    dev = resolve_device(device)
    mp = method in ("rmt", "auto")
    res = analyze(model, conv_mode=conv_mode, conventions=conventions, mp_fit=mp, layers=layers,
                  device=dev, threads=threads, hf_config=hf_config, **analyze_options)
    t_analysis = time.perf_counter() - t0
    infos = {i.name: i for i in source.infos()}
    plan_kw = {k: analyze_options[k] for k in ("min_evals", "max_evals", "max_N") if k in analyze_options}
    specs, _ = plan_layers(list(infos.values()), conv_mode=conv_mode,
                           qkv_layout=grouped_qkv(config if hf_config is None else hf_config), **plan_kw)
    spec_of = {s.name: s for s in specs}
    # a float64 copy of the tensor being rewritten (the parts of one tensor are consecutive rows),
    # back in its own dtype as soon as the rows move on: one float64 copy at a time
    work: dict[str, torch.Tensor] = {}
    changed: dict[str, torch.Tensor] = {}

    def finish() -> None:
        for t, w in work.items():
            changed[t] = w.to("cpu", getattr(torch, infos[t].dtype))
        work.clear()

    rows = []
    rng = np.random.default_rng(seed)
    remove = method == "sharpen"
    with limit_threads(threads), torch.no_grad():
        for row in res.layers.to_dict(orient="records"):
            spec = spec_of[row["name"]]
            out = {c: row.get(c) for c in ("name", "tensor", "kind", "N", "M", "rf", "num_evals", "alpha")}
            out.update(kept=None, removed=None, energy_kept=None, rel_change=None)
            blocked = _unwritable(spec, infos[spec.tensor])
            if blocked:
                rows.append({**out, "rule": method, "selected": None, "status": "skipped", "reason": blocked})
                continue
            if remove:
                k, rule, reason = 0, "traps", ""
            else:
                k, rule, reason = _selected(row, method, percent)
                if not reason and k <= 0:
                    reason = "no component selected"
                elif not reason and k >= int(row["num_evals"]):
                    reason = "every component selected"
            wf = None
            if not reason:
                wf = work.get(spec.tensor)
                if wf is None:
                    finish()
                    start = changed.pop(spec.tensor, None)  # (parts of a tensor seen again later)
                    start = source.get(spec.tensor) if start is None else start
                    wf = work[spec.tensor] = start.to(dev, torch.float64, copy=True).contiguous()
                mats = layer_matrices(spec, wf, conv_mode)
                B = mats.shape[0]
                perm = _permutation(mats, rng) if remove else None
                x = mats if perm is None else torch.gather(mats.reshape(B, -1), 1, perm).reshape(mats.shape)
                # right singular vectors from the Gram matrix of the smaller side (n ≥ m), in
                # float64: 3-4× faster than an SVD for 3072×768 and equal to it to ~1e-14
                gram = x.mT @ x
                vecs = None
                if remove:  # the trap count from float32 eigenvalues alone: most layers have none
                    k = _traps(torch.linalg.eigvalsh(gram.float()).clamp_min(0.0).sqrt(), spec)
                    if k <= 0:
                        reason = "no correlation trap"
                    elif per_position and k < B:
                        reason = f"fewer traps ({k}) than kernel positions ({B})"
                if not reason:
                    lam, vecs = torch.linalg.eigh(gram)
                    vecs = vecs.flip(-1)
                    sv = lam.flip(-1).clamp_min(0.0).sqrt()
            out.update(rule=rule, selected=k)
            if reason:
                out.update(kept=int(row["num_evals"]), removed=0, energy_kept=1.0, rel_change=0.0)
                rows.append({**out, "status": "unchanged", "reason": reason})
                continue
            keep = _mask(sv, k, remove, per_position and B > 1)
            sk = sv * keep
            new = _project(x, vecs, keep)
            if perm is not None:  # back to the entries' own places
                new = torch.empty_like(new).reshape(B, -1).scatter_(1, perm, new.reshape(B, -1)).reshape(mats.shape)
            e = float((sv * sv).sum())
            out.update(kept=int(keep.sum()), removed=int((~keep).sum()),
                       energy_kept=float((sk * sk).sum()) / e if e > 0 else math.nan,
                       rel_change=float(torch.linalg.vector_norm(new - mats) / math.sqrt(e)) if e > 0 else 0.0)
            _write(spec, wf, mats, new)
            rows.append({**out, "status": "changed", "reason": ""})
        finish()
        new_module = None
        if module is not None:
            try:
                new_module = copy.deepcopy(module)
            except Exception as exc:  # noqa: BLE001 - a module that cannot be copied: weights only
                raise InputError(f"cannot copy the model to transform it ({type(exc).__name__}: {exc}); "
                                 "pass its weights file or state dict instead") from exc
            state = new_module.state_dict(keep_vars=True)
            for t, w in changed.items():
                state[t].data.copy_(w)
    df = pd.DataFrame(rows, columns=LAYER_COLUMNS)
    for c in ("kept", "removed"):  # counts, None where a layer was skipped
        df[c] = pd.Series([r[c] for r in rows], dtype=object)
    done = df[df["status"] == "changed"]
    summary = {
        "model": name, "method": method, "layers_changed": int(len(done)),
        "layers_unchanged": int((df["status"] == "unchanged").sum()),
        "layers_skipped": int((df["status"] == "skipped").sum()),
        "tensors_changed": len(changed),
        "mean_rel_change": float(done["rel_change"].mean()) if len(done) else None,
        "mean_energy_kept": float(done["energy_kept"].mean()) if len(done) else None,
        "alpha_before": res.summary.get("alpha"),
    }
    params = {"method": method, "percent": percent, "conv_mode": conv_mode, "conventions": conventions,
              "per_position": per_position, "seed": seed,
              "layers": layers, "threads": threads, **analyze_options}
    return SmoothResult(
        kind="smoothing", tables={"layers": df, "skipped": res.skipped}, summary=summary,
        params=jsonable(params), seed=seed, timing={"total": time.perf_counter() - t0, "analysis": t_analysis},
        meta=provenance(str(dev)), model=new_module, changed=changed, source=source,
    )


def sharpen(model: Any, **options: Any) -> SmoothResult:
    """``smooth(model, "sharpen", ...)``: clip each layer's correlation traps (WeightWatcher's
    ``SVDSharpness``), on a copy."""
    return smooth(model, "sharpen", **options)


__all__ = ["METHODS", "SmoothResult", "sharpen", "smooth"]
