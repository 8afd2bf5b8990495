"""The first layer of a landscape grid, computed once per direction instead of once per point.

On a grid ``θ(c) = θ₀ + Σ_j c_j d_j`` the model's first layer, when it is a convolution or
a linear layer applied to the input itself, is affine in the coordinates::

    layer(x; W₀ + Σ c_j D_j, b₀ + Σ c_j δ_j) = layer(x; W₀, b₀) + Σ_j c_j · layer(x; D_j, δ_j)

so its output at every point is ``Y₀ + Σ c_j Y_j`` with ``1 + dim`` tensors computed once per
batch (parameter-free reshaping before it — ``nn.Flatten``, ``view``/``reshape`` — is part of
"the input") — one fused multiply-add per direction replaces the layer's arithmetic. On the digits
MLP (64→64→64→10) the first of three matrix products is 46 % of a point's arithmetic; on
the digits CNN the 1→16 convolution (with its ReLU) is ~15 % of a point's time.

:func:`install` finds such a layer on a :class:`~nndiag.landscape.bound.BoundCopy` (the
input placeholder of the traced module feeds, through a chain of such reshapes used nowhere
else, exactly one ``nn.Conv{1,2,3}d``/``nn.Linear``, called once, whose weight is a
trainable parameter and which is not a folded BatchNorm target — a folded weight ``W·γ/σ``
is not affine in the coordinates) and replaces its
``forward`` on that copy. The precomputed outputs are looked up by the model input the copy
was called with (:attr:`BoundCopy.input_key`); inputs it has not seen go through the live
layer (the copy's current parameters), so the copy computes the same function either way.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import nn

from nndiag.landscape.bound import BoundCopy, input_key

#: The precomputed outputs may take at most this many bytes (``(1 + dim)`` tensors per batch).
MAX_BYTES = 256 << 20
#: A bound copy keeps its grid rows' partial sums (one tensor per batch) up to this many bytes.
ROW_BYTES = 64 << 20
_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


#: Parameter-free operations that may stand between the input and the first layer.
_RESHAPE_MODULES = (nn.Flatten, nn.Identity)
RESHAPE_METHODS = ("view", "reshape", "flatten", "contiguous")
RESHAPE_FUNCTIONS = (torch.flatten, torch.reshape)


def _apply(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if isinstance(layer, nn.Linear):
        return nn.functional.linear(x, weight, bias)
    return layer._conv_forward(x, weight, bias)  # type: ignore[operator]  # (padding modes as the layer has them)


class FirstLayer:
    """Stands in for ``layer.forward`` on one bound copy (see the module docstring).

    Parameters
    ----------
    owner : BoundCopy
        The copy whose current coefficients (:attr:`BoundCopy.coeffs`) select the point.
    layer : nn.Module
        The copy's first layer (its live parameters serve batches not precomputed).
    cache : dict
        :func:`~nndiag.landscape.bound.input_key` of a model input → ``(layer input shape,
        Y₀, [Y_1, ...])``; shared by copies.
    """

    def __init__(self, owner: BoundCopy, layer: nn.Module, cache: dict[Any, Any]) -> None:
        self.owner, self.layer, self.cache = owner, layer, cache
        #: per batch: (all coordinates but the last, ``Y₀ + Σ_{j<last} c_j Y_j``) — a grid row's
        #: points share it (see :meth:`__call__`)
        self._rows: dict[Any, tuple[tuple[float, ...], torch.Tensor]] = {}
        self._row_bytes = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        key = self.owner.input_key  # None: not called through the bound copy (e.g. functional_call)
        hit = None if key is None else self.cache.get(key)
        if hit is None or hit[0] != tuple(x.shape):
            return type(self.layer).forward(self.layer, x)
        _, y0, ys = hit
        if not ys:
            return y0.clone()  # a fresh tensor: later in-place operations must not touch Y₀
        coeffs = self.owner.coeffs
        if len(ys) == 1:
            return torch.add(y0, ys[0], alpha=coeffs[0])
        # A plane's points come row by row (the last coordinate fastest): the sum over the other
        # directions is kept per batch and the point adds its last term — one pass over the
        # output instead of two, the same operations in the same order (so the same values).
        head = tuple(coeffs[:-1])
        row = self._rows.get(key)
        if row is None or row[0] != head:
            part = torch.add(y0, ys[0], alpha=coeffs[0])
            for y, a in zip(ys[1:-1], coeffs[1:-1], strict=True):
                part.add_(y, alpha=a)
            if row is None:
                nbytes = part.numel() * part.element_size()
                if self._row_bytes + nbytes > ROW_BYTES:
                    return part.add_(ys[-1], alpha=coeffs[-1])
                self._row_bytes += nbytes
            self._rows[key] = row = (head, part)
        return torch.add(row[1], ys[-1], alpha=coeffs[-1])

    def __deepcopy__(self, memo: dict[int, Any]) -> FirstLayer:
        return self  # copies re-install their own (:func:`reinstall`), sharing the cache


def _is_reshape(node: Any, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return type(modules[str(node.target)]) in _RESHAPE_MODULES
    if node.op == "call_method":
        return node.target in RESHAPE_METHODS
    return node.op == "call_function" and node.target in RESHAPE_FUNCTIONS


def is_shape_query(node: Any) -> bool:
    """``x.shape``, ``x.size()``, ``x.dim()`` or an item of one: a value that carries no data."""
    if node.op == "call_function" and node.target is getattr and node.args[1:] == ("shape",):
        return True
    if node.op == "call_method" and node.target in ("size", "dim"):
        return True
    return node.op == "call_function" and node.target is operator.getitem and is_shape_query(node.args[0])


def _candidate(bound: BoundCopy) -> str | None:
    """The module path of a first layer that may be precomputed, else None."""
    import torch.fx

    module = bound.module
    try:
        graph = bound.graph
    except Exception:  # noqa: BLE001 - any tracing failure: leave the copy as it is
        return None
    nodes = list(graph.nodes)
    modules = dict(module.named_modules())
    placeholders = [n for n in nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        return None
    node = placeholders[0]
    while True:  # follow the input through reshapes used nowhere else (shape queries aside)
        users = [u for u in node.users if not is_shape_query(u)]
        if len(users) != 1:
            return None
        user = users[0]
        extra = [a for a in [*user.args[1:], *user.kwargs.values()] if isinstance(a, torch.fx.Node)]
        if not user.args or user.args[0] is not node or not all(is_shape_query(a) for a in extra):
            return None
        if not _is_reshape(user, modules):
            break
        node = user
    if user.op != "call_module" or len(user.args) != 1 or user.kwargs:
        return None
    target = str(user.target)
    layer = modules[target]
    if type(layer) not in _LAYERS:
        return None
    if sum(n.op == "call_module" and str(n.target) == target for n in nodes) != 1:
        return None
    if any(n.op == "get_attr" and str(n.target).startswith(f"{target}.") for n in nodes):
        return None
    folded = ({conv for conv, _, _ in bound.folded.pairs} | {lin for lin, _ in bound.folded.flattened}
              if bound.folded is not None else set())
    if target in folded or f"{target}.weight" not in bound.base_views:
        return None
    return target


class _Stop(Exception):
    """Ends a forward pass once the first layer's input is known."""


