"""Load a model from whatever the user has.

:func:`load_model` accepts an ``nn.Module``, a checkpoint file, ``.safetensors``
(single or sharded), a Hugging Face model folder, an ONNX file, a
``package.module:factory`` string or a built-in architecture name, and returns a
:class:`LoadedModel`: named tensors (read lazily where the format allows) and,
where possible, a runnable ``nn.Module``.
"""

from __future__ import annotations

import importlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nndiag.errors import AnalysisError, InputError, ModelLoadError
from nndiag.io.checkpoint import CHECKPOINT_SUFFIXES, read_checkpoint
from nndiag.io.tensors import DictSource, ModuleSource, RenamedSource, SafetensorsSource, TensorSource
from nndiag.models.registry import available_models, build_model, is_builtin

_FACTORY_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
SUPPORTED = (
    "an nn.Module, a checkpoint (.pt .pth .th .bin .ckpt), .safetensors, "
    "a *.safetensors.index.json, a Hugging Face folder, .onnx, 'package.module:factory', "
    f"or a built-in name ({', '.join(available_models())})"
)


@dataclass
class LoadedModel:
    """A model as nndiag sees it.

    Attributes
    ----------
    tensors : TensorSource
        Named weight tensors; metadata without loading values, values one at a time.
    module : nn.Module or None
        A runnable module when the input allows one (module, factory, built-in name,
        or a weights file together with an architecture).
    name : str
        Display name (file stem, class name or spec).
    origin : str
        ``module``, ``checkpoint``, ``safetensors``, ``hf``, ``onnx``, ``factory`` or ``builtin``.
    path : str or None
        The file or folder it came from.
    meta : dict
        Extra facts (e.g. Hugging Face ``config.json``).
    """

    tensors: TensorSource
    module: nn.Module | None
    name: str
    origin: str
    path: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def require_module(self, purpose: str = "this analysis") -> nn.Module:
        """The runnable module, or a clear error saying how to provide one."""
        if self.module is None:
            why = self.meta.get("module_error") if isinstance(self.meta, dict) else None
            if why:  # a Hugging Face folder that could not be built
                raise AnalysisError(f"{self.name}: {purpose} needs a runnable model: {why}")
            raise AnalysisError(
                f"{self.name}: {purpose} needs a runnable model, but {self.origin} input gives "
                "weights only; pass an architecture (--arch NAME or 'package.module:factory') "
                "with --weights"
            )
        return self.module


