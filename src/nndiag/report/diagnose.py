"""``nndiag.diagnose``: run every analysis that applies and gather one :class:`Report`.

Data-free probes always run; data-dependent ones when data is given; those that need
an extra input (e.g. the failure-mode diagnosis' ``second_seed``) when it is given. A
probe that is not built, does not apply or raises becomes a row of the report
(``PROBE-SKIPPED`` / ``PROBE-ERROR``) and the others still run.

Examples
--------
>>> import nndiag
>>> rep = nndiag.diagnose("digits-cnn", data="digits?split=test", probes=["evaluation"])
>>> rep.models[0].run("evaluation").status
'ok'
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from nndiag._utils.precision import full_precision
from nndiag.errors import InputError, NNDiagError
from nndiag.report import probes as _probes
from nndiag.report.probes import load_probe, wants_train_data
from nndiag.report.report import ModelReport, ProbeRun, Report
from nndiag.report.results import Finding, Result, provenance

#: Keyword options the orchestrator itself provides to ``run``.
_BUILTIN_KW = ("seed", "device")
#: How a user gives an option that a probe requires (shown when it is missing).
_OPTION_HINTS = {"second_seed": "a second training seed of the model (--second-seed CKPT)",
                 "loss": "a loss function (loss=...)"}


def parse_probes(probes: str | Sequence[str] | None) -> tuple[list[str], bool]:
    """The probe names to run and whether the user named them explicitly.

    Raises
    ------
    InputError
        A name that is not a known probe (the message lists the valid ones).
    """
    if probes is None:
        return list(_probes.PROBE_MODULES), False
    names = [p.strip() for p in (probes.split(",") if isinstance(probes, str) else probes)]
    names = [p for p in names if p]
    if not names:
        raise InputError(f"no probe named; choose from {', '.join(_probes.PROBE_MODULES)}")
    bad = [p for p in names if p not in _probes.PROBE_MODULES]
    if bad:
        raise InputError(f"unknown probe(s) {', '.join(bad)}; choose from {', '.join(_probes.PROBE_MODULES)}")
    return list(dict.fromkeys(names)), True


def _as_list(obj: Any) -> list[Any]:
    return list(obj) if isinstance(obj, (list, tuple)) else [obj]


def _load(model: Any, arch: str | None, weights: Any, runnable: bool = False) -> Any:
    from nndiag.io.models import LoadedModel, load_model

    if isinstance(model, LoadedModel):
        return model
    if not runnable:
        return load_model(model, arch=arch, weights=weights)
    # a Hugging Face folder is built with transformers only when data will run it; when it
    # cannot be (transformers missing, an unknown class) the data-free analyses still run and
    # the others say why
    try:
        return load_model(model, arch=arch, weights=weights, hf_module=True)
    except NNDiagError as exc:
        lm = load_model(model, arch=arch, weights=weights)
        if lm.origin != "hf":
            raise
        lm.meta["module_error"] = _one_line(exc)
        return lm


def _model_info(lm: Any) -> dict[str, Any]:
    info: dict[str, Any] = {"origin": lm.origin, "path": lm.path, "runnable": lm.module is not None}
    if lm.module is not None:
        info["class"] = getattr(lm.module, "display_class", type(lm.module).__name__)
        info["parameters"] = int(sum(p.numel() for p in lm.module.parameters()))
        info["tensors"] = len(lm.module.state_dict())
    else:
        infos = lm.tensors.infos()
        info["tensors"] = len(infos)
        info["parameters"] = int(sum(i.numel for i in infos))
    left = (lm.meta or {}).get("ignored_keys") or []
    if left:  # a checkpoint with more than the model (a Lightning EMA copy): say what was not used
        info["keys_left_out"] = f"{len(left)} checkpoint tensors not loaded, e.g. {left[0]}"
    return info


def _unique_names(names: list[str]) -> list[str]:
    out, seen = [], {}
    for n in names:
        if n in seen:
            seen[n] += 1
            out.append(f"{n}#{seen[n]}")
        else:
            seen[n] = 1
            out.append(n)
    return out


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    if isinstance(exc, NNDiagError):
        return first or type(exc).__name__
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _required_options(mod: ModuleType) -> list[str]:
    """Keyword options ``mod.run`` requires (no default), beyond model, data, seed, device."""
    try:
        params = list(inspect.signature(mod.run).parameters.values())[2:]
    except (TypeError, ValueError):  # pragma: no cover
        return []
    return [p.name for p in params
            if p.default is inspect.Parameter.empty and p.name not in _BUILTIN_KW
            and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _accepted(mod: ModuleType, shared: dict[str, Any]) -> dict[str, Any]:
    """The shared options (``loss``, ``second_seed``) that ``mod.run`` names explicitly.

    A probe that only takes ``**options`` gets none of them: shared inputs go only to
    the analyses that declare they use them.
    """
    try:
        params = inspect.signature(mod.run).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return {}
    return {k: v for k, v in shared.items()
            if k in params and params[k].kind in (inspect.Parameter.KEYWORD_ONLY,
                                                  inspect.Parameter.POSITIONAL_OR_KEYWORD)}


def _skip(name: str, why: str, how: str) -> ProbeRun:
    f = Finding("PROBE-SKIPPED", "pass", f"{name}: not run: {why}", {"probe": name}, how)
    return ProbeRun(name, "skipped", 0.0, Result(name, findings=[f]), why)


def _error(name: str, why: str, seconds: float, how: str = "") -> ProbeRun:
    f = Finding("PROBE-ERROR", "error", f"{name}: {why}", {"probe": name},
                how or "fix the input named in the message, or leave this analysis out with --probes")
    return ProbeRun(name, "error", seconds, Result(name, findings=[f]), why)


def run_probe(name: str, lm: Any, data: Any, *, seed: int, device: Any,
              options: dict[str, Any] | None = None, shared: dict[str, Any] | None = None,
              explicit: bool = False, train_data: Any = None) -> ProbeRun:
    """Run one probe on one model and wrap what happens in a :class:`ProbeRun`.

    Parameters
    ----------
    options : dict, optional
        Options the user gave for this probe (all passed to ``run``).
    shared : dict, optional
        Inputs shared by all probes (``loss``, ``second_seed``), passed only to probes
        whose ``run`` names them.
    train_data : DataBundle, optional
        The training data, given instead of ``data`` to probes that want it.

    Never raises for a probe's own failure (``KeyboardInterrupt`` still propagates).
    """
    options = dict(options or {})
    shared = {k: v for k, v in (shared or {}).items() if v is not None and k not in options}
    try:
        mod = load_probe(name)
    except Exception as exc:  # a probe module that fails to import
        return _error(name, f"cannot load the analysis ({_one_line(exc)})", 0.0)
    if mod is None:
        why = "this analysis is not available in this version of nndiag"
        return _error(name, why, 0.0) if explicit else _skip(name, why, "")
    if train_data is not None and wants_train_data(name, mod):
        data = train_data
    if getattr(mod, "NEEDS_DATA", False) and data is None:
        return _skip(name, "it needs labelled data", "pass DATA with --data (or data=...)")
    if getattr(mod, "NEEDS_DATA", False) and (data.meta or {}).get("tokens") and not getattr(mod, "TOKENS", False):
        return _skip(name, "it takes labelled examples, and these data are token sequences (a language model's)",
                     "give labelled data to run it")
    given = {**shared, **options}
    missing = [o for o in _required_options(mod) if given.get(o) is None]
    if missing:
        hints = getattr(mod, "OPTIONS", {}) or {}
        how = "; ".join(f"give {hints.get(o) or _OPTION_HINTS.get(o, o)}" for o in missing)
        return _skip(name, f"it needs {', '.join(missing)}", how)
    kwargs = {**_accepted(mod, shared), **options}
    from nndiag._utils.model_state import preserved

    t0 = time.perf_counter()
    try:
        if lm.module is not None:
            with preserved(lm.module, values=False):  # safety net for mode, flags, hooks, grads
                result = mod.run(lm, data, seed=seed, device=device, **kwargs)
        else:
            result = mod.run(lm, data, seed=seed, device=device, **kwargs)
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        return _error(name, _one_line(exc), time.perf_counter() - t0)
    seconds = time.perf_counter() - t0
    if not isinstance(result, Result):
        return _error(name, f"the analysis returned {type(result).__name__}, not a Result", seconds)
    return ProbeRun(name, "ok", seconds, result)


class _Inputs:
    """The data one model's probes get, after the input-scale check (see :func:`diagnose`'s
    ``inputs``): ``data`` and ``train`` (rescaled when the check fired on them), ``check`` the
    check on ``data`` as given, for the evaluation probe (finding or None, scores), or None,
    and ``findings``: each applied ``EVAL-INPUT-SCALE`` finding with the probes that read
    the data it was made on."""

    def __init__(self, data: Any, train: Any) -> None:
        self.data, self.train = data, train
        self.check: tuple[Finding | None, dict[str, Any]] | None = None
        self.findings: list[tuple[Finding, list[str]]] = []


def _prepare_inputs(lm: Any, data: Any, train: Any, names: list[str], *, loss: Any, inputs: str) -> _Inputs:
    """Check once per model whether its data are in the scale it takes
    (:func:`~nndiag.report.input_scale.check_data`) and, with ``inputs="auto"``, rescale the
    data it fires on (:func:`~nndiag.report.input_scale.rescale`)."""
    from nndiag.report.input_scale import applied, check_data, prepared, rescale

    out = _Inputs(data, train)
    if inputs != "auto" or loss is not None or lm.module is None or data is None:
        return out  # (the check compares cross-entropies of a classifier)
    mods = {n: load_probe(n) for n in names}
    reads = [n for n, m in mods.items() if m is not None and getattr(m, "NEEDS_DATA", False)]
    on_train = [n for n in reads if train is not None and wants_train_data(n, mods[n])]
    on_data = [n for n in reads if n not in on_train]
    if on_data:
        finding, scores = check_data(lm.module, data)
        out.check = (finding, scores)
        if finding is not None:
            out.data = rescale(data, finding)
            out.check = (applied(finding), scores)
            out.findings.append((out.check[0], on_data))
    if on_train:
        out.train, finding = prepared(lm.module, train, what="every analysis of this report")
        if finding is not None:
            out.findings.append((finding, on_train))
    return out


def _rescaled_inputs(prepared: _Inputs, data: Any, train: Any) -> str:
    """How the data were rescaled, in words, naming the data set when training data were given."""
    from nndiag.report.input_scale import describe

    parts = []
    for new, given in ((prepared.data, data), (prepared.train, train)):
        if new is not None and new is not given:
            how = new.meta["rescaled"]
            parts.append((given.name, describe(how["divide_by_255"], how["normalize"], how["bgr"])))
    if train is None:
        return parts[0][1]
    return "; ".join(f"{name}: {how}" for name, how in parts)


def _attach(runs: list[ProbeRun], prepared: _Inputs) -> None:
    """Put each applied input-scale finding into the first run that read those data, unless
    the evaluation probe reported it already (a report without the evaluation still says
    that the data were rescaled)."""
    for finding, readers in prepared.findings:
        done = [r for r in runs if r.probe in readers and r.status == "ok"]
        if done and not any(f is finding for r in done for f in r.result.findings):
            done[0].result.findings.insert(0, finding)


def _per_model(value: Any, n: int, what: str) -> list[Any]:
    if value is None or isinstance(value, (str, Path)):
        return [value] * n
    values = list(value)
    if len(values) != n:
        raise InputError(f"got {len(values)} {what} value(s) for {n} model(s); give one for all "
                         "or one per model, in the same order")
    return values


def _load_second(second_seed: Any, arches: list[Any]) -> list[Any]:
    n = len(arches)
    seeds = [] if second_seed is None else _as_list(second_seed)
    if not seeds:
        return [None] * n
    if len(seeds) != n:
        raise InputError(f"got {len(seeds)} second-seed model(s) for {n} model(s); "
                         "give one per model, in the same order")
    return [None if s is None else _load(s, a, None) for s, a in zip(seeds, arches, strict=True)]


@full_precision
def diagnose(
    model: Any,
    data: Any = None,
    loss: Callable[..., Any] | None = None,
    probes: str | Sequence[str] | None = None,
    *,
    train_data: Any = None,
    arch: str | Sequence[str | None] | None = None,
    weights: str | Path | None = None,
    second_seed: Any = None,
    options: dict[str, dict[str, Any]] | None = None,
    n_samples: int | None = None,
    seed: int = 0,
    device: str | Any = "auto",
    threads: int | None = None,
    progress: bool | None = None,
    on_update: Callable[[Report], None] | None = None,
    inputs: str = "auto",
) -> Report:
    """Diagnose one or several models with every analysis that applies.

    Parameters
    ----------
    model : model or list of models
        Anything :func:`nndiag.load_model` accepts (module, file, folder, factory,
        built-in name) or a ``LoadedModel``; a list compares several models.
    data : DATA spec, DataBundle, (x, y), DataLoader, optional
        Labelled data; data-dependent analyses are skipped without it.
    loss : callable, optional
        ``loss(logits, y)``; passed to analyses that take one (default cross-entropy).
    train_data : DATA spec, DataBundle, (x, y), DataLoader, optional
        The model's training data, for the analyses that read it (Hessian, landscape,
        failure mode: see :data:`~nndiag.report.probes.TRAIN_DATA_PROBES`); they use
        ``data`` when it is not given.
    probes : str or list of str, optional
        Analyses to run (``"spectral,hessian"``); all of :data:`PROBE_MODULES` by
        default. Named probes that cannot run are errors; unnamed ones are skipped.
    arch : str or list of str, optional
        Architecture for weights files (built-in name or ``package.module:factory``):
        one for every model, or one per model.
    weights : str or Path, optional
        Weights for a factory or built-in ``model``.
    second_seed : model or list of models, optional
        The same model trained from another seed (one per model), for the
        failure-mode diagnosis.
    options : dict, optional
        Extra keyword options per probe, e.g. ``{"hessian": {"n_samples": 256}}``.
    n_samples : int, optional
        Use a seeded subset of the data of this size.
    seed : int
        Seed given to every stochastic analysis.
    device : str or torch.device
        ``auto`` (CUDA when present), ``cpu`` or ``cuda``.
    threads : int, optional
        BLAS/torch threads (default: ``NNDIAG_THREADS`` or the usable cores).
    progress : bool, optional
        Progress on stderr (default: when stderr is a terminal).
    on_update : callable, optional
        Called with the (incomplete) report after every probe, e.g. to save it.
    inputs : {"auto", "as-given"}
        ``auto``: before the analyses that read data, check whether each model does much
        better on its data divided by 255, normalised or with colour channels reversed
        (:mod:`~nndiag.report.input_scale`; classifiers under the default loss, data not
        normalised when loaded) and, when it does, run every analysis on the data so
        rescaled: the finding ``EVAL-INPUT-SCALE`` says so (``evidence["applied"]``) and the
        model's ``info["inputs"]`` says how. ``as-given``: the analyses read the data as given
        (the evaluation still reports the finding).

    Returns
    -------
    Report

    Raises
    ------
    NNDiagError
        Bad input (a model or data that cannot be loaded, an unknown probe name).
    """
    from nndiag._utils.device import resolve_device
    from nndiag._utils.progress import progress_bar
    from nndiag._utils.threads import limit_threads
    from nndiag.io.data import as_data
    from nndiag.report.input_scale import INPUTS

    names, explicit = parse_probes(probes)
    if inputs not in INPUTS:
        raise InputError(f"unknown inputs '{inputs}'; choose one of {', '.join(INPUTS)}")
    options = dict(options or {})
    unknown = [k for k in options if k not in _probes.PROBE_MODULES]
    if unknown:
        raise InputError(f"options given for unknown probe(s) {', '.join(unknown)}; "
                         f"choose from {', '.join(_probes.PROBE_MODULES)}")
    dev = resolve_device(device)
    models = _as_list(model)
    if not models:
        raise InputError("no model given")
    arches = _per_model(arch, len(models), "architecture")
    runnable = data is not None or train_data is not None
    lms = [_load(m, a, weights, runnable) for m, a in zip(models, arches, strict=True)]
    seconds_ = _load_second(second_seed, arches)
    bundle = None if data is None else as_data(data, n_samples=n_samples, seed=seed)
    train_bundle = None if train_data is None else as_data(train_data, n_samples=n_samples, seed=seed)
    if bundle is None:
        bundle, train_bundle = train_bundle, None
    if loss is None and bundle is not None and (bundle.meta or {}).get("tokens"):
        from nndiag.landscape._setup import lm_loss

        loss = lm_loss  # token sequences: the next-token loss of a causal language model
    data_info = None if bundle is None else {
        "name": bundle.name, "n_samples": len(bundle), "num_classes": int(bundle.num_classes),
        "input_shape": [int(s) for s in bundle.input_shape]}
    if data_info is not None and train_bundle is not None:
        data_info["train"] = {"name": train_bundle.name, "n_samples": len(train_bundle)}
    report = Report(
        models=[ModelReport(n, _model_info(lm))
                for n, lm in zip(_unique_names([lm.name for lm in lms]), lms, strict=True)],
        data=data_info,
        options={"probes": names, "explicit_probes": explicit, "seed": seed, "device": str(dev),
                 "n_samples": n_samples, "arch": arches, "inputs": inputs,
                 "second_seed": [None if s is None else s.name for s in seconds_],
                 "probe_options": {k: {kk: repr(vv) if not isinstance(vv, (int, float, str, bool))
                                       else vv for kk, vv in v.items()} for k, v in options.items()}},
        meta=provenance(str(dev)),
        complete=False,
    )
    total = len(lms) * len(names)
    with limit_threads(threads), progress_bar(total, "diagnose", enabled=progress) as bar:
        for entry, lm, second in zip(report.models, lms, seconds_, strict=True):
            bar.update(description=f"{entry.name}: input scale")
            prepared = _prepare_inputs(lm, bundle, train_bundle, names, loss=loss, inputs=inputs)
            if prepared.findings:
                entry.info["inputs"] = _rescaled_inputs(prepared, bundle, train_bundle)
            for name in names:
                bar.update(description=f"{entry.name}: {name}")
                entry.runs.append(run_probe(name, lm, prepared.data, seed=seed, device=dev,
                                            options=options.get(name, {}),
                                            shared={"loss": loss, "second_seed": second,
                                                    "input_scale": prepared.check},
                                            explicit=explicit, train_data=prepared.train))
                _attach(entry.runs, prepared)
                bar.advance()
                if on_update is not None:
                    on_update(report)
    report.complete = True
    return report
