"""Hessian quadratic forms ``zᵀHz`` by second-order forward (Taylor-mode) propagation.

Hutchinson's trace estimate needs only the numbers ``zᵀHz``, not the vectors ``Hz``.
``zᵀHz`` is the second derivative of ``t ↦ L(θ + t z)`` at ``t = 0``, so it can be
carried *forward* through the network: every intermediate value ``a(t)`` is represented
by its first and second derivatives ``ȧ`` and ``ä`` along ``z``, and each operation maps
them with its own first and second derivatives. For a convolution or linear map
``y = W ∗ x + b`` (bilinear in ``W`` and ``x``)

.. math::

    ẏ = W ∗ ẋ + Ż ∗ x + ż_b, \\qquad ÿ = W ∗ ẍ + 2\\,Ż ∗ ẋ,

for a ReLU ``ẏ = 1[x>0]·ẋ, ÿ = 1[x>0]·ẍ``, for a smooth activation ``ÿ = f'(x)·ẍ +
f''(x)·ẋ²``, for an eval-mode BatchNorm (an affine map per channel, bilinear in the
normalised input and ``γ``) likewise, and linear reshaping operations (views, slices,
padding, sums, average pooling, max-pooling at the chosen indices) map both derivatives
as they map the value. At the loss, ``zᵀHz = ⟨∇ℓ, z̈⟩ + żᵀ ∇²ℓ ż`` on the logits (a
Hessian-vector product of the loss with respect to a few logits only).

Per probe this costs four convolution passes (``W ∗ [ẋ, ẍ]`` in one call, ``Ż ∗ x`` for
all probes in one call with stacked output channels, ``Ż ∗ ẋ`` per probe) where the
cached double-backward Hessian-vector product costs about six (it also forms the full
vector ``Hz``), and the forward primal pass is done once and kept — only what the rules
read of it: values where a rule reads them, signs where only a ReLU does, shapes elsewhere
(:meth:`QuadraticForms._retention`; ResNet20, 256 images: 651 → 415 MiB). On ResNet20 (128 CIFAR
images, 2 CPU threads) see ``docs/BENCHMARKS.md``.

The graph comes from ``torch.fx`` (a trace of the model, which is not modified); only
the operations listed in this module are supported. :class:`QuadraticForms` raises
:class:`Unsupported` at construction for anything else (training-mode BatchNorm, dropout
in train mode, attention, normalisations over features, tuple outputs, …); a few uses of
supported operations are only found unsupported when the first probe reaches them
(``F.linear``/functional convolutions whose weight is a parameter, a product or division
of two parameter-dependent tensors outside the rules here), and :meth:`QuadraticForms.parts`
raises :class:`Unsupported` then. Callers use Hessian-vector products instead in both cases.
The primal pass runs at the first probe, not at construction.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nndiag.landscape._setup import Batches, LossFn, cpu_cross_entropy, default_loss

__all__ = ["QuadraticForms", "Unsupported"]


class Unsupported(Exception):
    """The model contains an operation that :class:`QuadraticForms` cannot propagate."""


_CONVS = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}
_BNS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_RELU_FUNCS = (torch.relu, F.relu)
#: Operations linear in all their tensor arguments together (a constant operand contributes
#: nothing to the derivatives, so it is replaced by zeros; numbers by 0).
_JOINT = (operator.add, operator.sub, torch.add, torch.sub, torch.cat, torch.concat, torch.stack)
#: Operations linear in their (single) varying tensor argument, other arguments fixed.
_LINEAR_FUNCS = (
    operator.neg, torch.neg, operator.getitem, torch.flatten, torch.reshape, torch.transpose,
    torch.permute, torch.squeeze, torch.unsqueeze, torch.mean, torch.sum, F.pad, F.avg_pool1d,
    F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d, torch.movedim,
)
_LINEAR_METHODS = {
    "view", "reshape", "flatten", "permute", "transpose", "contiguous", "squeeze", "unsqueeze",
    "mean", "sum", "expand", "movedim", "unflatten", "clone", "neg",
}
_SHAPE_METHODS = {"size", "dim", "numel"}
_LINEAR_MODULES = (
    nn.Flatten, nn.Unflatten, nn.Identity, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.ZeroPad2d,
)


def _derivs(kind: str, x: torch.Tensor, slope: float = 0.01) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``f'(x)`` and ``f''(x)`` (None where it is zero) of an elementwise activation
    (``slope``: LeakyReLU's negative slope)."""
    if kind == "leaky_relu":
        return torch.where(x > 0, torch.ones_like(x), torch.full_like(x, slope)), None
    if kind == "tanh":
        t = torch.tanh(x)
        d1 = 1 - t * t
        return d1, -2 * t * d1
    if kind == "sigmoid":
        s = torch.sigmoid(x)
        d1 = s * (1 - s)
        return d1, d1 * (1 - 2 * s)
    if kind == "silu":
        s = torch.sigmoid(x)
        d1 = s * (1 + x * (1 - s))
        return d1, s * (1 - s) * (2 + x * (1 - 2 * s))
    if kind == "gelu":
        phi = torch.exp(-0.5 * x * x) * 0.3989422804014327
        cdf = 0.5 * (1 + torch.erf(x * 0.7071067811865476))
        return cdf + x * phi, (2 - x * x) * phi
    raise Unsupported(kind)


