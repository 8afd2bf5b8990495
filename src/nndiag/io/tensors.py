"""Named-tensor sources: one interface over modules, state dicts, safetensors and ONNX.

A :class:`TensorSource` lists tensor names with shape and dtype *without* loading
their values, and loads one tensor at a time, so that a checkpoint larger than
memory can be walked tensor by tensor.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from nndiag.errors import ModelLoadError


@dataclass(frozen=True)
class TensorInfo:
    """Metadata of one named tensor.

    Attributes
    ----------
    name : str
        Fully qualified name, e.g. ``"layer1.0.conv1.weight"``.
    shape : tuple of int
        Tensor shape.
    dtype : str
        dtype name without the ``torch.`` prefix, e.g. ``"float32"``.
    module_type : str or None
        Class name of the owning module when known (``"Conv2d"``, ``"Linear"``...).
    computed : bool
        A value the module computes from other tensors (a parametrised weight), not one it
        stores: it holds no parameters of its own.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    module_type: str | None = None
    computed: bool = False

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= int(s)
        return n


class TensorSource:
    """Abstract lazy mapping of names to tensors."""

    def infos(self) -> list[TensorInfo]:
        """Metadata of every tensor, in storage order."""
        raise NotImplementedError

    def get(self, name: str) -> torch.Tensor:
        """Load one tensor (on the CPU unless the source already lives elsewhere)."""
        raise NotImplementedError

    def names(self) -> list[str]:
        return [i.name for i in self.infos()]

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for info in self.infos():
            yield info.name, self.get(info.name)

    def __len__(self) -> int:
        return len(self.infos())

    def to_dict(self) -> dict[str, torch.Tensor]:
        """Load everything into a plain dict (avoid for models larger than memory)."""
        return dict(iter(self))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


class ModuleSource(TensorSource):
    """Parameters and buffers of a live ``nn.Module`` (no copies)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        owner: dict[str, str] = {}
        for mname, mod in module.named_modules():
            kind = type(mod).__name__
            for table in (mod._parameters, mod._buffers):  # (what named_parameters/buffers walk)
                for pname, t in table.items():
                    if t is not None:
                        owner[f"{mname}.{pname}" if mname else pname] = kind
        self._owner = owner
        state = module.state_dict(keep_vars=True)
        # weights the state dict does not hold as such (:func:`_derived_tensors`), placed where
        # their module's entries start
        derived = _derived_tensors(module)
        self._tensors: dict[str, Any] = {}
        self._computed: set[str] = set()

        def add(items: list[tuple[str, torch.Tensor, str, bool]]) -> None:
            for dkey, t, kind, computed in items:
                self._tensors[dkey], owner[dkey] = t, kind
                if computed:
                    self._computed.add(dkey)

        for key, value in state.items():
            owner_name = key.rpartition(".")[0]
            for mname in [m for m in derived if m == owner_name or owner_name.startswith(f"{m}.")]:
                add(derived.pop(mname))
            self._tensors[key] = value
        for items in derived.values():  # (a module without state entries)
            add(items)

    def infos(self) -> list[TensorInfo]:
        return [
            TensorInfo(k, tuple(v.shape), _dtype_name(v.dtype), self._owner.get(k), k in self._computed)
            for k, v in self._tensors.items()
            if isinstance(v, torch.Tensor)
        ]

    def get(self, name: str) -> torch.Tensor:
        return self._tensors[name].detach()


def _derived_tensors(module: torch.nn.Module) -> dict[str, list[tuple[str, torch.Tensor, str, bool]]]:
    """``{module name: [(tensor name, tensor, module class, computed)]}`` for the weights the
    state dict does not hold as such:

    - parametrised tensors (``torch.nn.utils.parametrize``: ``weight_norm``, ``spectral_norm``,
      orthogonal...): their effective value, computed with the parametrisations in eval mode
      (a training ``spectral_norm`` would run a power-iteration step and change the model);
      the ``parametrizations.*.original*`` entries stay, as the pieces they are; likewise the
      deprecated ``torch.nn.utils.weight_norm``'s ``weight`` from ``weight_g`` and ``weight_v``;
    - torch.ao quantised Linear/Conv (dynamic or static): the quantised weight in their packed
      params.
    """
    from torch.nn.utils import parametrize

    out: dict[str, list[tuple[str, torch.Tensor, str, bool]]] = {}
    for mname, mod in module.named_modules():
        items = []
        prefix = f"{mname}." if mname else ""
        if parametrize.is_parametrized(mod):
            for pname, plist in mod.parametrizations.items():
                modes = [(m, m.training) for m in plist.modules()]
                try:
                    plist.eval()
                    with torch.no_grad():
                        t = getattr(mod, pname)
                except Exception:  # noqa: BLE001 - a parametrisation that cannot run: pieces only
                    continue
                finally:
                    for m, was in modes:
                        m.training = was
                items.append((f"{prefix}{pname}", t.detach(), type(mod).__name__, True))
        elif old := [h for h in mod._forward_pre_hooks.values() if type(h).__name__ == "WeightNorm"]:
            # the deprecated torch.nn.utils.weight_norm: ``weight_g``/``weight_v`` parameters and a
            # pre-hook that computes ``weight`` from them
            with torch.no_grad():
                for h in old:
                    items.append((f"{prefix}{h.name}", h.compute_weight(mod).detach(), type(mod).__name__, True))
        elif hasattr(mod, "_packed_params") and callable(w := getattr(mod, "weight", None)) \
                and not isinstance(w, torch.Tensor):
            try:
                t = w()
            except Exception:  # noqa: BLE001 - an unusual packed module: left to the state dict
                t = None
            if isinstance(t, torch.Tensor):
                items.append((f"{prefix}weight", t.detach(), type(mod).__name__, False))  # stored, packed
        if items:
            out[mname] = items
    return out


class DictSource(TensorSource):
    """An in-memory state dict."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self._tensors = {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor)}

    def infos(self) -> list[TensorInfo]:
        return [TensorInfo(k, tuple(v.shape), _dtype_name(v.dtype)) for k, v in self._tensors.items()]

    def get(self, name: str) -> torch.Tensor:
        return self._tensors[name]


