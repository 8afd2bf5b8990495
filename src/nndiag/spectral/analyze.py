"""``nndiag.spectral.analyze``: data-free weight-spectrum diagnosis of a whole model.

Flow: plan the layers (:mod:`~nndiag.spectral.matrices`) from tensor metadata → load
tensors one at a time → stack same-shaped matrices into batches bounded by
``batch_bytes`` → batched eigenvalues (:mod:`~nndiag.spectral.esd`) → power-law fit
and metrics per layer → summary and findings. Peak memory is bounded by
``batch_bytes`` plus the largest tensor, so sharded safetensors larger than RAM
stream through.

Conventions
-----------
``conventions="nndiag"`` (default) reports the ESD of the weights as they are.
``conventions="ww"`` reproduces WeightWatcher 0.7.7's ``analyze()`` numbers: pooled
conv2d eigenvalues multiplied by 0.5 (its ``conv2d_norm``), and its small-sample fit
rule for fewer than 20 eigenvalues. Known WeightWatcher bugs are never copied
(``sv_min``, ``inverse`` on pooled convs, Conv1d, skipped ``in_proj_weight``, failed
fits averaged into the summary).
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from nndiag._utils.precision import full_precision
from nndiag.errors import InputError
from nndiag.report.results import Result, jsonable, provenance, table_to_records
from nndiag.spectral import findings as _findings
from nndiag.spectral.esd import TorchStream, cpu_backend, eigvals_stacks, uses_lapack
from nndiag.spectral.matrices import (
    MAX_EVALS,
    MAX_N,
    MIN_EVALS,
    LayerSpec,
    grouped_qkv,
    layer_matrices,
    plan_layers,
    tensor_kind,
)
from nndiag.spectral.metrics_many import layer_metrics_many
from nndiag.spectral.powerlaw import EVALS_THRESH, PowerLawFit
from nndiag.spectral.powerlaw_many import fit_powerlaw_many

CONVENTIONS = ("nndiag", "ww")
#: Summary metrics (means over layers): alpha-based ones over valid fits only.
SUMMARY_METRICS = ("log_norm", "alpha", "alpha_weighted", "log_alpha_norm",
                   "log_spectral_norm", "stable_rank", "mp_softrank")
_ALPHA_BASED = ("alpha", "alpha_weighted", "log_alpha_norm")
_ESD_BINS = 60
#: On the CPU, matrices with more entries than this are solved one at a time, smaller ones batched.
_BATCH_MAX_ELEMS = 256 * 256

LAYER_COLUMNS = [
    "name", "index", "tensor", "kind", "N", "M", "Q", "rf", "num_evals", "lambda_max",
    "spectral_norm", "log_spectral_norm", "norm", "log_norm", "stable_rank", "alpha",
    "alpha_weighted", "log_alpha_norm", "xmin", "xmax", "D", "sigma", "num_pl_spikes",
    "sv_max", "sv_min", "matrix_rank", "rank_loss", "weak_rank_loss", "entropy",
    "detX_num", "detX_val", "warning", "status", "reason", "dtype",
]
SKIPPED_COLUMNS = ["name", "kind", "shape", "dtype", "reason"]


@dataclass(frozen=True)
class SpectralResult(Result):
    """A :class:`~nndiag.report.results.Result` with the spectral tables as attributes.

    ``layers`` (one row per analysed matrix, ``name`` first, WeightWatcher's metric
    names), ``skipped`` (``name, kind, shape, dtype, reason``) and ``esd`` (a 60-bin
    histogram of ``log10 λ`` per layer, for plots). ``evals`` holds the raw
    eigenvalues when ``keep_evals=True`` (not serialised).
    """

    evals: dict[str, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    @property
    def layers(self) -> pd.DataFrame:
        return self.tables["layers"]

    @property
    def skipped(self) -> pd.DataFrame:
        return self.tables["skipped"]

    def to_dict(self) -> dict[str, Any]:
        """The JSON document; ``layers`` and ``skipped`` also at the top level."""
        doc = super().to_dict()
        doc["layers"] = table_to_records(self.layers)
        doc["skipped"] = table_to_records(self.skipped)
        return doc

    def plot(self, kind: str = "alpha", ax: Any = None, layer: str | None = None) -> Any:
        """A figure: ``"alpha"`` (alpha per layer), ``"esd"`` (log-log ESD of ``layer``
        with the fitted tail), ``"mp"`` (MP overlay of ``layer``)."""
        from nndiag.spectral import plots

        if kind == "alpha":
            return plots.plot_alpha(self, ax=ax)
        if kind == "esd":
            return plots.plot_esd(self, layer, ax=ax)
        if kind == "mp":
            return plots.plot_mp(self, layer, ax=ax)
        raise InputError(f"unknown plot kind '{kind}'; choose alpha, esd or mp")


def _source(model: Any) -> tuple[Any, Any, str, dict[str, Any] | None]:
    """(TensorSource, module or None, display name, Hugging Face config or None) from whatever
    the user passed (the config from a folder's ``config.json`` or a module's ``config``)."""
    from nndiag.io.models import LoadedModel, hf_config, load_model
    from nndiag.io.tensors import DictSource, TensorSource

    if isinstance(model, LoadedModel):
        return model.tensors, model.module, model.name, hf_config(model.module, model.meta)
    if isinstance(model, TensorSource):
        return model, None, type(model).__name__, None
    if isinstance(model, torch.nn.Module):
        lm = load_model(model)
        return lm.tensors, model, lm.name, hf_config(model, lm.meta)
    if isinstance(model, dict):
        return DictSource(model), None, "state_dict", None
    if isinstance(model, (str, Path)):
        lm = load_model(model)
        return lm.tensors, lm.module, lm.name, hf_config(lm.module, lm.meta)
    raise InputError(f"cannot analyse a {type(model).__name__}; pass an nn.Module, a path or a LoadedModel")


def _fingerprint(t: torch.Tensor) -> tuple[Any, ...]:
    """Shape, dtype and a few entries: the first matrix's first row and the last matrix's last
    row, up to 16 values each (no copy of the tensor). Equal fingerprints are only candidates,
    confirmed by ``torch.equal``; short ones keep hashing cheap (a 2,304-value sample cost
    ~0.15 ms a layer in the dictionary look-ups alone)."""
    return (tuple(t.shape), str(t.dtype), tuple(t[0, 0, :16].tolist()), tuple(t[-1, -1, -16:].tolist()))


#: CPU stacks on PyTorch's batched route are cut into chunks of about this much solver work
#: (Σ m³, about 32 pooled 64×64 slices or 4 ms): the fits of a finished chunk then run beside
#: the next chunk's solve instead of after one long stack (pretrained ResNet56: its 153 pooled
#: 64×64 slices were one 35 ms stack, and their 17 layers' fits came after it).
_CHUNK_WORK = 32 * 64**3


def _chunks(group: list[tuple[str, torch.Tensor]], n: int, m: int) -> list[list[tuple[str, torch.Tensor]]]:
    """Whole layers of one shape group in chunks of about :data:`_CHUNK_WORK` solver work."""
    out: list[list[tuple[str, torch.Tensor]]] = [[]]
    work = 0
    for key, mats in group:
        if out[-1] and work >= _CHUNK_WORK:
            out.append([])
            work = 0
        out[-1].append((key, mats))
        work += mats.shape[0] * min(n, m) ** 3
    return out


class _Batcher:
    """Collects same-shaped matrices and computes their eigenvalues in batches.

    On the CPU with more than one thread, stacks for PyTorch's batched route are solved by a
    worker (:class:`~nndiag.spectral.esd.TorchStream`) while later layers are still being
    prepared: a shape group goes as soon as it holds :data:`_CHUNK_WORK`, or when a layer of
    another shape follows it and it holds a sixteenth of that. Which matrices share a stack
    depends on the layer order only, never on timing. Finished stacks' ``on_stack`` calls
    run in :meth:`flush`, as the stacks finish: fitting between layers held back the hand-over of
    later stacks and left the worker waiting (ResNet56, two threads: idle ~16 ms of ~100 ms; read
    from a safetensors file, medians of 20 interleaved runs 94.3 and 98.9 ms against 90.3 and
    96.4 ms fitting in :meth:`flush`; in memory within the noise), and the calling thread fits
    and reads the layers one after the other either way. Matrices stay
    referenced until their stack's fits, so ``batch_bytes`` bounds what is held. LAPACK-route
    matrices and what is left are solved in :meth:`flush` (after the streamed stacks: the two
    routes never run side by side).
    """

    def __init__(self, precision: str, device: torch.device, batch_bytes: int,
                 on_stack: Callable[[list[tuple[str, np.ndarray]]], None] | None = None) -> None:
        self.precision = precision
        self.device = device
        self.batch_bytes = batch_bytes
        self.pending: dict[tuple[int, int], list[tuple[str, torch.Tensor]]] = defaultdict(list)
        self.work: dict[tuple[int, int], int] = defaultdict(int)  # solver work pending per streamed shape
        self.bytes = 0
        self.out: dict[str, np.ndarray] = {}
        self.eig_seconds = 0.0
        #: ``on_stack([(key, eigenvalues), ...])`` for the layers of a stack as soon as it is
        #: solved, possibly in a worker thread while other stacks are still being solved
        self.on_stack = on_stack
        self.stream = TorchStream(precision) if device.type == "cpu" else None
        self.last_shape: tuple[int, int] | None = None
        self.t_first: float | None = None  # first stream submission since the last flush

    def _own_stack(self, mats: torch.Tensor) -> bool:
        """Whether a layer's matrices are solved as a stack of their own (CPU: large or LAPACK)."""
        return self.device.type == "cpu" and (mats.shape[1] * mats.shape[2] > _BATCH_MAX_ELEMS
                                              or uses_lapack(mats))

    def add(self, key: str, mats: torch.Tensor) -> None:
        shape = (mats.shape[1], mats.shape[2])
        threaded = self.stream is not None and self.stream.threaded
        streaming = threaded and not self._own_stack(mats)
        if threaded and shape != self.last_shape:  # (also when this layer goes to LAPACK)
            for other, w in list(self.work.items()):
                if other != shape and w >= _CHUNK_WORK // 16:
                    self._submit(other)
        self.last_shape = shape
        self.pending[shape].append((key, mats))
        self.bytes += mats.numel() * 4
        if streaming:
            self.work[shape] += mats.shape[0] * min(shape) ** 3
            if self.work[shape] >= _CHUNK_WORK:
                self._submit(shape)
        if self.bytes >= self.batch_bytes:
            self.flush()

    def _submit(self, shape: tuple[int, int]) -> None:
        """Hand a shape group's pending layers to the stream as one stack (concatenated there)."""
        group = self.pending.pop(shape)
        del self.work[shape]
        mats = [x for _, x in group]
        self.stream.submit(mats[0] if len(mats) == 1 else (lambda: torch.cat(mats)),
                           [(key, x.shape[0]) for key, x in group])
        if self.t_first is None:
            self.t_first = time.perf_counter()

    def _finish(self, keys: list[tuple[str, int]], ev_t: torch.Tensor) -> None:
        ev = ev_t.cpu().numpy()
        pos = 0
        for key, count in keys:
            self.out[key] = ev[pos : pos + count].reshape(-1)
            pos += count
        if self.on_stack is not None:
            self.on_stack([(key, self.out[key]) for key, _ in keys])

    def flush(self) -> None:
        t0 = time.perf_counter() if self.t_first is None else self.t_first
        own: list[torch.Tensor] = []  # stacks of one layer each (CPU: large or LAPACK route)
        own_keys: list[list[tuple[str, int]]] = []
        cpu = self.device.type == "cpu"
        stacks: list[torch.Tensor] = []  # the other stacks (off the CPU: every stack)
        keys: list[list[tuple[str, int]]] = []
        for (n, m), group in self.pending.items():
            if self._own_stack(group[0][1]):
                # large matrices are solved one at a time (batching them only thrashes the CPU
                # caches) and the LAPACK route shares matrices out among threads
                for key, mats in group:
                    own_keys.append([(key, mats.shape[0])])
                    own.append(mats)
                continue
            for part in (_chunks(group, n, m) if cpu else [group]):
                mats = [x for _, x in part]
                tag = [(key, x.shape[0]) for key, x in part]
                if self.stream is not None:
                    # queued behind the streamed stacks: the worker goes on while this thread fits
                    self.stream.submit(mats[0] if len(mats) == 1 else (lambda mats=mats: torch.cat(mats)), tag)
                else:
                    stacks.append((mats[0] if len(mats) == 1 else torch.cat(mats)).to(self.device))
                    keys.append(tag)
        if self.stream is not None:
            self.stream.collect(self._finish)  # all of PyTorch's route before any LAPACK solve
        stacks, keys = stacks + own, keys + own_keys
        eigvals_stacks(stacks, self.precision, lambda i, ev: self._finish(keys[i], ev), stream=self.stream)
        self.pending.clear()
        self.work.clear()
        self.bytes = 0
        self.last_shape = None
        self.t_first = None
        self.eig_seconds += time.perf_counter() - t0