_ACT_MODULES: dict[type, str] = {
    nn.LeakyReLU: "leaky_relu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.SiLU: "silu", nn.GELU: "gelu",
}
_ACT_FUNCS: dict[Any, str] = {
    torch.tanh: "tanh", torch.sigmoid: "sigmoid", F.silu: "silu", F.gelu: "gelu", F.leaky_relu: "leaky_relu",
    F.sigmoid: "sigmoid", F.tanh: "tanh",
}
_ACT_METHODS = {"tanh": "tanh", "sigmoid": "sigmoid"}


def _in_place(fn: Any, args: Any, kwargs: dict[str, Any]) -> bool:
    """Whether a call of an activation/dropout function writes into its input."""
    if kwargs.get("inplace") is True:
        return True
    position = {F.relu: 1, F.silu: 1, F.leaky_relu: 2, F.dropout: 3}.get(fn)
    return position is not None and len(args) > position and args[position] is True


def _dropout_active(node: Any) -> bool:
    """Whether an ``F.dropout`` call node drops anything (``training`` true and ``p > 0``)."""
    names = ("input", "p", "training", "inplace")
    given = dict(zip(names, node.args, strict=False)) | dict(node.kwargs)
    return bool(given.get("training", True)) and given.get("p", 0.5) != 0


def _is_node(a: object) -> bool:
    return hasattr(a, "op") and hasattr(a, "users")


def _nodes_in(args: Any) -> list[Any]:
    out: list[Any] = []

    def visit(a: Any) -> None:
        if _is_node(a):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            for b in a:
                visit(b)
        elif isinstance(a, dict):
            for b in a.values():
                visit(b)

    visit(args)
    return out


def _subst(args: Any, fn: Callable[[Any], Any]) -> Any:
    if _is_node(args):
        return fn(args)
    if isinstance(args, (list, tuple)):
        return type(args)(_subst(a, fn) for a in args)
    if isinstance(args, dict):
        return {k: _subst(v, fn) for k, v in args.items()}
    return args