class RenamedSource(TensorSource):
    """Another source's tensors under other names: without a checkpoint's wrapper prefix, or
    (``only=True``) just one model out of a checkpoint that holds several (``FILE#model_ema.``).

    Parameters
    ----------
    source : TensorSource
        The tensors.
    names : dict of str to str
        The source's name → the name shown.
    only : bool
        Keep only the tensors ``names`` maps (else the others keep their names).
    """

    def __init__(self, source: TensorSource, names: Mapping[str, str], only: bool = False) -> None:
        self.source, self.names, self.only = source, dict(names), only
        self._back = {v: k for k, v in self.names.items()}

    @classmethod
    def under(cls, source: TensorSource, prefix: str) -> RenamedSource:
        """The tensors of ``source`` whose names start with ``prefix``, without it."""
        n = len(prefix)
        return cls(source, {i.name: i.name[n:] for i in source.infos() if i.name.startswith(prefix)}, only=True)

    def infos(self) -> list[TensorInfo]:
        return [replace(i, name=self.names.get(i.name, i.name)) for i in self.source.infos()
                if not self.only or i.name in self.names]

    def get(self, name: str) -> torch.Tensor:
        return self.source.get(self._back.get(name, name))


_ST_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
    "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}


class SafetensorsSource(TensorSource):
    """One or several ``.safetensors`` files, memory-mapped and read tensor by tensor.

    Parameters
    ----------
    files : list of Path
        The shard files (one for an unsharded checkpoint).
    """

    def __init__(self, files: list[Path]) -> None:
        self.files = [Path(f) for f in files]
        self._where: dict[str, Path] = {}
        self._infos: list[TensorInfo] = []
        for f in self.files:
            for info in _read_safetensors_header(f):
                self._where[info.name] = f
                self._infos.append(info)

    @classmethod
    def from_index(cls, index: Path) -> SafetensorsSource:
        """Open a sharded checkpoint from its ``*.safetensors.index.json``."""
        try:
            data = json.loads(Path(index).read_text())
            shards = sorted(set(data["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ModelLoadError(f"{index}: not a valid safetensors index ({exc})") from None
        files = [Path(index).parent / s for s in shards]
        missing = [str(f.name) for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"{index}: shard files missing: {', '.join(missing[:5])}")
        return cls(files)

    def infos(self) -> list[TensorInfo]:
        return list(self._infos)

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        path = self._where[name]
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                return f.get_tensor(name)
        except Exception as exc:  # safetensors raises several types
            raise ModelLoadError(f"{path}: cannot read tensor '{name}' ({exc})") from None


def _read_safetensors_header(path: Path) -> list[TensorInfo]:
    """Parse a safetensors header (8-byte little-endian length + JSON) and validate it."""
    import struct

    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise ValueError("file is shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", raw)
            if n <= 0 or n > min(size - 8, 100_000_000):
                raise ValueError("header length is out of range")
            header = json.loads(fh.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{path}: not a valid safetensors file ({exc})") from None
    if not isinstance(header, dict):
        raise ModelLoadError(f"{path}: not a valid safetensors file (header is not a mapping)")
    infos = []
    data_len = size - 8 - n
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = meta["data_offsets"]
            shape = tuple(int(s) for s in meta["shape"])
            dtype = _ST_DTYPES.get(meta["dtype"], meta["dtype"].lower())
        except (KeyError, TypeError, ValueError):
            raise ModelLoadError(f"{path}: malformed header entry for '{name}'") from None
        if end > data_len:
            raise ModelLoadError(f"{path}: truncated (tensor '{name}' runs past the end of file)")
        infos.append(TensorInfo(name, shape, dtype))
    return infos