def load_state_dict_into(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> list[str]:
    """``module.load_state_dict(state, strict=True)`` with a one-line error on mismatch.

    Names that differ from the module's by one prefix are matched
    (:func:`~nndiag._utils.names.matching_names`): a PyTorch Lightning checkpoint's
    ``model.…`` keys load into the bare architecture. Returns the checkpoint keys left out
    then (e.g. an EMA copy ``model_ema.…`` beside ``model.…``; none for an exact match).
    """
    from nndiag._utils.names import AmbiguousNames, matching_names

    own = list(module.state_dict())
    ignored: list[str] = []
    if set(own) != set(state):
        try:
            names = matching_names(own, list(state))
        except AmbiguousNames as exc:
            raise ModelLoadError(f"{source}: {exc}".replace("FILE", source)) from None
        if names is not None:
            used = set(names.values())
            ignored = [k for k in state if k not in used]
            state = {k: state[v] for k, v in names.items()}
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = next((ln.strip() for ln in first if "size mismatch" in ln), first[0])
        raise ModelLoadError(f"{source}: weights do not fit the architecture ({detail})") from None
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys e.g. {', '.join(missing[:3])}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys e.g. {', '.join(unexpected[:3])}")
        raise ModelLoadError(f"{source}: weights do not fit the architecture ({'; '.join(parts)})")
    return ignored


def _sibling_config(path: Path) -> dict[str, Any]:
    """``{"config": ...}`` from a Hugging Face ``config.json`` beside a weights file (the file
    named inside a model folder), else ``{}``: a sibling file that is not a readable JSON object
    with a ``model_type`` is not the model's config, and the weights load without it."""
    cfg = path.parent / "config.json"
    try:
        out = json.loads(cfg.read_text()) if cfg.is_file() else None
    except (OSError, ValueError):
        return {}
    return {"config": out} if isinstance(out, dict) and isinstance(out.get("model_type"), str) else {}


def _state_from_file(path: Path) -> tuple[TensorSource, str, dict[str, Any]]:
    suffix = path.suffix.lower()
    if path.name.endswith(".safetensors.index.json"):
        return SafetensorsSource.from_index(path), "safetensors", _sibling_config(path)
    if suffix == ".safetensors":
        if path.stat().st_size == 0:
            raise ModelLoadError(f"{path}: file is empty")
        return SafetensorsSource([path]), "safetensors", _sibling_config(path)
    if suffix in CHECKPOINT_SUFFIXES:
        return DictSource(read_checkpoint(path)), "checkpoint", _sibling_config(path)
    if suffix == ".onnx":
        from nndiag.io.onnx_source import OnnxSource

        return OnnxSource(path), "onnx", {}
    raise ModelLoadError(f"{path}: unknown model file type '{suffix or path.name}'; expected {SUPPORTED}")


def _state_from_dir(path: Path) -> tuple[TensorSource, str, dict[str, Any]]:
    meta: dict[str, Any] = {}
    cfg = path / "config.json"
    if cfg.is_file():
        try:
            meta["config"] = json.loads(cfg.read_text())
        except ValueError as exc:
            raise ModelLoadError(f"{cfg}: invalid JSON ({exc})") from None
    origin = "hf" if cfg.is_file() else "safetensors"
    for index in sorted(path.glob("*.safetensors.index.json")):
        return SafetensorsSource.from_index(index), origin, meta
    st = sorted(path.glob("*.safetensors"))
    if st:
        return SafetensorsSource(st), origin, meta
    for index in sorted(path.glob("*.bin.index.json")):
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"{index}: not a valid index ({exc})") from None
        merged: dict[str, torch.Tensor] = {}
        for s in shards:
            merged.update(read_checkpoint(path / s))
        return DictSource(merged), "hf" if cfg.is_file() else "checkpoint", meta
    ckpts = sorted(p for p in path.iterdir() if p.suffix.lower() in CHECKPOINT_SUFFIXES)
    if len(ckpts) == 1:
        return DictSource(read_checkpoint(ckpts[0])), "hf" if cfg.is_file() else "checkpoint", meta
    if len(ckpts) > 1:
        raise ModelLoadError(f"{path}: several checkpoint files, name one: {', '.join(p.name for p in ckpts[:5])}")
    raise ModelLoadError(f"{path}: directory holds no weights (.safetensors, .bin, .pt, index.json)")


