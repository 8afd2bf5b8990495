"""A private copy of a model whose parameters are views of one flat buffer, for grid loops.

Evaluating a landscape point through ``torch.func.functional_call`` swaps every parameter
and buffer into the module and back for each forward, and building the point's
parameters costs two tensor operations per parameter. For small models that overhead
was larger than the forward itself: on a 64-64-64-10 MLP (512 examples, one thread) the
swap and the per-parameter sums took ~0.18 ms of a ~0.42 ms point, more than
loss-landscapes' whole point (~0.3 ms).

:class:`BoundCopy` instead binds, once, a copy of the model (the caller's rewritten
:mod:`~nndiag.landscape.fold` copy, or a deep copy) to tensors it owns: the trainable
parameters become views of one flat buffer, laid out so that 4-D convolution weights
are channels-last where asked, and buffers/frozen parameters become the given copies. A
grid point is then ``flat = base + Σ c_j d_j`` — one fused operation per direction — plus,
for folded BatchNorm pairs, the folded weights written in place, and a plain call of the
module. The user's model is never touched.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from nndiag.landscape.fold import Folded, trace_graph


def _cl(shape: torch.Size | tuple[int, ...], channels_last: bool) -> bool:
    return channels_last and len(shape) == 4


def _flatten(tensors: dict[str, torch.Tensor], names: list[str], channels_last: bool) -> torch.Tensor:
    """One flat vector of ``tensors`` in the buffer's layout (4-D as (O, H, W, I) when channels-last)."""
    parts = [(t.permute(0, 2, 3, 1) if _cl(t.shape, channels_last) else t).reshape(-1)
             for t in (tensors[n] for n in names)]
    return torch.cat(parts)


def input_key(x: torch.Tensor) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
    """Identifies a model input tensor (storage address, shape, strides) while it is alive."""
    return x.data_ptr(), tuple(x.shape), tuple(x.stride())


def _set(module: nn.Module, names: list[str], value: torch.Tensor) -> None:
    """Rebind parameter or buffer ``names`` (aliases of one tensor) of ``module`` to ``value``
    (no copy); tied parameters stay one ``nn.Parameter`` object, so that
    ``torch.func.functional_call`` still sees them as tied."""
    param = None
    for name in names:
        owner_name, _, attr = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        if attr in owner._buffers:
            owner._buffers[attr] = value
            continue
        param = param if param is not None else nn.Parameter(value, requires_grad=False)
        if attr in owner._parameters:
            owner._parameters[attr] = param
        else:
            setattr(owner, attr, param)


