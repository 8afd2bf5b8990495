"""Many landscape grid points in one pass through a fully connected network.

A grid point of a small fully connected network (the digits MLP: 64→64→64→10 on 512
examples) is three small matrix products, a few element-wise operations and a
cross-entropy: ~0.3 ms, of which PyTorch's per-operation dispatch is a large share.
Evaluating ``k`` points together makes every operation ``k`` times larger and removes
that share: activations carry a leading *point* axis, features first
``(k, features, examples)`` after a moving linear layer; such a layer becomes one batched
product ``W·H`` with the ``k`` points' weights ``W₀ + Σ_j c_j D_j`` (``torch.baddbmm``);
element-wise activations are applied as they are; a precomputed first layer
(:mod:`~nndiag.landscape.first_layer`) gives ``Y₀ + Σ_j c_j Y_j`` for all ``k`` points in one
product; the default cross-entropy normalises along the class axis of the last layer's
``(k, classes, examples)`` logits (the fast layout of
:func:`~nndiag.landscape._setup.cpu_cross_entropy`); and every pass writes into the same
buffers. Measured on the 2-core development VMs, one thread, 441 points of the digits MLP:
148 ms as a loop of forwards, 45 ms stacked by 8 (AMD EPYC, first version); per 16 points
2.4 ms before the buffers and the features-first layout, 1.7 ms after (Intel Xeon); the
same losses to 5e-7 in float32.

:class:`Stacked` interprets the ``torch.fx`` graph of the grid's bound copy
(:class:`~nndiag.landscape.bound.BoundCopy`) on such stacked tensors. It accepts a graph
made of: reshapes of the input before the first layer; ``nn.Linear`` (trainable, frozen
or bias-free weights; inputs of any rank with features last); parameter-free
element-wise activation modules, functions and methods; softmax / log-softmax over an
explicit axis; ``nn.Identity``/dropout (eval mode only); ``BatchNorm1d`` (eval, features
last) and ``LayerNorm`` over the last axis, with moving or frozen affine parameters.
Anything else (convolutions, attention, parameters read directly, ...) makes
:func:`build_stacked` return None, and the grid keeps its other strategies.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nndiag.landscape._setup import Batches, LossFn, default_loss, logits_of
from nndiag.landscape.bound import BoundCopy, input_key
from nndiag.landscape.first_layer import RESHAPE_FUNCTIONS, RESHAPE_METHODS, is_shape_query

#: Largest stacked activation or parameter (all ``k`` points of one batch), in bytes. The
#: digits MLP (512 examples, 64 features: 128 KiB per point), one thread, 64 points, medians
#: of 400 calls: 512 KiB passes 10.5 ms, 1 MiB 8.2 ms, 2 MiB 7.2 ms, 4 MiB 7.2–7.8 ms (with
#: the buffers of :meth:`Stacked._out`; without them 2 MiB passes ranged over 2× between runs).
#: Whole 21×21 digits-MLP planes on the 2-core Intel Xeon (1 MiB L2 per core, 36 MiB L3),
#: one thread, interleaved, medians of 22: 16 points a pass 68.0–68.7 ms, 20 points 62.8–65.5,
#: 22 points 63.4, 24 points 63.3–66.2, 32 points 68.2–68.9 (fewer passes, still in L3).
STACK_BYTES = 3 << 20
#: Most points per stacked pass.
MAX_POINTS = 64
#: Moving parameters copied as ``(1 + dim, numel)`` stacks at most this many bytes.
MAX_BYTES = 256 << 20

_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh,
    nn.Sigmoid, nn.Softplus, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Tanhshrink, nn.Softsign,
    nn.LogSigmoid,
)
_PASS_MODULES = (nn.Identity, nn.modules.dropout._DropoutNd)
_ELEMENTWISE_FUNCTIONS = {
    torch.relu, torch.relu_, F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu,
    F.mish, torch.tanh, torch.sigmoid, F.softplus, F.hardtanh, F.hardswish, F.hardsigmoid, F.logsigmoid,
    torch.nn.functional.tanh, torch.nn.functional.sigmoid,
}
_ELEMENTWISE_METHODS = {"relu", "relu_", "tanh", "tanh_", "sigmoid", "sigmoid_", "clamp_min", "clamp_min_"}
#: Normalisations over one axis (its index shifts by one for the point axis in front).
_AXIS_MODULES = (nn.Softmax, nn.LogSoftmax)
_AXIS_FUNCTIONS = {F.softmax, F.log_softmax, torch.softmax, torch.log_softmax}
_AXIS_METHODS = {"softmax", "log_softmax"}
_RESHAPE_MODULES = (nn.Flatten,)
_RESHAPE_METHODS = set(RESHAPE_METHODS)
_RESHAPE_FUNCTIONS = set(RESHAPE_FUNCTIONS)


#: Element-wise modules applied in place on a pass's own buffers (see :meth:`Stacked._activation`).
_IN_PLACE: dict[type, Callable[[Any, torch.Tensor], torch.Tensor]] = {
    nn.ReLU: lambda m, h: torch.relu_(h),
    nn.ReLU6: lambda m, h: F.relu6(h, inplace=True),
    nn.LeakyReLU: lambda m, h: F.leaky_relu(h, m.negative_slope, inplace=True),
    nn.ELU: lambda m, h: F.elu(h, m.alpha, inplace=True),
    nn.Hardtanh: lambda m, h: F.hardtanh(h, m.min_val, m.max_val, inplace=True),
}
_RELU_CALLS = {torch.relu, F.relu, "relu"}
#: Modules that map 1 to 1, so a ones row passes through them (see :meth:`Stacked._plan_ones`).
_KEEP_ONE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.CELU, nn.Identity, nn.Dropout, nn.AlphaDropout)


class Unsupported(Exception):
    """The graph has an operation :class:`Stacked` does not evaluate point-stacked."""


class _Moving:
    """One parameter at ``k`` points: ``base + C @ D`` with ``D`` the directions stacked."""

    def __init__(self, base: torch.Tensor, dirs: list[torch.Tensor]) -> None:
        self.shape = tuple(base.shape)
        self.base = base.reshape(1, -1).clone()
        self.dirs = torch.stack([d.reshape(-1) for d in dirs]) if dirs else None

    def at(self, c: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``(k, *shape)`` values at the rows of ``c`` (k × dim coefficients), written into
        ``out`` (``(k, numel)``) when given."""
        k = c.shape[0]
        if self.dirs is None:
            return self.base.expand(k, -1).reshape((k, *self.shape))
        return torch.addmm(self.base, c, self.dirs, out=out).view((k, *self.shape))

    @property
    def nbytes(self) -> int:
        n = self.base.numel() * (1 + (0 if self.dirs is None else self.dirs.shape[0]))
        return n * self.base.element_size()