def _hf_module(path: Path) -> nn.Module:
    """Build a runnable ``transformers`` model from a local folder (never contacts a hub).

    The class is the one ``config.json`` names in ``architectures`` (e.g. ``GPT2LMHeadModel``,
    with its head, so the model returns logits), else ``AutoModel``; key-value caches are
    switched off (an analysis never generates).
    """
    from nndiag.errors import require

    transformers = require("transformers", "hf", "running Hugging Face models")
    try:
        archs = json.loads((path / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        archs = []
    cls = getattr(transformers, archs[0], None) if archs and isinstance(archs[0], str) else None
    logs = transformers.utils.logging
    verbosity, bars = logs.get_verbosity(), logs.is_progress_bar_enabled()
    logs.set_verbosity_error()  # its config notes and loading bar, on every command, say nothing to act on
    logs.disable_progress_bar()
    try:
        model = (cls or transformers.AutoModel).from_pretrained(str(path), local_files_only=True)
        if getattr(model.config, "use_cache", None):
            model.config.use_cache = False
        return model.eval()
    except Exception as exc:  # transformers raises many types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelLoadError(f"{path}: transformers cannot build this model ({first[:200]})") from None
    finally:
        logs.set_verbosity(verbosity)
        if bars:
            logs.enable_progress_bar()


def _factory(spec: str) -> nn.Module:
    mod_name, _, fn_name = spec.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as exc:
        raise ModelLoadError(f"{spec}: cannot import module '{mod_name}' ({exc})") from None
    fn = getattr(mod, fn_name, None)
    if fn is None or not callable(fn):
        raise ModelLoadError(f"{spec}: '{mod_name}' has no callable '{fn_name}'")
    model = fn()
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"{spec}: factory returned {type(model).__name__}, not an nn.Module")
    return model


def _selected(spec: str | Path) -> tuple[Path, str | None]:
    """``FILE#PREFIX`` → (FILE, PREFIX): one model out of a checkpoint that holds several."""
    path = Path(spec).expanduser()
    if not path.exists() and "#" in str(spec):
        base, _, prefix = str(spec).rpartition("#")
        if Path(base).expanduser().exists() and prefix:
            return Path(base).expanduser(), prefix
    return path, None


def _state_from_path(path: Path, prefix: str | None) -> tuple[TensorSource, str, dict[str, Any]]:
    """A file's or folder's tensors (only those under ``prefix``, renamed without it, when given)."""
    src, origin, meta = _state_from_file(path) if path.is_file() else _state_from_dir(path)
    if prefix is not None:
        src = RenamedSource.under(src, prefix)
        if not src.infos():
            raise ModelLoadError(f"{path}: no tensor names start with '{prefix}'")
        meta = {**meta, "prefix": prefix}
    return src, origin, meta


def _weights_state(weights: str | Path) -> dict[str, torch.Tensor]:
    return _state_from_path(*_selected(weights))[0].to_dict()


def load_model(
    source: nn.Module | str | Path,
    *,
    weights: str | Path | None = None,
    arch: str | None = None,
    hf_module: bool = False,
) -> LoadedModel:
    """Load a model for analysis.

    Parameters
    ----------
    source : nn.Module, str or Path
        The model: a module, a weights file or folder, ``package.module:factory``,
        or a built-in architecture name (see :func:`nndiag.models.available_models`).
    weights : str or Path, optional
        Weights to load (strict) into the module built from ``source`` when
        ``source`` is a factory or built-in name.
    arch : str, optional
        An architecture (built-in name or factory) to build when ``source`` is a
        weights file, giving a runnable module.
    hf_module : bool
        For a Hugging Face folder, also build a runnable ``transformers`` model (needs
        ``nndiag[hf]``; never contacts a hub), run through :class:`~nndiag.io.hf.HFLogits`
        so that ``module(x)`` returns the logits tensor.

    Returns
    -------
    LoadedModel

    Raises
    ------
    ModelLoadError
        Unknown file type, corrupt or truncated file, unsafe pickle, no weights,
        weights that do not fit the architecture.

    Examples
    --------
    >>> lm = load_model("resnet20")
    >>> lm.module is not None, len(lm.tensors) > 0
    (True, True)
    """
    if isinstance(source, nn.Module):
        ignored = load_state_dict_into(source, _weights_state(weights), str(weights)) if weights is not None else []
        return LoadedModel(ModuleSource(source), source, type(source).__name__, "module",
                           meta={"ignored_keys": ignored} if ignored else {})
    if not isinstance(source, (str, Path)):
        raise InputError(f"cannot load a model from {type(source).__name__}; expected {SUPPORTED}")
    spec = str(source)
    path, prefix = _selected(spec)
    if path.exists():
        tensors, origin, meta = _state_from_path(path, prefix)
        module: nn.Module | None = None
        if arch is not None:
            module = build_model(arch) if is_builtin(arch) else _factory(arch)
            ignored = load_state_dict_into(module, tensors.to_dict(), spec)
            if ignored:
                meta = {**meta, "ignored_keys": ignored}
            tensors = ModuleSource(module)
        elif origin == "hf" and hf_module:
            from nndiag.io.hf import HFLogits

            raw = _hf_module(path)
            module = HFLogits(raw)  # analyses call module(x) for a logits tensor
            tensors = ModuleSource(raw)  # layer names as in the checkpoint
        name = (path.name if path.is_dir() else path.stem) + (f"#{prefix.rstrip('.')}" if prefix else "")
        return LoadedModel(tensors, module, name, origin, str(path), meta)
    if weights is not None and not _selected(weights)[0].exists():
        raise ModelLoadError(f"{weights}: no such weights file")
    if is_builtin(spec):
        module = build_model(spec)
        origin = "builtin"
    elif _FACTORY_RE.match(spec):
        module = _factory(spec)
        origin = "factory"
    else:
        looks_like_file = bool(Path(spec).suffix) or "/" in spec
        what = "no such file or folder" if looks_like_file else "not a file, factory or built-in name"
        raise ModelLoadError(f"{spec}: {what}; expected {SUPPORTED}")
    ignored = load_state_dict_into(module, _weights_state(weights), str(weights)) if weights is not None else []
    return LoadedModel(ModuleSource(module), module, spec, origin, str(weights) if weights else None,
                       {"ignored_keys": ignored} if ignored else {})


def hf_config(module: Any, meta: dict[str, Any] | None) -> dict[str, Any] | None:
    """A Hugging Face config as a dict: the loaded ``config.json``, else a module's ``config``."""
    cfg = (meta or {}).get("config")
    if isinstance(cfg, dict):
        return cfg
    cfg = getattr(module, "config", None)
    to_dict = getattr(cfg, "to_dict", None)
    if callable(to_dict):
        try:
            out = to_dict()
        except Exception:  # noqa: BLE001 - a config that cannot serialise: no layout facts
            return None
        return out if isinstance(out, dict) else None
    return None