def _walk_order(specs: list[LayerSpec], reorder: bool) -> list[LayerSpec]:
    """The order in which ``analyze`` reads the layers: model order, or (``reorder``: an in-memory
    model solved by a worker thread) the layers of PyTorch's batched route first, largest matrices
    first, then those solved one at a time in the flush. The worker then starts on the stacks that
    take longest while this thread prepares the rest (pretrained ResNet56, two threads: 40 runs in
    each of 7 processes alternating with the model-order code, median of the medians 71.1 → 68.5 ms,
    fastest runs 64.2–65.7 → 61.8–64.9 ms; one thread unchanged). Same shapes are
    read one after the other, so their stacks are whole; the order is the model's alone (never
    timing), and the results are put back in model order.
    """
    if not reorder:
        return specs
    from nndiag.spectral.esd import LAPACK_MIN

    def own(sp: LayerSpec) -> bool:  # (as _Batcher._own_stack decides from the matrices)
        return sp.N * sp.M > _BATCH_MAX_ELEMS or (sp.M >= LAPACK_MIN and cpu_backend() == "lapack")

    return sorted(specs, key=lambda sp: (own(sp), -sp.M, -sp.N))


def _check_values(w: torch.Tensor) -> str:
    """"non-finite ..." when W holds NaN/Inf (one summing pass; the exact count only then).

    CPU tensors up to 2²⁰ entries are summed by NumPy in the calling thread: a torch
    reduction over a small strided view woke the OpenMP team and took up to 8 ms
    ((9, 64, 64) pooled conv slices of a ResNet-18), NumPy ~20 µs.
    """
    if w.device.type == "cpu" and w.numel() <= 1 << 20 and w.dtype in (torch.float32, torch.float64):
        if bool(np.isfinite(w.detach().numpy().sum())):
            return ""
    elif bool(torch.isfinite(w.sum())):
        return ""
    n_bad = int((~torch.isfinite(w)).sum())
    if n_bad == 0:  # finite entries whose float sum overflowed
        return ""
    return f"non-finite values ({n_bad} NaN/Inf entries)"