class Stacked:
    """Evaluates the loss at ``k`` grid points per pass (see the module docstring).

    Parameters
    ----------
    bound : BoundCopy
        The grid's bound copy (its traced graph is interpreted; its first layer's cache, when
        installed, is used).
    graph : torch.fx.Graph
        The copy's graph.
    loss_fn : callable
        The grid's loss; :func:`~nndiag.landscape._setup.default_loss` takes the fused route.
    """

    def __init__(self, bound: BoundCopy, graph: Any, loss_fn: LossFn) -> None:
        self.bound = bound
        self.nodes = list(graph.nodes)
        self.modules = dict(bound.module.named_modules())
        self.loss_fn = loss_fn
        self.dim = len(bound.dir_views)
        self.moving: dict[str, _Moving] = {}
        #: input key -> ([Y₀; Y₁; …] flattened, output shape, features first)
        self._first: dict[Any, tuple[torch.Tensor, tuple[int, ...], bool]] = {}
        self.point_bytes = 0  # largest stacked activation or parameter per point (see points_per_pass)
        #: whether passes update ``point_bytes`` (:func:`build_stacked`'s pass over every batch does)
        self.measuring = True
        #: output buffers reused from pass to pass (see :meth:`_out`)
        self._buffers: dict[tuple[Any, ...], torch.Tensor] = {}
        self._buffer_ptrs: set[int] = set()  # (their storages, for :meth:`_owned`)
        self._reuse = False
        self._check()
        #: ones rows (see :meth:`_plan_ones`): the first layer's, the linear layers that read one
        #: and those that write one, and the element-wise nodes that carry one between them
        self._aug_first, self._aug_in, self._aug_out, self._chain = self._plan_ones()
        self._aug: dict[tuple[str, bool], _Moving] = {}
        #: nodes whose value no other node reads: one user, and through identities and dropout
        #: (which pass their input on as it is) the same for the node they pass on
        self._sole: set[Any] = set()
        for n in self.nodes:
            passes = n.op == "call_module" and isinstance(self.modules.get(str(n.target)), _PASS_MODULES)
            if len(n.users) == 1 and (not passes or (n.args and n.args[0] in self._sole)):
                self._sole.add(n)

    # -- building ---------------------------------------------------------------------------------
    def _check(self) -> None:
        """Refuse graphs with operations outside the supported set (before any arithmetic)."""
        size = 0
        flat = self.bound.flat.untyped_storage().data_ptr()
        for node in self.nodes:
            if node.op in ("placeholder", "output"):
                continue
            if node.op == "get_attr":
                raise Unsupported(f"reads parameter '{node.target}' directly")
            if node.op == "call_module":
                m = self.modules[str(node.target)]
                if isinstance(m, (nn.Linear, nn.BatchNorm1d, nn.LayerNorm)):
                    for attr in ("weight", "bias"):
                        key = f"{node.target}.{attr}"
                        t = getattr(m, attr, None)
                        if (key not in self.bound.base_views and isinstance(t, torch.Tensor)
                                and t.untyped_storage().data_ptr() == flat):
                            raise Unsupported(f"'{key}' is tied to another moving parameter")
                        if key in self.bound.base_views and key not in self.moving:
                            self.moving[key] = _Moving(self.bound.base_views[key],
                                                       [d[key] for d in self.bound.dir_views])
                            size += self.moving[key].nbytes
                    if isinstance(m, nn.LayerNorm) and len(m.normalized_shape) != 1:
                        raise Unsupported("LayerNorm over more than the last axis")
                elif not isinstance(m, (*_ELEMENTWISE_MODULES, *_PASS_MODULES, *_RESHAPE_MODULES, *_AXIS_MODULES)):
                    raise Unsupported(f"module {type(m).__name__}")
                elif list(m.parameters(recurse=False)):
                    raise Unsupported(f"module {type(m).__name__} has parameters")
            elif node.op == "call_function":
                if (node.target not in _ELEMENTWISE_FUNCTIONS | _RESHAPE_FUNCTIONS | _AXIS_FUNCTIONS
                        and not is_shape_query(node)):
                    raise Unsupported(f"function {getattr(node.target, '__name__', node.target)}")
            elif node.op == "call_method":
                if node.target not in _ELEMENTWISE_METHODS | _RESHAPE_METHODS | _AXIS_METHODS | {"size", "dim"}:
                    raise Unsupported(f"method {node.target}")
        # every moving parameter must be one a linear or normalisation layer reads: one behind
        # a parametrisation (weight_norm's g and v, say) would otherwise be held at the origin
        unread = [k for k in self.bound.base_views if k not in self.moving]
        if unread:
            raise Unsupported(f"moving parameters the stacked pass does not read: {', '.join(unread[:3])}")
        if size > MAX_BYTES:
            raise Unsupported("the moving linear parameters are too large to stack")
        # a pass holds every moving parameter at its k points too
        self.point_bytes = max((mv.base.numel() * mv.base.element_size() for mv in self.moving.values()), default=0)

    def _plan_ones(self) -> tuple[bool, set[str], set[str], set[Any]]:
        """Which moving linear layers take their bias as one more input feature.

        A linear layer whose input comes, through activations that map 1 to 1 (ReLU and kin,
        identities) and nodes with one user each, from the precomputed first layer or from
        another moving linear layer reads a features-first input with one more row, all ones,
        and multiplies it by ``[W | b]``: the bias is part of the product (``baddbmm`` copied
        the bias into its whole output first: 0.33 ms of a 2.4 ms pass of 24 digits-MLP
        points). The layer before writes that row with one more weight row ``[0 … 0 1]``.
        Whether a row is there is also checked as the pass runs (a layout that differs from
        the plan drops it, a view, before any other use).
        """
        first = self.bound.first_layer[0] if self.bound.first_layer is not None else None

        def moving_linear(n: Any) -> bool:
            return (n.op == "call_module" and isinstance(self.modules.get(str(n.target)), nn.Linear)
                    and f"{n.target}.weight" in self.moving)

        def keeps_one(n: Any) -> bool:
            if n.op == "call_module":
                return type(self.modules[str(n.target)]) in _KEEP_ONE
            return (n.op in ("call_function", "call_method") and n.target in _RELU_CALLS | {torch.relu_, "relu_"}
                    and len(n.args) == 1 and not n.kwargs)

        aug_first, aug_in, aug_out, chain = False, set(), set(), set()
        for n in self.nodes:
            if not moving_linear(n) or not n.args or not isinstance(n.args[0], torch.fx.Node):
                continue
            p, between = n.args[0], []
            while isinstance(p, torch.fx.Node) and keeps_one(p) and len(p.users) == 1 and p.args:
                between.append(p)
                p = p.args[0]
            if not isinstance(p, torch.fx.Node) or len(p.users) != 1:
                continue
            if p.op == "call_module" and str(p.target) == first:
                aug_first = True
            elif moving_linear(p):
                aug_out.add(str(p.target))
            else:
                continue
            aug_in.add(str(n.target))
            chain.update(between)
        return aug_first, aug_in, aug_out, chain

    def _aug_moving(self, name: str, m: nn.Linear, out_row: bool) -> _Moving:
        """``[W | b]`` (with the row ``[0 … 0 1]`` when ``out_row``) of linear layer ``name`` as
        one moving parameter (its directions: ``[D_W | D_b]``, zeros in that row)."""
        key = (name, out_row)
        if key not in self._aug:
            def aug(w: torch.Tensor, b: torch.Tensor | None, one: float) -> torch.Tensor:
                o, i = w.shape
                t = w.new_zeros(o + int(out_row), i + 1)
                t[:o, :i] = w
                if b is not None:
                    t[:o, i] = b
                if out_row:
                    t[o, i] = one
                return t

            views, wk, bk = self.bound.base_views, f"{name}.weight", f"{name}.bias"
            bias = views.get(bk, m.bias.detach() if m.bias is not None else None)
            base = aug(views[wk], bias, 1.0)
            dirs = [aug(d[wk], d.get(bk), 0.0) for d in self.bound.dir_views]
            self._aug[key] = _Moving(base, dirs)
        return self._aug[key]

    def _first_layer(self, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """The precomputed first layer's output at ``k`` points and whether it is features
        first: ``(k, features, examples)`` for a 2-D output ``Y₀`` (see :meth:`forward`),
        else ``(k, *Y₀.shape)``.

        Computed as ``[1, c]·[Y₀; Y₁; …]``, one product without a copy of ``Y₀`` first (16
        digits-MLP points: 0.14 ms against 0.25 ms for ``addmm(Y₀, c, [Y₁; …])``, one thread).
        """
        key = input_key(x)
        if key not in self._first:
            assert self.bound.first_layer is not None
            _, y0, ys = self.bound.first_layer[1][key]
            fm = y0.ndim == 2 and bool(ys)
            lay = (lambda y: y.t().reshape(-1)) if fm else (lambda y: y.reshape(-1))
            rows = [lay(y) for y in (y0, *ys)]
            shape = tuple(y0.t().shape if fm else y0.shape)
            if fm and self._aug_first:  # a ones row after the features (see _plan_ones): 1·1 + c·0
                n = shape[1]
                rows = [torch.cat([r, r.new_full((n,), 1.0 if i == 0 else 0.0)]) for i, r in enumerate(rows)]
                shape = (shape[0] + 1, n)
            self._first[key] = (torch.stack(rows), shape, fm)
        stack, shape, fm = self._first[key]
        k = c.shape[0]
        if stack.shape[0] == 1:  # the first layer does not move
            return stack.expand(k, -1).reshape((k, *shape)), False
        coef = torch.cat([c.new_ones(k, 1), c], 1)
        return torch.mm(coef, stack, out=self._out("first", (k, stack.shape[1]), stack)).view((k, *shape)), fm

    # -- evaluating -------------------------------------------------------------------------------
    def _out(self, tag: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor | None:
        """The buffer a pass writes ``tag``'s value into (None outside :meth:`losses`).

        Every pass reuses the same memory: fresh ~1 MiB activations each pass were returned
        to the system by the allocator and faulted back in on the next (the operations of a
        pass of 8 digits-MLP-sized points, one thread: 1.8 ms on fresh tensors, 0.95 ms on
        buffers).
        """
        if not self._reuse:
            return None
        key = (tag, shape, like.dtype, torch.is_inference_mode_enabled())
        buf = self._buffers.get(key)
        if buf is None:
            buf = self._buffers[key] = like.new_empty(shape)
            self._buffer_ptrs.add(buf.untyped_storage().data_ptr())
        return buf

    def _owned(self, h: torch.Tensor) -> bool:
        """Whether ``h`` lives in one of this pass's buffers (:meth:`_out`), so that an
        activation may overwrite it (not a cached first layer or a point-independent value)."""
        if not self._reuse:
            return False
        return h.untyped_storage().data_ptr() in self._buffer_ptrs

    def _activation(self, m: nn.Module, h: torch.Tensor, sole: bool) -> torch.Tensor:
        """Element-wise module ``m`` on ``h``, in place when ``h`` is this pass's own buffer and
        ``sole`` (this is the only node that reads it), as :mod:`~nndiag.landscape.fold` does
        (a model not rewritten by it keeps ``nn.ReLU`` modules: a fresh 3 MiB result per
        activation and pass doubled a digits-MLP grid, 52 → 113 ms)."""
        if sole and type(m) in _IN_PLACE and self._owned(h):
            return _IN_PLACE[type(m)](m, h)
        return m(h)

    def _param(self, key: str, fallback: torch.Tensor | None, c: torch.Tensor) -> tuple[torch.Tensor | None, bool]:
        """A parameter at the ``k`` points (stacked) or its fixed value (not stacked)."""
        if key in self.moving:
            mv = self.moving[key]
            return mv.at(c, self._out(key, (c.shape[0], mv.base.shape[1]), mv.base)), True
        return fallback, False

    def _linear(self, name: str, m: nn.Linear, h: torch.Tensor, stacked: bool, fm: bool,
                c: torch.Tensor, ones: bool = False) -> tuple[torch.Tensor, bool, bool]:
        """``m`` at the ``k`` points, whether the result is features first and whether it
        ends with a ones row.

        With a moving weight and 3-D (stacked) ``h`` in either layout, the result is
        ``(k, out, examples)``: one ``W·H`` product per point. Otherwise ``(k, *lead, out)``.
        With ``ones`` (``h`` is features first, ``(k, in + 1, examples)``, its last row all ones) the product
        is ``[W | b]·h``, with one more output row of ones when the next linear layer reads it.
        """
        k = c.shape[0]
        if ones:  # [W | b]·[H; 1] (see _plan_ones)
            out_row = name in self._aug_out
            mv = self._aug_moving(name, m, out_row)
            w = mv.at(c, self._out(f"{name}.aug", (k, mv.base.shape[1]), mv.base))
            return torch.bmm(w, h, out=self._out(name, (k, w.shape[1], h.shape[2]), h)), True, out_row
        w, w_moves = self._param(f"{name}.weight", m.weight, c)
        b, b_moves = self._param(f"{name}.bias", m.bias, c)
        if not stacked:
            h = h.unsqueeze(0).expand(k, *h.shape)
        if w_moves and h.ndim == 3:
            assert w is not None
            hf = h if fm else h.transpose(1, 2)  # (k, in, examples)
            buf = self._out(name, (k, w.shape[1], hf.shape[2]), hf)
            if b is None:
                return torch.bmm(w, hf, out=buf), True, False
            bias = b.unsqueeze(2) if b_moves else b.view(1, -1, 1).expand(k, -1, 1)
            return torch.baddbmm(bias, w, hf, out=buf), True, False
        if fm:
            h = h.transpose(1, 2)
        lead = h.shape[1:-1]
        flat = h.reshape(k, -1, h.shape[-1])
        if w_moves:
            assert w is not None
            buf = self._out(name, (k, flat.shape[1], w.shape[1]), flat)
            if b is None:
                out = torch.bmm(flat, w.transpose(1, 2), out=buf)
            else:
                bias = b.unsqueeze(1) if b_moves else b.view(1, 1, -1).expand(k, 1, -1)
                out = torch.baddbmm(bias, flat, w.transpose(1, 2), out=buf)
        else:
            out = F.linear(flat, w, None)
            if b is not None:
                out = out + (b.unsqueeze(1) if b_moves else b)
        return out.reshape(k, *lead, out.shape[-1]), False, False

    def _norm(self, name: str, m: nn.Module, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        k = c.shape[0]
        if isinstance(m, nn.BatchNorm1d):
            if h.ndim != 3 or m.running_mean is None:
                raise Unsupported("BatchNorm1d needs (examples, features) inputs and running statistics")
            mean = self.bound.module.get_buffer(f"{name}.running_mean")
            var = self.bound.module.get_buffer(f"{name}.running_var")
            h = (h - mean) * torch.rsqrt(var + m.eps)
        else:
            assert isinstance(m, nn.LayerNorm)
            h = F.layer_norm(h, m.normalized_shape, None, None, m.eps)
        w, w_moves = self._param(f"{name}.weight", getattr(m, "weight", None), c)
        b, b_moves = self._param(f"{name}.bias", getattr(m, "bias", None), c)
        view = (k,) + (1,) * (h.ndim - 2) + (h.shape[-1],)
        if w is not None:
            h = h * (w.view(view) if w_moves else w)
        if b is not None:
            h = h + (b.view(view) if b_moves else b)
        return h

    def forward(self, x: torch.Tensor, c: torch.Tensor, classes_first: bool = False) -> tuple[torch.Tensor, bool]:
        """Outputs at the ``k`` points of ``c`` for input batch ``x``: ``(k, *output shape)``.

        Activations of ``(examples, features)`` layers are held features first,
        ``(k, features, examples)``, from a moving linear layer on: each point is then one
        ``W·H`` product with the points' weights as stored (a digits-MLP pass of 8 points: 64×64
        layer 0.34 ms against 0.42 ms as ``H·Wᵀ`` with ``H`` examples first, 64→10 layer 0.08
        against 0.13 ms, one thread), element-wise operations do not care, and layers that
        need features last (normalisations, softmax) get a transposed view. With
        ``classes_first`` a features-first output ``(k, classes, examples)`` is returned as it
        is; the flag returned says whether it was. Otherwise the output has the model's layout.
        """
        first = self.bound.first_layer[0] if self.bound.first_layer is not None else None
        env: dict[Any, tuple[Any, bool, bool]] = {}  # node -> (value, has a point axis, features first)

        def arg(a: Any) -> Any:
            return env[a][0] if isinstance(a, torch.fx.Node) else a

        out: Any = None
        fm_out = False
        ones: set[Any] = set()  # nodes whose (features-first) value ends with a ones row
        for node in self.nodes:
            if node.op == "placeholder":
                env[node] = (x, False, False)
                continue
            if node.op == "output":
                out, stacked, fm_out = env[node.args[0]]
                if not stacked:
                    raise Unsupported("the output does not depend on the parameters")
                break
            src = node.args[0] if node.args and isinstance(node.args[0], torch.fx.Node) else None
            h, stacked, fm = env[src] if src is not None else (None, False, False)
            h_ones = src in ones
            sole = src in self._sole  # (may an activation overwrite h?)
            planned = node in self._chain or (node.op == "call_module" and str(node.target) in self._aug_in)
            if h_ones and not planned:
                h = h[:, :-1]  # (not as planned: the row goes before any other use)
                env[src], h_ones = (h, stacked, fm), False
                ones.discard(src)
            if is_shape_query(node) or not stacked and node.op != "call_module":
                # point-independent (reshapes of the input, shape queries): computed as written
                env[node] = (_run(node, self.modules, arg), False, False)
                continue
            if node.op == "call_module":
                target = str(node.target)
                m = self.modules[target]
                moves = any(f"{target}.{a}" in self.moving for a in ("weight", "bias"))
                if target != first and not stacked and not moves:
                    env[node] = (_run(node, self.modules, arg), False, False)  # point-independent
                elif target == first:
                    value, fm = self._first_layer(x, c)
                    env[node] = (value, True, fm)
                    if fm and self._aug_first:
                        ones.add(node)
                elif isinstance(m, nn.Linear):
                    value, fm, ones_out = self._linear(target, m, h, stacked, fm, c, ones=h_ones and fm)
                    env[node] = (value, True, fm)
                    if ones_out:
                        ones.add(node)
                elif isinstance(m, _PASS_MODULES) or (fm and isinstance(m, _ELEMENTWISE_MODULES)):
                    env[node] = (h if isinstance(m, _PASS_MODULES) else self._activation(m, h, sole), True, fm)
                    if h_ones:
                        ones.add(node)
                else:
                    h = h.transpose(1, 2) if fm else h  # features last from here
                    if isinstance(m, (nn.BatchNorm1d, nn.LayerNorm)):
                        if not stacked:
                            h = h.unsqueeze(0).expand(c.shape[0], *h.shape)
                        env[node] = (self._norm(target, m, h, c), True, False)
                    elif isinstance(m, _RESHAPE_MODULES):
                        raise Unsupported("a reshape after the first moving layer")
                    elif isinstance(m, _AXIS_MODULES):
                        fn = F.softmax if isinstance(m, nn.Softmax) else F.log_softmax
                        env[node] = (fn(h, dim=_point_axis(m.dim)), True, False)
                    else:
                        env[node] = (self._activation(m, h, sole), True, False)
                continue
            if node.target in _AXIS_FUNCTIONS or node.target in _AXIS_METHODS:
                dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
                fn = F.softmax if node.target in (F.softmax, torch.softmax, "softmax") else F.log_softmax
                if isinstance(dim, torch.fx.Node) or node.kwargs.get("dtype") is not None or len(node.args) > 2:
                    raise Unsupported("a softmax with arguments other than its axis")
                env[node] = (fn(h.transpose(1, 2) if fm else h, dim=_point_axis(dim)), True, False)
                continue
            if node.target in _RESHAPE_METHODS or node.target in _RESHAPE_FUNCTIONS:
                raise Unsupported("a reshape after the first moving layer")
            extra = [a for a in [*node.args[1:], *node.kwargs.values()] if isinstance(a, torch.fx.Node)]
            if extra:
                raise Unsupported("an element-wise operation with a second tensor")
            if h_ones:
                ones.add(node)  # (a chain node: an activation that maps 1 to 1)
            if node.target in _RELU_CALLS and len(node.args) == 1 and not node.kwargs and sole and self._owned(h):
                env[node] = (torch.relu_(h), True, fm)  # (fresh activations: no copy)
                continue
            env[node] = (_run(node, self.modules, arg), True, fm)  # element-wise: any layout
        if self.measuring:
            self.point_bytes = max(self.point_bytes, out.numel() * out.element_size() // c.shape[0],
                                   *(v.numel() * v.element_size() // c.shape[0]
                                     for v, s, _ in env.values() if s and isinstance(v, torch.Tensor)))
        if fm_out and not classes_first:
            return out.transpose(1, 2), False
        return out, fm_out

    def losses(self, x: torch.Tensor, y: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """The loss at each of the ``k`` points of ``c`` on batch ``(x, y)``: ``(k,)``."""
        fused = self.loss_fn is default_loss and y.ndim == 1 and not y.is_floating_point()
        self._reuse = True  # (the buffers' values are spent before this returns)
        try:
            z, transposed = self.forward(x, c, classes_first=fused)
            if fused and (transposed or z.ndim == 3):
                # (k, classes, examples): log-softmax along classes, 27 µs for 8×10×512 logits
                # against 65 µs for logsumexp there and 132 µs along a last axis of 10 (one thread)
                zt = z if transposed else z.transpose(1, 2).contiguous()
                logp = torch.log_softmax(zt, 1, out=self._out("log_softmax", tuple(zt.shape), zt))
                return -logp.gather(1, y.view(1, 1, -1).expand(zt.shape[0], 1, -1)).squeeze(1).mean(1)
            return torch.stack([torch.as_tensor(self.loss_fn(logits_of(z[i]), y)) for i in range(z.shape[0])])
        finally:
            self._reuse = False

    @property
    def points_per_pass(self) -> int:
        """Points stacked per pass so that no stacked activation or parameter exceeds
        :data:`STACK_BYTES` (from the largest per point, the activations measured by
        :func:`build_stacked`'s first pass)."""
        return int(max(1, min(MAX_POINTS, STACK_BYTES // max(self.point_bytes, 1))))

    def __call__(self, c: torch.Tensor, data: Batches) -> torch.Tensor:
        """Losses at the rows of ``c`` (weighted over ``data``'s batches), ``(len(c),)``."""
        total = torch.zeros(c.shape[0], dtype=torch.float64)
        for (xb, yb), w in zip(data.batches, data.weights, strict=True):
            k = self.points_per_pass
            parts = [self.losses(xb, yb, c[s:s + k]) for s in range(0, c.shape[0], k)]
            total += w * torch.cat(parts).double()
        return total


def _point_axis(dim: Any) -> int:
    """The axis of a stacked activation for axis ``dim`` of the model's own (one more in
    front, so non-negative axes move by one)."""
    if not isinstance(dim, int):
        raise Unsupported("a softmax without an explicit axis")
    return dim + 1 if dim >= 0 else dim


def _run(node: Any, modules: dict[str, nn.Module], arg: Callable[[Any], Any]) -> Any:
    """Run one fx node as written, its arguments looked up by ``arg``."""
    args = tuple(arg(a) if not isinstance(a, (tuple, list)) else type(a)(arg(b) for b in a) for a in node.args)
    kwargs = {k: arg(v) for k, v in node.kwargs.items()}
    if node.op == "call_module":
        return modules[str(node.target)](*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    return node.target(*args, **kwargs)


def fully_connected(model: nn.Module) -> bool:
    """Whether every leaf module of ``model`` is one :class:`Stacked` evaluates (linear layers,
    element-wise activations, normalisations over features, flattens, softmax), with at least
    one linear layer: the grid of such a model skips :mod:`~nndiag.landscape.fold`'s rewrite."""
    ok = (nn.Linear, nn.BatchNorm1d, nn.LayerNorm, *_ELEMENTWISE_MODULES, *_PASS_MODULES, *_RESHAPE_MODULES,
          *_AXIS_MODULES)
    leaves = [m for m in model.modules() if next(m.children(), None) is None]
    return any(isinstance(m, nn.Linear) for m in leaves) and all(isinstance(m, ok) for m in leaves)


def build_stacked(bound: BoundCopy, loss_fn: LossFn, batches: Batches) -> tuple[Stacked, float] | None:
    """A :class:`Stacked` evaluator for ``bound`` and its loss at the origin, or None when the
    graph is not supported.

    The pass at the origin checks the graph end to end (the caller compares its loss with the
    model's) and measures the largest activation per point, which sets how many points a pass
    stacks.
    """
    try:
        graph = bound.graph
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            return None
        stacked = Stacked(bound, graph, loss_fn)
        zero = next(iter(bound.base_views.values())).new_zeros(1, stacked.dim)
        with torch.inference_mode():
            origin = float(stacked(zero, batches)[0])
        stacked.measuring = False
    except Exception:  # noqa: BLE001 - Unsupported, or any error of fx tracing or of the trial pass
        return None
    return stacked, origin