class BoundCopy:
    """A model copy bound to a flat parameter buffer (see the module docstring).

    Parameters
    ----------
    model : nn.Module
        The user's model (only copied).
    base : dict of str to Tensor
        The trainable parameters at the origin (the grid's dtype and device).
    dirs : list of dict of str to Tensor
        The directions, same keys as ``base``.
    buffers : dict of str to Tensor
        Buffers and frozen parameters, as the grid uses them.
    folded : Folded, optional
        A rewritten copy (:func:`~nndiag.landscape.fold.inference_copy`) to bind instead of
        a deep copy of ``model``.
    channels_last : bool
        Store 4-D weights channels-last (faster oneDNN convolutions on CPU).
    """

    def __init__(self, model: nn.Module, base: dict[str, torch.Tensor], dirs: list[dict[str, torch.Tensor]],
                 buffers: dict[str, torch.Tensor], folded: Folded | None = None,
                 channels_last: bool = True) -> None:
        self.folded = folded
        self.module = folded.module if folded is not None else copy.deepcopy(model)
        self.names = list(base)
        self.shapes = {n: base[n].shape for n in self.names}
        self.buffers = buffers
        self.channels_last = channels_last
        self.base = _flatten(base, self.names, channels_last)
        self.dirs = [_flatten(d, self.names, channels_last) for d in dirs]
        #: ``base`` and ``dirs`` as dicts of views into the flat copies (callers may drop theirs)
        self.base_views = self._views(self.base)
        self.dir_views = [self._views(d) for d in self.dirs]
        owners = {o for pair in (folded.pairs if folded is not None else []) for o in pair[:2]}
        owners |= {lin for lin, _ in (folded.flattened if folded is not None else [])}
        self._fold_inputs = [n for n in self.names if n.rpartition(".")[0] in owners]
        #: the current point's coefficients (read by a precomputed first layer)
        self.coeffs: list[float] = [0.0] * len(dirs)
        # tied tensors (one Parameter registered under several names) are bound under all of
        # their names; read once from the model as given (copies share the map)
        groups: dict[int, list[str]] = {}
        for n, t in [*self.module.named_parameters(remove_duplicate=False),
                     *self.module.named_buffers(remove_duplicate=False)]:
            groups.setdefault(id(t), []).append(n)
        self.aliases = {n: group for group in groups.values() for n in group}
        #: ``(module path, cache)`` once :func:`~nndiag.landscape.first_layer.install` has run
        self.first_layer: tuple[str, Any] | None = None
        #: :func:`input_key` of the input during a call of this copy, else None
        self.input_key: Any = None
        self._graph: Any = None
        self._bind()

    @property
    def graph(self) -> Any:
        """The copy's ``torch.fx`` graph: a rewritten copy's own, else traced once (the first
        layer's precomputation and the stacked evaluator both read it). Raises what tracing
        raises."""
        import torch.fx

        if isinstance(self.module, torch.fx.GraphModule):
            return self.module.graph
        if self._graph is None:
            self._graph = trace_graph(self.module)
        return self._graph

    def _views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Parameter-shaped views of a flat vector in the buffer's layout."""
        views, off = {}, 0
        for n in self.names:
            shape = self.shapes[n]
            part = flat[off:off + shape.numel()]
            if _cl(shape, self.channels_last):
                o, i, h, w = shape
                views[n] = part.view(o, h, w, i).permute(0, 3, 1, 2)
            else:
                views[n] = part.view(shape)
            off += shape.numel()
        return views

    def _bind(self) -> None:
        """Allocate this copy's flat buffer (and folded targets) and bind the module to them."""
        self.flat = torch.empty_like(self.base)
        self.views = self._views(self.flat)
        # the folded convolutions' weights and biases (and permuted linear weights): own tensors,
        # rewritten per point
        self.targets: dict[str, torch.Tensor] = {}
        if self.folded is not None:
            sample = self.folded.params(self.views, self.buffers)
            for conv, _, _ in self.folded.pairs:
                for key in (f"{conv}.weight", f"{conv}.bias"):
                    v = sample[key]
                    fmt = torch.channels_last if _cl(v.shape, self.channels_last) else torch.contiguous_format
                    self.targets[key] = torch.empty_like(v, memory_format=fmt)
            for lin, _ in self.folded.flattened:  # weight columns in channels-last order
                self.targets[f"{lin}.weight"] = torch.empty_like(sample[f"{lin}.weight"])
        for source in (self.buffers, self.views, self.targets):  # later sources win
            for n, t in source.items():
                if source is self.targets or n not in self.targets:
                    _set(self.module, self.aliases.get(n, [n]), t)

    def copy(self) -> BoundCopy:
        """An independent copy (own module, buffer and folded targets; shared buffers and
        directions) for evaluating other points at the same time."""
        other = copy.copy(self)
        other.module = copy.deepcopy(self.module)
        other._bind()
        if self.first_layer is not None:
            from nndiag.landscape.first_layer import reinstall

            reinstall(other, *self.first_layer)
        return other

    @torch.inference_mode()
    def set_point(self, c: torch.Tensor) -> None:
        """Write the parameters at ``base + Σ_j c[j] d_j`` into the bound tensors."""
        coeffs = self.coeffs = [float(v) for v in c]
        if not self.dirs:
            self.flat.copy_(self.base)
        for j, (d, a) in enumerate(zip(self.dirs, coeffs, strict=True)):
            if j == 0:
                torch.add(self.base, d, alpha=a, out=self.flat)
            else:
                self.flat.add_(d, alpha=a)
        if self.folded is not None:
            new = self.folded.params({n: self.views[n] for n in self._fold_inputs}, self.buffers)
            for key, t in self.targets.items():
                t.copy_(new[key])

    def __call__(self, x: torch.Tensor) -> Any:
        # set only for the length of this call: the same module object may also be run through
        # functional_call (the grid's vmap path on the folded copy), where it must compute live
        self.input_key = input_key(x)
        try:
            return self.module(x)
        finally:
            self.input_key = None