@full_precision
def analyze(
    model: Any,
    *,
    conv_mode: str = "ww",
    conventions: str = "nndiag",
    precision: str = "auto",
    min_evals: int = MIN_EVALS,
    max_evals: int | None = MAX_EVALS,
    max_N: int | None = MAX_N,
    thresh: float = EVALS_THRESH,
    min_tail: int = 1,
    fix_fingers: str | None = None,
    xmin_max: float | None = None,
    max_fingers: int = 10,
    finger_thresh: float = 1.0,
    fit: str = "PL",
    mp_fit: bool = False,
    randomize: bool = False,
    layers: list[str] | None = None,
    scale_jump: float = 1.0,
    seed: int = 0,
    device: str | torch.device = "auto",
    threads: int | None = None,
    batch_bytes: int = 128 << 20,
    dedup: bool = True,
    keep_evals: bool = False,
    hf_config: dict[str, Any] | None = None,
) -> SpectralResult:
    """Diagnose every weight matrix of a model from its eigenvalue spectrum, without data.

    Parameters
    ----------
    model : nn.Module, str, Path or LoadedModel
        The model (anything :func:`nndiag.load_model` accepts, or a state dict).
    conv_mode : {"ww", "unfold"}
        Convolution layout: per kernel position, pooled (WeightWatcher) or unfolded.
    conventions : {"nndiag", "ww"}
        ``ww`` reproduces WeightWatcher 0.7.7's numbers (see the module docstring).
    precision : {"auto", "float32", "float64"}
        Eigen-solver precision (see :mod:`nndiag.spectral.esd`). With ``conventions="ww"``
        ``auto`` means float64, as WeightWatcher's SVDs: the KS search's argmin can flip
        between near-tied candidates on eigenvalues that differ in the seventh digit (seen
        once in ~10 random ResNet-18s: alpha 1.7e-2 apart; float64 agreed to 1e-12).
    min_evals, max_evals, max_N : int
        Layer size limits (WeightWatcher's defaults 8, 15000, 50000).
    thresh, min_tail, fix_fingers, xmin_max, max_fingers, finger_thresh
        Power-law fit options (see :func:`~nndiag.spectral.powerlaw.fit_powerlaw`).
    fit : {"PL", "TPL"}
        ``TPL`` also fits a truncated power law on the PL tail (columns
        ``tpl_alpha``, ``tpl_lambda``).
    mp_fit : bool
        Add the Marchenko–Pastur columns ``sigma_mp, bulk_min, bulk_max, num_spikes,
        mp_softrank``.
    randomize : bool
        Compare each ESD with that of the element-shuffled matrix: ``rand_distance``
        (Jensen–Shannon distance of the two log-ESD histograms, in [0, 1]),
        ``num_traps`` (shuffled-ESD eigenvalues above its MP bulk edge), ``ww_softrank``.
    layers : list of str, optional
        Only these layer names (or tensor names).
    hf_config : dict, optional
        A Hugging Face config (``config.json`` as a dict) for a model given without one (a
        state dict or tensor source); a folder's ``config.json`` (also when a weights file in
        it is named) or a module's ``config`` is read by itself. Its ``model_type`` tells the
        layout of fused Q/K/V weights whose rows are grouped per head (GPT-NeoX, BLOOM,
        Persimmon, Falcon, GPT-BigCode), per partition (CodeGen) or with fewer K/V heads (Phi-3,
        MPT): :func:`~nndiag.spectral.matrices.grouped_qkv`.
    scale_jump : float
        Decades of ``λmax`` between consecutive layers that count as a scale collapse.
    seed : int
        Seed for ``randomize``.
    device : str or torch.device
        Where eigenvalues are computed (``"auto"`` = CUDA when present).
    threads : int, optional
        BLAS/OpenMP threads (default: ``NNDIAG_THREADS``, else the usable cores that
        no other process keeps busy, at least 1).
    batch_bytes : int
        Largest batch of pending matrices (bounds memory when streaming).
    dedup : bool
        Compute identical in-memory matrices once (e.g. the cloned layers of a freshly
        built ``nn.TransformerEncoder``).
    keep_evals : bool
        Keep the eigenvalues in ``result.evals``.

    Returns
    -------
    SpectralResult

    Examples
    --------
    >>> import torch
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <...>
    >>> res = analyze(torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Linear(128, 10)))
    >>> list(res.layers["name"])
    ['0', '1']
    """
    from nndiag._utils.device import resolve_device
    from nndiag._utils.threads import gil_switch, limit_threads

    if conventions not in CONVENTIONS:
        raise InputError(f"unknown conventions '{conventions}'; choose nndiag or ww")
    if fit not in ("PL", "TPL"):
        raise InputError(f"unknown fit '{fit}'; choose PL or TPL")
    t_start = time.perf_counter()
    source, module, name, config = _source(model)
    dev = resolve_device(device)
    ww = conventions == "ww"
    if ww and precision == "auto":
        precision = "float64"
    from nndiag.io.tensors import ModuleSource

    ctx = _preserve(module)
    # (a short GIL interval: the eigen-solver worker hands back after each of its native calls)
    with ctx, limit_threads(threads), torch.no_grad(), gil_switch():
        infos = source.infos()
        qkv_layout = grouped_qkv(config if hf_config is None else hf_config)
        specs, reasons = plan_layers(infos, conv_mode=conv_mode, min_evals=min_evals,
                                     max_evals=max_evals, max_N=max_N, qkv_layout=qkv_layout)
        if layers is not None:
            wanted = set(layers)
            specs = [s for s in specs if s.name in wanted or s.tensor in wanted]
        info_by_name = {i.name: i for i in infos}
        value_skips: list[tuple[int, dict[str, Any]]] = []  # (model position, row) of the value checks
        fit_kw = dict(thresh=thresh, min_tail=min_tail, fix_fingers=fix_fingers, xmin_max=xmin_max,
                      max_fingers=max_fingers, finger_thresh=finger_thresh,
                      small_n="ww" if ww else None)
        spec_of: dict[str, LayerSpec] = {}
        ready: dict[str, np.ndarray] = {}  # sorted eigenvalues, unscaled
        memo: dict[tuple[str, float], dict[str, Any]] = {}
        hists: dict[tuple[str, float], tuple[str, np.ndarray, np.ndarray] | None] = {}

        def fit_early(stack: list[tuple[str, np.ndarray]]) -> None:
            # a stack's fits as soon as its eigenvalues are in, beside the eigen-solves still running
            todo_now = {}
            for key, ev in stack:
                ready[key] = ev = np.sort(ev)
                spec = spec_of[key]
                scale = _ww_scale(ww, spec, conv_mode)
                if ev.size and ev[-1] != 0.0:
                    todo_now[(key, scale)] = (ev * scale, spec)
            memo.update(_fit_all(todo_now, fit_kw, fit, mp_fit))
            for (key, scale), (ev, _) in todo_now.items():
                hists[(key, scale)] = _esd_hist(key, ev, thresh)

        batcher = _Batcher(precision, dev, batch_bytes, on_stack=fit_early)
        in_memory = isinstance(source, ModuleSource) or type(source).__name__ == "DictSource"
        seen: dict[tuple[Any, ...], list[tuple[torch.Tensor, str]]] = {}
        alias: dict[str, str] = {}
        analysed: list[LayerSpec] = []
        mats_for_random: dict[str, torch.Tensor] = {}
        cache: dict[str, torch.Tensor] = {}
        pos = {id(sp): i for i, sp in enumerate(specs)}  # model order, restored below
        for spec in _walk_order(specs, in_memory and batcher.stream is not None and batcher.stream.threaded):
            w = cache.get(spec.tensor)
            if w is None:
                w = source.get(spec.tensor)
                cache.clear()
                cache[spec.tensor] = w
            partner = source.get(spec.partner) if spec.partner else None
            mats = layer_matrices(spec, w, conv_mode, partner)
            bad = _check_values(mats)
            if bad:
                # tensor name, as for metadata skips; the layer name for one part of a split tensor
                shown = spec.name if spec.part is not None else spec.tensor
                value_skips.append((pos[id(spec)], _skip_row(info_by_name[spec.tensor], bad, shown)))
                continue
            analysed.append(spec)
            if randomize:
                mats_for_random[spec.name] = mats.detach().clone().cpu()
            if dedup and in_memory:
                fp = (_fingerprint(mats),)
                hit = next((k for m, k in seen.get(fp, []) if torch.equal(m, mats)), None)
                if hit is not None:
                    alias[spec.name] = hit
                    continue
                seen.setdefault(fp, []).append((mats, spec.name))
            spec_of[spec.name] = spec
            batcher.add(spec.name, mats)
        # the plan's skips (ResNet56: ~280 BatchNorm tensors) listed while the worker solves, not
        # before its first stack
        skipped_rows = [_skip_row(info_by_name[t], r) for t, r in reasons.items()]
        skipped_rows += [row for _, row in sorted(value_skips, key=lambda x: x[0])]
        batcher.flush()
        analysed.sort(key=lambda sp: pos[id(sp)])
        cache.clear()
        seen.clear()

        rows = []
        evals_by_layer: dict[str, np.ndarray] = {}
        esd_rows = []
        t_fit = time.perf_counter()
        rng = np.random.default_rng(seed)
        spectra: dict[str, np.ndarray] = {}
        todo: dict[tuple[str, float], tuple[np.ndarray, LayerSpec]] = {}
        for spec in analysed:
            key = alias.get(spec.name, spec.name)
            scale = _ww_scale(ww, spec, conv_mode)
            spectra[spec.name] = ev = ready[key] * scale
            if ev.size and ev[-1] != 0.0 and (key, scale) not in memo:  # an identical matrix is fitted once
                todo.setdefault((key, scale), (ev, spec))
        if todo:
            memo.update(_fit_all(todo, fit_kw, fit, mp_fit))
        n_early = len(memo) - len(todo)
        for spec in analysed:
            ev = spectra.pop(spec.name)
            if not ev.size or ev[-1] == 0.0:  # WᵀW = 0 exactly only when W = 0
                shown = spec.name if spec.part is not None else spec.tensor
                skipped_rows.append(_skip_row(info_by_name[spec.tensor], "all-zero matrix", shown))
                continue
            scale = _ww_scale(ww, spec, conv_mode)
            row: dict[str, Any] = {"name": spec.name, "index": spec.index, "tensor": spec.tensor,
                                   "kind": spec.kind}
            row.update(memo[(alias.get(spec.name, spec.name), scale)])
            row["dtype"] = spec.dtype
            if randomize:
                from nndiag.spectral.randomize import randomized_metrics

                row.update(randomized_metrics(mats_for_random.pop(spec.name), ev, scale, spec.N,
                                              spec.M, rng, precision))
            rows.append(row)
            hkey = (alias.get(spec.name, spec.name), scale)
            hist = hists[hkey] if hkey in hists else _esd_hist(spec.name, ev, thresh)
            if hist is not None:
                esd_rows.append((spec.name, hist[1], hist[2]))
            if keep_evals:
                evals_by_layer[spec.name] = ev
        t_done = time.perf_counter()

    extra = [c for r in rows for c in r if c not in LAYER_COLUMNS]
    cols = LAYER_COLUMNS + list(dict.fromkeys(extra))
    df = pd.DataFrame(rows, columns=cols) if rows else pd.DataFrame(columns=cols)
    skipped = pd.DataFrame(skipped_rows, columns=SKIPPED_COLUMNS)
    esd_df = _esd_table(esd_rows)
    summary = summarize(df)
    summary.update({"model": name, "layers_analysed": int(len(df)),
                    "layers_skipped": int(len(skipped))})
    finds = _findings.spectral_findings(df, skipped, summary, scale_jump=scale_jump)
    params = {
        "conv_mode": conv_mode, "conventions": conventions, "precision": precision,
        "min_evals": min_evals, "max_evals": max_evals, "max_N": max_N, "thresh": thresh,
        "min_tail": min_tail, "fix_fingers": fix_fingers, "xmin_max": xmin_max,
        "max_fingers": max_fingers, "finger_thresh": finger_thresh, "fit": fit,
        "mp_fit": mp_fit, "randomize": randomize, "layers": layers, "scale_jump": scale_jump,
        "threads": threads, "dedup": dedup,
        "qkv_layout": None if qkv_layout is None else asdict(qkv_layout),
        "eig_backend": cpu_backend() if dev.type == "cpu" else f"torch ({dev.type})",
    }
    # "eigenvalues" includes the fits run beside the eigen-solves (``fits_overlapped`` of them)
    timing = {"total": t_done - t_start, "eigenvalues": batcher.eig_seconds,
              "fit_and_metrics": t_done - t_fit, "fits_overlapped": n_early}
    return SpectralResult(
        kind="spectral", tables={"layers": df, "skipped": skipped, "esd": esd_df},
        summary=summary, findings=finds, params=jsonable(params), seed=seed, timing=timing,
        meta=provenance(str(dev)), evals=evals_by_layer,
    )