class QuadraticForms:
    """``zᵀ H z`` for a block of probe vectors, by second-order forward propagation.

    Parameters
    ----------
    model : nn.Module
        The model, already in eval mode (it is traced, never modified).
    params : dict of str to Tensor
        The trainable parameters (the Hessian's coordinates), in the order of the flat
        probe vectors.
    buffers : dict of str to Tensor
        Buffers and frozen parameters.
    data : Batches
        The batches and their weights; the loss is ``Σ_b w_b · loss(model(x_b), y_b)``.
    loss_fn : callable
        ``loss(logits, y) -> scalar``; must work under ``torch.func`` transforms.

    Raises
    ------
    Unsupported
        When the traced graph contains an operation this module does not propagate.
    """

    def __init__(self, model: nn.Module, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor],
                 data: Batches, loss_fn: LossFn) -> None:
        import torch.fx

        if model.training:
            raise Unsupported("train mode")
        try:
            self.gm = torch.fx.symbolic_trace(model)
        except Exception as e:  # noqa: BLE001 - any tracing failure: fx cannot handle this model
            raise Unsupported(f"torch.fx cannot trace the model ({type(e).__name__})") from e
        self.modules = dict(self.gm.named_modules())
        self.names = list(params)
        self.shapes = [tuple(p.shape) for p in params.values()]
        self.sizes = [p.numel() for p in params.values()]
        self.params = {k: p.detach() for k, p in params.items()}
        self.buffers = buffers
        self.data, self.loss_fn = data, loss_fn
        self.nodes = list(self.gm.graph.nodes)
        self._orders = 2
        self._validate()
        self.varying = self._varying()  # the nodes that depend on a trainable parameter
        self.residual_vanishes = self._piecewise_linear()
        self.last_use = {}
        for i, node in enumerate(self.nodes):
            for a in _nodes_in((node.args, node.kwargs)):
                self.last_use[a] = i
        self.retention = self._retention()
        self._primals: list[Any] | None = None

    @property
    def primals(self) -> list[Any]:
        """The primal pass of every batch, computed at the first use and kept (the
        activations the probes need; computed lazily so that a caller can free other
        memory between validating the graph and the first probe)."""
        if self._primals is None:
            self._primals = [self._primal(xb) for xb, _ in self.data.batches]
        return self._primals

    # --- graph checks ---------------------------------------------------------------
    def _tensor_attr(self, name: str) -> torch.Tensor | None:
        if name in self.params:
            return self.params[name]
        return self.buffers.get(name)

    def _validate(self) -> None:
        outputs = [n for n in self.nodes if n.op == "output"]
        if len(outputs) != 1 or not _is_node(outputs[0].args[0]):
            raise Unsupported("the model's output is not a single tensor")
        for node in self.nodes:
            if node.op == "call_module":
                m = self.modules[node.target]
                if isinstance(m, _BNS):
                    if m.training or m.running_mean is None:
                        raise Unsupported(f"BatchNorm '{node.target}' without running statistics or in train mode")
                    continue
                if isinstance(m, nn.modules.dropout._DropoutNd):
                    if m.training:
                        raise Unsupported(f"dropout '{node.target}' in train mode")
                    continue
                for pname, _ in m.named_parameters(recurse=False):
                    if self._tensor_attr(f"{node.target}.{pname}") is None:
                        raise Unsupported(f"parameter '{node.target}.{pname}' shared with another module")
                if type(m) in _CONVS:
                    if m.padding_mode != "zeros":
                        raise Unsupported(f"convolution '{node.target}' with padding_mode={m.padding_mode!r}")
                    continue
                if type(m) is nn.Embedding:
                    if m.max_norm is not None:
                        raise Unsupported(f"embedding '{node.target}' with max_norm (renormalises its weights)")
                    continue
                if type(m) in (nn.Linear, nn.ReLU, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d) or type(m) in _ACT_MODULES:
                    continue
                if isinstance(m, _LINEAR_MODULES):
                    continue
                raise Unsupported(f"module '{node.target}' ({type(m).__name__})")
            elif node.op == "call_function":
                t = node.target
                known = (t in _JOINT or t in _LINEAR_FUNCS or t in _RELU_FUNCS or t in _ACT_FUNCS
                         or t in (operator.mul, torch.mul, operator.truediv, torch.div, F.linear, F.dropout,
                                  F.max_pool1d, F.max_pool2d, F.max_pool3d, getattr)
                         or t in _CONVS.values())
                if not known:
                    raise Unsupported(f"function '{getattr(t, '__name__', t)}'")
                if t is F.dropout and _dropout_active(node):
                    raise Unsupported("F.dropout with training=True (random masks)")
            elif node.op == "call_method":
                if node.target not in _LINEAR_METHODS | _SHAPE_METHODS | {"relu", "mul", "div"} | set(_ACT_METHODS):
                    raise Unsupported(f"method '{node.target}'")
            elif node.op == "get_attr":
                if self._tensor_attr(str(node.target)) is None:
                    raise Unsupported(f"attribute '{node.target}'")

    def _piecewise_linear(self) -> bool:
        """Whether every output is affine in each single trainable parameter (the others fixed).

        Then ``∂²f/∂θ_i² = 0`` for every coordinate (ReLU's and max-pooling's second
        derivatives are zero wherever they exist, as in autograd), so the residual part
        ``R = Σ ∂ℓ/∂f · ∇²f`` has zero diagonal and ``tr H = tr G`` exactly. True when each
        parameter is used by one operation, no smooth activation acts on a
        parameter-dependent value and no product multiplies two of them.
        """
        varying = self.varying
        uses: dict[str, int] = {}
        for node in self.nodes:
            ins = [a for a in _nodes_in((node.args, node.kwargs)) if a in varying]
            if node.op == "get_attr":
                if node in varying:
                    uses[str(node.target)] = uses.get(str(node.target), 0) + len(node.users)
                continue
            if node.op == "call_module":
                m = self.modules[node.target]
                if any(f"{node.target}.{n}" in self.params for n, _ in m.named_parameters(recurse=False)):
                    uses[node.target] = uses.get(node.target, 0) + 1
                kind = _ACT_MODULES.get(type(m))
            elif node.op == "call_function":
                kind = _ACT_FUNCS.get(node.target)
            elif node.op == "call_method":
                kind = _ACT_METHODS.get(node.target)
            else:
                kind = None
            if ins and kind not in (None, "leaky_relu"):
                return False
            if len(ins) > 1 and (node.target in (operator.mul, torch.mul, operator.truediv, torch.div)
                                 or (node.op == "call_method" and node.target in ("mul", "div"))):
                return False
        return all(n == 1 for n in uses.values())

    # --- primal pass (once) -----------------------------------------------------------
    def _varying(self) -> set[Any]:
        """Nodes whose value depends on a trainable parameter (they get derivatives)."""
        varying: set[Any] = set()
        for node in self.nodes:
            if node.op == "get_attr" and str(node.target) in self.params:
                varying.add(node)
            elif node.op == "call_module" and any(
                    f"{node.target}.{n}" in self.params
                    for n, _ in self.modules[node.target].named_parameters(recurse=False)):
                varying.add(node)
            elif any(a in varying for a in _nodes_in((node.args, node.kwargs))):
                varying.add(node)
        return varying

    def _use(self, user: Any, node: Any, varying: set[Any]) -> str:
        """What the tangent rule of ``user`` reads of ``node``'s primal value: ``value``,
        ``mask`` (its sign: ReLU) or ``none`` (only its derivative)."""
        op, t = user.op, user.target
        if op == "output":
            return "value"
        if op == "call_module":
            m = self.modules[t]
            if type(m) is nn.ReLU:
                return "mask"
            if isinstance(m, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.modules.dropout._DropoutNd)):
                return "none"  # (max-pooling reads its own indices)
            return "value"  # convolutions, linear layers, BatchNorm, activations, embeddings
        if op == "call_method" and t == "relu" or op == "call_function" and t in _RELU_FUNCS:
            return "mask"
        if op == "call_function" and t in (F.max_pool1d, F.max_pool2d, F.max_pool3d, F.dropout):
            return "none"
        if op == "call_function" and t in (operator.mul, torch.mul, operator.truediv, torch.div) or (
                op == "call_method" and t in ("mul", "div")) or t in _ACT_FUNCS or t in _ACT_METHODS:
            return "value"
        if op == "call_method" and t in _SHAPE_METHODS or op == "call_function" and t is getattr:
            return "none"  # computed in the primal pass already
        # linear operations: constant operands are read, varying ones only through derivatives
        return "none" if node in varying else "value"

    def _retention(self) -> dict[Any, str]:
        """Per node, what the probes need of its primal value: ``value``, ``mask`` (a boolean
        sign suffices) or ``shape`` (nothing but its shape: kept as a ``meta`` tensor).

        On ResNet20 the primal pass held 651 MiB for 256 CIFAR images; keeping BatchNorm and
        residual-sum outputs as masks (they only feed ReLUs) and padded shortcuts as shapes
        leaves about two thirds of that.
        """
        varying = self.varying
        out = {}
        for node in self.nodes:
            uses = {self._use(u, node, varying) for u in node.users}
            out[node] = "value" if "value" in uses else ("mask" if "mask" in uses else "shape")
        return out

    def _primal(self, x: torch.Tensor) -> dict[Any, Any]:
        env: dict[Any, Any] = {}
        with torch.no_grad():
            for node in self.nodes:
                if node.op == "placeholder":  # the data; further inputs take their defaults
                    env[node] = x if node is self.nodes[0] else (node.args[0] if node.args else None)
                elif node.op == "output":
                    env[node] = env[node.args[0]]
                else:
                    val = self._forward(node, env)
                    if self._is_maxpool(node):
                        val, env[(node, "indices")] = val
                    env[node] = val
        for node, keep in self.retention.items():  # only what the tangent rules read
            v = env.get(node)
            if isinstance(v, torch.Tensor) and keep != "value":
                env[node] = (v > 0) if keep == "mask" else torch.empty(v.shape, dtype=v.dtype, device="meta")
        return env

    def _is_maxpool(self, node: Any) -> bool:
        if node.op == "call_module":
            return isinstance(self.modules[node.target], (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d))
        return node.op == "call_function" and node.target in (F.max_pool1d, F.max_pool2d, F.max_pool3d)

    def _forward(self, node: Any, env: dict[Any, Any]) -> Any:
        args = _subst(node.args, lambda n: env[n])
        kwargs = _subst(node.kwargs, lambda n: env[n])
        if node.op == "get_attr":
            return self._tensor_attr(str(node.target))
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        if node.op == "call_function":
            t = node.target
            if t in (F.max_pool1d, F.max_pool2d, F.max_pool3d):
                return t(*args, **{**kwargs, "return_indices": True})
            if _in_place(t, args, kwargs):  # keep the input's primal value: its rule needs it
                args = (args[0].clone(),) + tuple(args[1:])
            return t(*args, **kwargs)
        m = self.modules[node.target]
        if getattr(m, "inplace", False) is True:
            args = (args[0].clone(),) + tuple(args[1:])
        if type(m) in _CONVS:
            w, b = self._tensor_attr(f"{node.target}.weight"), self._tensor_attr(f"{node.target}.bias")
            return m._conv_forward(args[0], w, b)
        if type(m) is nn.Linear:
            return F.linear(args[0], self._tensor_attr(f"{node.target}.weight"),
                            self._tensor_attr(f"{node.target}.bias"))
        if type(m) is nn.Embedding:
            return F.embedding(args[0], self._tensor_attr(f"{node.target}.weight"), m.padding_idx)
        if isinstance(m, _BNS):
            return self._bn_primal(node.target, m, args[0])[0]
        if isinstance(m, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)):
            fn = {nn.MaxPool1d: F.max_pool1d, nn.MaxPool2d: F.max_pool2d, nn.MaxPool3d: F.max_pool3d}[type(m)]
            return fn(args[0], m.kernel_size, m.stride, m.padding, m.dilation, ceil_mode=m.ceil_mode,
                      return_indices=True)
        if isinstance(m, nn.modules.dropout._DropoutNd):
            return args[0]
        return m(*args, **kwargs)

    def _bn_primal(self, name: str, m: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mean, var = self.buffers[f"{name}.running_mean"], self.buffers[f"{name}.running_var"]
        shape = (1, -1) + (1,) * (x.ndim - 2)
        r = torch.rsqrt(var + m.eps)
        xhat = (x - mean.reshape(shape)) * r.reshape(shape)
        gamma, beta = self._tensor_attr(f"{name}.weight"), self._tensor_attr(f"{name}.bias")
        y = xhat * gamma.reshape(shape) if gamma is not None else xhat
        if beta is not None:
            y = y + beta.reshape(shape)
        return y, xhat, r

    # --- tangent pass -----------------------------------------------------------------
    def _split(self, Z: torch.Tensor) -> dict[str, torch.Tensor]:
        k = Z.shape[0]
        chunks = Z.split(self.sizes, dim=1)
        return {n: c.reshape((k,) + s) for n, c, s in zip(self.names, chunks, self.shapes, strict=True)}

    def __call__(self, Z: torch.Tensor) -> torch.Tensor:
        """``[z_kᵀ H z_k for k]`` for the rows of ``Z`` (shape ``(K, dim)``), float64."""
        residual, gauss_newton = self.parts(Z)
        return residual + gauss_newton

    def parts(self, Z: torch.Tensor, second_order: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """The two parts of ``z_kᵀ H z_k``: the residual ``⟨∇ℓ, z̈_k⟩`` and the Gauss–Newton
        ``ż_kᵀ ∇²ℓ ż_k`` (derivatives on the logits), float64 each.

        With ``second_order=False`` only first derivatives are carried (about half the
        work) and the residual part is returned as zeros: for when it is known to vanish
        in expectation (:attr:`residual_vanishes`) and only its trace matters.
        """
        self._orders = 2 if second_order else 1
        dev = next(iter(self.params.values())).device
        Z = Z.to(dtype=next(iter(self.params.values())).dtype, device=dev)
        dirs = self._split(Z)
        k = Z.shape[0]
        res = torch.zeros(k, dtype=torch.float64, device=dev)
        gn = torch.zeros(k, dtype=torch.float64, device=dev)
        with torch.no_grad():
            for primal, (_, yb), w in zip(self.primals, self.data.batches, self.data.weights, strict=True):
                r, g = self._batch(primal, yb, w, dirs, k)
                res += r.to(torch.float64)
                gn += g.to(torch.float64)
        return res, gn

    def _batch(self, P: dict[Any, Any], y: torch.Tensor, w: float, dirs: dict[str, torch.Tensor],
               k: int) -> tuple[torch.Tensor, torch.Tensor]:
        T: dict[Any, torch.Tensor | None] = {}
        out = None
        for i, node in enumerate(self.nodes):
            if node.op == "placeholder":
                T[node] = None
            elif node.op == "output":
                out = node.args[0]
                break
            else:
                T[node] = self._tangent(node, P, T, dirs, k)
            for a in _nodes_in((node.args, node.kwargs)):
                if self.last_use.get(a) == i and a is not out:
                    T.pop(a, None)
        logits, t = P[out], T.get(out)
        if t is None:
            zero = torch.zeros(k, device=logits.device)
            return zero, zero
        return self._loss_forms(logits, t, y, w, k)

    def _loss_forms(self, z: torch.Tensor, t: torch.Tensor, y: torch.Tensor, w: float,
                    k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(⟨∇ℓ, z̈⟩, żᵀ∇²ℓ ż)`` per probe on the logits ``z`` (the first zero when only
        first derivatives were carried)."""
        from torch.func import grad, jvp, vmap

        d = t[:k]
        ce = self.loss_fn in (default_loss, cpu_cross_entropy) and z.ndim == 2 and y.ndim == 1
        if ce:  # mean cross-entropy: ∇ = (p − onehot)·w/N, ∇²d = (p⊙d − p (pᵀd))·w/N per row
            p = z.softmax(dim=1)
            hz = (p * d - p * (p * d).sum(-1, keepdim=True)) * (w / len(y))
        else:
            def lossf(v: torch.Tensor) -> torch.Tensor:
                return self.loss_fn(v, y) * w

            hz = vmap(lambda v: jvp(grad(lossf), (z,), (v,))[1])(d)
        gauss_newton = (d * hz).flatten(1).sum(1)
        if self._orders == 1:
            return torch.zeros_like(gauss_newton), gauss_newton
        if ce:
            g = p.clone()
            g[torch.arange(len(y), device=y.device), y] -= 1
            g *= w / len(y)
        else:
            g = grad(lossf)(z)
        return (t[k:] * g).flatten(1).sum(1), gauss_newton

    def _tangent(self, node: Any, P: dict[Any, Any], T: dict[Any, Any], dirs: dict[str, torch.Tensor],
                 k: int) -> torch.Tensor | None:
        op = node.op
        if op == "get_attr":
            d = dirs.get(str(node.target))
            return None if d is None else (torch.cat([d, torch.zeros_like(d)]) if self._orders == 2 else d)
        if (op == "call_method" and node.target in _SHAPE_METHODS) or (
                op == "call_function" and node.target is getattr):
            return None
        varying = [a for a in _nodes_in((node.args, node.kwargs)) if T.get(a) is not None]
        if op == "call_module":
            m = self.modules[node.target]
            if type(m) in _CONVS or type(m) is nn.Linear:
                return self._affine(m, node, P, T, dirs, k)
            if isinstance(m, _BNS):
                return self._bn(node, m, P, T, dirs, k)
            if type(m) is nn.Embedding:  # rows picked by fixed ids: linear in the weights
                zw = dirs.get(f"{node.target}.weight")
                if zw is None:
                    return None
                if m.padding_idx is not None:  # autograd gives the padding row no gradient
                    zw = zw.clone()
                    zw[:, m.padding_idx] = 0
                rows = zw[:, P[node.args[0]]]
                return rows if self._orders == 1 else torch.cat([rows, torch.zeros_like(rows)])
        if not varying:
            return None
        if op == "call_module":
            m = self.modules[node.target]
            a = node.args[0]
            if type(m) is nn.ReLU:
                return T[a] * (P[a] > 0)
            if type(m) in _ACT_MODULES:
                return self._act(_ACT_MODULES[type(m)], P[a], T[a], k, getattr(m, "negative_slope", 0.01))
            if isinstance(m, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)):
                return self._gather(T[a], P[(node, "indices")])
            if isinstance(m, nn.modules.dropout._DropoutNd):
                return T[a]
            return self._linear(lambda t: m(t), T[a])
        t = node.target
        if op == "call_method":
            if t == "relu":
                return T[node.args[0]] * (P[node.args[0]] > 0)
            if t in _ACT_METHODS:
                return self._act(_ACT_METHODS[t], P[node.args[0]], T[node.args[0]], k)
            if t in ("mul", "div"):
                return self._product(operator.mul if t == "mul" else operator.truediv, node, P, T, k)
            return self._generic(lambda *a, **kw: getattr(a[0], t)(*a[1:], **kw), node, P, T, joint=False)
        if t in _RELU_FUNCS:
            a = node.args[0]
            return T[a] * (P[a] > 0)
        if t in _ACT_FUNCS:
            slope = node.kwargs.get("negative_slope", node.args[1] if len(node.args) > 1 else 0.01)
            return self._act(_ACT_FUNCS[t], P[node.args[0]], T[node.args[0]], k, slope)
        if t in (F.max_pool1d, F.max_pool2d, F.max_pool3d):
            return self._gather(T[node.args[0]], P[(node, "indices")])
        if t is F.dropout:
            return T[node.args[0]]
        if t in (operator.mul, torch.mul, operator.truediv, torch.div):
            return self._product(t, node, P, T, k)
        if t is F.linear or t in _CONVS.values():
            raise Unsupported(f"functional {t.__name__} with varying operands")
        return self._generic(t, node, P, T, joint=t in _JOINT)

    # --- rules ------------------------------------------------------------------------
    @staticmethod
    def _linear(fn: Callable[[torch.Tensor], torch.Tensor], t: torch.Tensor) -> torch.Tensor:
        from torch.func import vmap

        return vmap(fn)(t)

    def _generic(self, fn: Callable[..., Any], node: Any, P: dict[Any, Any], T: dict[Any, Any], joint: bool) -> Any:
        """A linear operation applied to the derivatives (constants kept, or zeroed if ``joint``)."""
        from torch.func import vmap

        var = [a for a in _nodes_in((node.args, node.kwargs)) if T.get(a) is not None]
        if not joint and len(var) > 1:
            raise Unsupported(f"'{getattr(fn, '__name__', fn)}' with several varying operands")

        def const(n: Any) -> Any:
            v = P[n]
            return torch.zeros_like(v) if joint and isinstance(v, torch.Tensor) else v

        def call(*ts: torch.Tensor) -> Any:
            lookup = dict(zip(var, ts, strict=True))
            args = _subst(node.args, lambda n: lookup[n] if n in lookup else const(n))
            kwargs = _subst(node.kwargs, lambda n: lookup[n] if n in lookup else const(n))
            if joint:
                args = tuple(0 if isinstance(a, (int, float)) and not isinstance(a, bool) else a for a in args)
            if fn is F.pad:  # the derivative of a padded value is padded with zeros (any mode copies)
                mode = kwargs.get("mode", args[2] if len(args) > 2 else "constant")
                args, kwargs = args[:2], {"mode": mode}
                if mode == "constant":
                    kwargs["value"] = 0.0
            return fn(*args, **kwargs)

        out = vmap(call)(*[T[a] for a in var])
        if not isinstance(out, torch.Tensor):
            raise Unsupported(f"'{getattr(fn, '__name__', fn)}' returning {type(out).__name__}")
        return out

    @staticmethod
    def _gather(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        n, c = idx.shape[:2]
        src = t.reshape(t.shape[0], n, c, -1)
        ix = idx.reshape(1, n, c, -1).expand(t.shape[0], -1, -1, -1)
        return src.gather(3, ix).reshape((t.shape[0],) + tuple(idx.shape))

    @staticmethod
    def _act(kind: str, x: torch.Tensor, t: torch.Tensor, k: int, slope: float = 0.01) -> torch.Tensor:
        d1, d2 = _derivs(kind, x, slope)
        out = t * d1
        if d2 is not None:
            if len(out) > k:
                out[k:] += d2 * t[:k] * t[:k]
        return out

    def _product(self, fn: Any, node: Any, P: dict[Any, Any], T: dict[Any, Any], k: int) -> torch.Tensor:
        a, b = node.args[0], node.args[1]
        ta = T.get(a) if _is_node(a) else None
        tb = T.get(b) if _is_node(b) else None
        pa = P[a] if _is_node(a) else a
        pb = P[b] if _is_node(b) else b
        if tb is None:
            return fn(ta, pb)
        if fn in (operator.truediv, torch.div):
            raise Unsupported("division by a varying tensor")
        if ta is None:
            return pa * tb
        out = ta * pb + pa * tb
        if len(out) > k:
            out[k:] += 2 * ta[:k] * tb[:k]
        return out

    def _affine(self, m: nn.Module, node: Any, P: dict[Any, Any], T: dict[Any, Any], dirs: dict[str, torch.Tensor],
                k: int) -> torch.Tensor | None:
        """Convolution or linear layer: ``ẏ = W∗ẋ + Ż∗x + ż_b``, ``ÿ = W∗ẍ + 2 Ż∗ẋ``."""
        a = node.args[0]
        ta, x = T.get(a), P[a]
        zw, zb = dirs.get(f"{node.target}.weight"), dirs.get(f"{node.target}.bias")
        if ta is None and zw is None and zb is None:
            return None
        w = self._tensor_attr(f"{node.target}.weight")
        conv = type(m) in _CONVS
        out_shape = tuple(P[node].shape)

        def apply(inp: torch.Tensor, weight: torch.Tensor, groups: int | None = None) -> torch.Tensor:
            if not conv:
                return F.linear(inp, weight)
            fn = _CONVS[type(m)]
            return fn(inp, weight, None, m.stride, m.padding, m.dilation, m.groups if groups is None else groups)

        rows = k * self._orders
        res = torch.zeros((rows,) + out_shape, dtype=x.dtype, device=x.device) if ta is None else None
        if ta is not None:
            res = apply(ta.reshape((-1,) + tuple(x.shape[1:])), w).reshape((rows,) + out_shape)
        if zw is not None:
            if conv and m.groups == 1:
                wx = apply(x, zw.reshape((-1,) + tuple(w.shape[1:])))  # (N, K·out, ...)
                wx = wx.reshape((x.shape[0], k, -1) + tuple(wx.shape[2:])).transpose(0, 1)
                res[:k] += wx
            elif conv:
                for i in range(k):
                    res[i] += apply(x, zw[i])
            else:
                res[:k] += torch.einsum("...i,koi->k...o", x, zw)
            if ta is not None and self._orders == 2:
                if conv:
                    for i in range(k):
                        res[k + i] += 2 * apply(ta[i], zw[i])
                else:
                    res[k:] += 2 * torch.einsum("k...i,koi->k...o", ta[:k], zw)
        if zb is not None:
            res[:k] += zb.reshape((k, 1, -1) + (1,) * (len(out_shape) - 2)) if conv else zb.reshape(
                (k,) + (1,) * (len(out_shape) - 1) + (-1,))
        return res

    def _bn(self, node: Any, m: nn.Module, P: dict[Any, Any], T: dict[Any, Any], dirs: dict[str, torch.Tensor],
            k: int) -> torch.Tensor | None:
        """Eval BatchNorm ``y = x̂·γ + β``, ``x̂ = (x − μ)·r``: bilinear in ``x̂`` and ``γ``."""
        a = node.args[0]
        ta = T.get(a)
        zg, zb = dirs.get(f"{node.target}.weight"), dirs.get(f"{node.target}.bias")
        if ta is None and zg is None and zb is None:
            return None
        x = P[a]
        _, xhat, r = self._bn_primal(node.target, m, x)
        gamma = self._tensor_attr(f"{node.target}.weight")
        shape = (1, 1, -1) + (1,) * (x.ndim - 2)
        scale = r if gamma is None else r * gamma
        res = (ta * scale.reshape(shape) if ta is not None
               else torch.zeros((k * self._orders,) + tuple(x.shape), dtype=x.dtype, device=x.device))
        if zg is not None:
            res[:k] += xhat * zg.reshape((k,) + shape[1:])
            if ta is not None and self._orders == 2:
                res[k:] += 2 * ta[:k] * (r * zg).reshape((k,) + shape[1:])
        if zb is not None:
            res[:k] += zb.reshape((k,) + shape[1:])
        return res