def _layer_input(bound: BoundCopy, layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """What ``layer`` receives when the copy is called on ``x`` (the forward stops there);
    None when the forward never reaches it."""
    seen: list[torch.Tensor] = []

    def grab(_m: nn.Module, args: tuple[Any, ...]) -> None:
        seen.append(args[0])
        raise _Stop

    handle = layer.register_forward_pre_hook(grab)
    try:
        bound(x)
    except _Stop:
        pass
    finally:
        handle.remove()
    return seen[0] if seen else None


def install(bound: BoundCopy, inputs: list[torch.Tensor], max_bytes: int = MAX_BYTES) -> str | None:
    """Precompute the first layer of ``bound`` on ``inputs`` (the grid's batches) when it applies.

    Parameters
    ----------
    bound : BoundCopy
        The grid's bound copy (its module is changed; the user's model is not).
    inputs : list of Tensor
        The batches every grid point is evaluated on (the same tensor objects).
    max_bytes : int
        Skip when the ``(1 + dim)`` outputs per batch would take more memory than this.

    Returns
    -------
    str or None
        The layer's module path, or None when nothing was installed.
    """
    target = _candidate(bound)
    if target is None:
        return None
    layer = bound.module.get_submodule(target)
    w0, b0 = bound.base_views[f"{target}.weight"], bound.base_views.get(f"{target}.bias")
    if b0 is None and getattr(layer, "bias", None) is not None:
        b0 = layer.bias.detach()  # a frozen bias: part of Y₀ only
    dirs = [(d[f"{target}.weight"], d.get(f"{target}.bias")) for d in bound.dir_views]
    cache: dict[Any, Any] = {}
    size = 0
    with torch.inference_mode():
        for x in inputs:
            xi = _layer_input(bound, layer, x)
            if xi is None:
                return None
            y0 = _apply(layer, xi, w0, b0)
            size += y0.numel() * y0.element_size() * (1 + len(dirs))
            if size > max_bytes:
                return None
            cache[input_key(x)] = (tuple(xi.shape), y0, [_apply(layer, xi, dw, db) for dw, db in dirs])
    reinstall(bound, target, cache)
    return target


def reinstall(bound: BoundCopy, target: str, cache: dict[Any, Any]) -> None:
    """Put a :class:`FirstLayer` on ``bound``'s layer ``target`` with the given (shared) cache."""
    layer = bound.module.get_submodule(target)
    first = FirstLayer(bound, layer, cache)
    layer.forward = first  # an instance attribute: nn.Module.__call__ calls it
    bound.first_layer = (target, cache)


def uninstall(bound: BoundCopy) -> None:
    """Give ``bound``'s first layer its own ``forward`` back."""
    if bound.first_layer is not None:
        bound.module.get_submodule(bound.first_layer[0]).__dict__.pop("forward", None)
        bound.first_layer = None