def _ww_scale(ww: bool, spec: LayerSpec, conv_mode: str) -> float:
    """WeightWatcher 0.7.7's factor on pooled Conv2d eigenvalues in ``analyze`` (its 0.5 bug)."""
    return 0.5 if (ww and spec.kind == "conv2d" and conv_mode == "ww") else 1.0


def _fit_all(todo: dict[tuple[str, float], tuple[np.ndarray, LayerSpec]], fit_kw: dict[str, Any],
             fit: str, mp_fit: bool) -> dict[tuple[str, float], dict[str, Any]]:
    """Power-law fit, metrics and the optional TPL / MP columns of several ESDs.

    Same-length ESDs are fitted and measured together (:func:`fit_powerlaw_many`,
    :func:`layer_metrics_many`: the numbers of one at a time). ``analyze`` calls this for each
    stack as soon as its eigenvalues are in (``fit_early``), beside the eigen-solves of later
    stacks in the worker thread; and afterwards for a shared matrix seen under another
    eigenvalue scale. (Fits in threads of their own after all eigen-solves gained nothing:
    small fits are mostly Python-level work that threads fight over the GIL for. One layer at
    a time beside the worker was faster while fits ran between layers; since the layers are
    all handed over first, together is: ResNet56, two threads, medians of 20 interleaved
    runs 81.0 vs 85.6 ms, 102.7 vs 106.2, 108.2 vs 113.7.)
    """
    keys = list(todo)
    evs = [todo[k][0] for k in keys]
    specs = [todo[k][1] for k in keys]
    plfs = fit_powerlaw_many(evs, **fit_kw)
    rows = layer_metrics_many(evs, plfs, [s.N for s in specs], [s.M for s in specs], [s.rf for s in specs])
    return {k: _layer_row(row, ev, plf, fit, mp_fit, s)
            for k, row, ev, plf, s in zip(keys, rows, evs, plfs, specs, strict=True)}


def _layer_row(row: dict[str, Any], ev: np.ndarray, plf: PowerLawFit, fit: str, mp_fit: bool,
               spec: LayerSpec) -> dict[str, Any]:
    """A layer's metrics ``row`` with the fit's status and the optional TPL / MP columns added."""
    row["reason"] = plf.reason
    if plf.ok and plf.num_fingers:
        row["num_fingers"], row["raw_alpha"] = plf.num_fingers, plf.raw_alpha
    if fit == "TPL":
        from nndiag.spectral.tpl import fit_truncated_powerlaw

        tp = fit_truncated_powerlaw(ev, xmin=plf.xmin) if plf.ok else None
        row["tpl_alpha"] = tp.alpha if tp else math.nan
        row["tpl_lambda"] = tp.Lambda if tp else math.nan
    if mp_fit:
        from nndiag.spectral.mp import fit_mp

        mp = fit_mp(ev, spec.N / spec.M, spec.M)
        row.update(sigma_mp=mp.sigma_mp, bulk_min=mp.bulk_min, bulk_max=mp.bulk_max,
                   num_spikes=mp.num_spikes, mp_softrank=mp.mp_softrank)
    return row


def _preserve(module: torch.nn.Module | None) -> Any:
    import contextlib

    if module is None:
        return contextlib.nullcontext()
    from nndiag._utils.model_state import preserved

    # analysis only reads weights: no value snapshot needed (values are never written)
    return preserved(module, values=False)


def _skip_row(info: Any, reason: str, name: str | None = None) -> dict[str, Any]:
    return {
        "name": name or info.name,
        "kind": tensor_kind(info),
        "shape": "×".join(str(s) for s in info.shape) or "scalar",
        "dtype": info.dtype,
        "reason": reason,
    }


def _esd_hist(name: str, ev: np.ndarray, thresh: float) -> tuple[str, np.ndarray, np.ndarray] | None:
    """A 60-bin histogram of ``log10 λ`` (λ > thresh): ``(name, edges, counts)``, for plots."""
    pos = ev[ev > thresh]
    if pos.size == 0:
        return None
    lg = np.log10(pos)
    lo, hi = float(lg[0]), float(lg[-1])  # ev is sorted
    if hi <= lo:
        hi = lo + 1e-6
    edges = np.linspace(lo, hi, _ESD_BINS + 1)
    idx = np.minimum(((lg - lo) / (hi - lo) * _ESD_BINS).astype(np.int64), _ESD_BINS - 1)
    return name, edges, np.bincount(idx, minlength=_ESD_BINS)


def _esd_table(hists: list[tuple[str, np.ndarray, np.ndarray]]) -> pd.DataFrame:
    """The histograms as one tidy table (built once: a DataFrame per layer cost ~0.4 ms each,
    a fifth of ResNet56's whole analysis)."""
    if not hists:
        return pd.DataFrame(columns=["name", "log10_lo", "log10_hi", "count"])
    return pd.DataFrame({
        "name": np.repeat(np.array([h[0] for h in hists], dtype=object), _ESD_BINS),
        "log10_lo": np.concatenate([h[1][:-1] for h in hists]),
        "log10_hi": np.concatenate([h[1][1:] for h in hists]),
        "count": np.concatenate([h[2] for h in hists]),
    })


def summarize(df: pd.DataFrame) -> dict[str, Any]:
    """Means of the summary metrics: alpha-based ones over successful fits only.

    Also ``worst_alpha_layer`` / ``worst_alpha`` (the layer farthest outside [2, 6]) and
    the counts of under-/over-trained layers and failed fits.
    """
    out: dict[str, Any] = {}
    if df.empty:
        return {m: None for m in SUMMARY_METRICS if m != "mp_softrank"}
    # on arrays: pandas filtering per metric cost ~2.7 ms for ResNet56's 56 rows
    ok = df["status"].to_numpy(dtype=object) == "success"
    for m in SUMMARY_METRICS:
        if m not in df.columns:
            continue
        col = _findings.numeric(df[m])
        if m in _ALPHA_BASED:
            col = col[ok]
        col = col[np.isfinite(col)]
        out[m] = float(col.mean()) if col.size else None
    warning = df["warning"].to_numpy(dtype=object)
    out["num_fits_failed"] = int((~ok).sum())
    out["num_under_trained"] = int((warning == "under-trained").sum())
    out["num_over_trained"] = int((warning == "over-trained").sum())
    a = _findings.numeric(df["alpha"])
    dist = np.maximum(a - 6.0, 2.0 - a)
    if np.isfinite(dist).any():
        i = int(np.nanargmax(dist))
        out["worst_alpha_layer"] = str(df["name"].iloc[i])
        out["worst_alpha"] = float(a[i])
    return out
