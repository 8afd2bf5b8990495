"""Per-sample weight gradients of Conv/Linear layers from one batched backward pass.

When no operation mixes samples, the gradient of Σ_i ℓ_i with respect to a layer's
output, restricted to sample i, is the gradient of ℓ_i alone. BatchNorm in train mode
does mix samples, so on the working copy each BatchNorm normalises every sample with its
own statistics (the batch folded into the channel axis, so the
kernel computes exactly what BN computes on a batch of one). The per-sample weight
gradient is then an outer product per sample:

- Linear: ``g_i = δ_i a_iᵀ`` (summed over extra axes); on 2-D inputs the sign sum is
  ``sign(δ)ᵀ sign(a)`` directly;
- Conv2d: ``g_i[:, :, u, v] = δ_i · shift_{u,v}(a_i)ᵀ`` per group and kernel offset
  (one batched matmul per offset); Conv1d as a 1×k Conv2d.

One forward and one input-only backward per chunk, then batched matmuls per layer —
about the cost of one training step instead of N batch-of-one steps.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from nndiag.errors import AnalysisError


def _per_sample_bn_forward(self: _BatchNorm, x: torch.Tensor) -> torch.Tensor:
    # samples folded into channels: (N, C, ...) -> (1, N·C, ...), so the kernel reduces
    # over exactly the elements (and in the order) a batch of one would
    n, c = x.shape[0], x.shape[1]
    w = None if self.weight is None else self.weight.repeat(n)
    b = None if self.bias is None else self.bias.repeat(n)
    out = nn.functional.batch_norm(x.reshape(1, n * c, *x.shape[2:]), None, None, w, b,
                                   training=True, momentum=0.0, eps=self.eps)
    return out.reshape(x.shape)


def _sum_pool_forward(self: nn.AvgPool2d, x: torch.Tensor) -> torch.Tensor:
    # average pooling as a depthwise convolution with a ones kernel, divided by the number
    # of summed elements: the same values up to rounding, and on CPU several times faster
    # (forward and backward) than PyTorch's NCHW ``avg_pool2d`` kernel
    c = x.shape[1]
    k = nn.modules.utils._pair(self.kernel_size)
    s = nn.modules.utils._pair(self.stride if self.stride is not None else self.kernel_size)
    p = nn.modules.utils._pair(self.padding)
    w = torch.ones(c, 1, *k, dtype=x.dtype, device=x.device)
    total = nn.functional.conv2d(x, w, stride=s, padding=p, groups=c)
    if self.count_include_pad:
        return total / (k[0] * k[1])
    ones = torch.ones(1, 1, *x.shape[2:], dtype=x.dtype, device=x.device)
    count = nn.functional.conv2d(ones, w[:1], stride=s, padding=p)
    return total / count


def fast_pools(net: nn.Module) -> None:
    """Make every plain ``AvgPool2d`` of ``net`` (a working copy) pool by a depthwise convolution."""
    for m in net.modules():
        if type(m) is nn.AvgPool2d and not m.ceil_mode and m.divisor_override is None:
            m.forward = types.MethodType(_sum_pool_forward, m)  # type: ignore[method-assign]


def supports(net: nn.Module, layers: list[nn.Module]) -> bool:
    """Whether every scored layer has a closed-form per-sample gradient here."""
    for m in layers:
        if isinstance(m, nn.Linear):
            continue
        if isinstance(m, (nn.Conv1d, nn.Conv2d)) and not isinstance(m.padding, str) \
                and m.padding_mode == "zeros":
            continue
        return False
    for m in net.modules():
        if isinstance(m, _BatchNorm) and not isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
            return False  # e.g. SyncBatchNorm
    return True


def per_sample_norms(net: nn.Module) -> None:
    """Make every BatchNorm of ``net`` (a working copy) normalise each sample on its own."""
    for m in net.modules():
        if isinstance(m, _BatchNorm):
            m.forward = types.MethodType(_per_sample_bn_forward, m)  # type: ignore[method-assign]


def _conv_geometry(m: nn.Conv1d | nn.Conv2d, a: torch.Tensor, d: torch.Tensor):
    if isinstance(m, nn.Conv1d):
        a, d = a.unsqueeze(2), d.unsqueeze(2)
        k, s, p, dil = (1, *m.kernel_size), (1, *m.stride), (0, *m.padding), (1, *m.dilation)
    else:
        k, s, p, dil = m.kernel_size, m.stride, m.padding, m.dilation
    if p[0] or p[1]:
        a = nn.functional.pad(a, (p[1], p[1], p[0], p[0]))
    return a, d, k, s, dil


def _conv_offsets(m: nn.Conv1d | nn.Conv2d, a: torch.Tensor,
                  d: torch.Tensor) -> Iterator[tuple[int, int, torch.Tensor]]:
    """``(u, v, g)`` with ``g`` (N, O, I/groups) the per-sample gradient at kernel offset (u, v).

    One batched matmul per offset: cheaper than materialising im2col columns.
    """
    a, d, k, s, dil = _conv_geometry(m, a, d)
    n, g = a.shape[0], m.groups
    ho, wo = d.shape[2], d.shape[3]
    dd = d.reshape(n * g, d.shape[1] // g, ho * wo)
    for i in range(k[0]):
        for j in range(k[1]):
            r0, c0 = i * dil[0], j * dil[1]
            win = a[:, :, r0:r0 + s[0] * (ho - 1) + 1:s[0], c0:c0 + s[1] * (wo - 1) + 1:s[1]]
            win = win.reshape(n * g, a.shape[1] // g, ho * wo)
            yield i, j, torch.bmm(dd, win.transpose(1, 2)).reshape(n, d.shape[1], -1)


def _conv_grad(m: nn.Conv1d | nn.Conv2d, a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    parts = [gij for _, _, gij in _conv_offsets(m, a, d)]
    return torch.stack(parts, -1).reshape(a.shape[0], *m.weight.shape)


def _linear_grad(a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    n = a.shape[0]
    return torch.einsum("nso,nsi->noi", d.reshape(n, -1, d.shape[-1]), a.reshape(n, -1, a.shape[-1]))


def _sign_sum(g: torch.Tensor, track_zero: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    nz = (g != 0).any(0) if track_zero else None
    return torch.sign(g).sum(0, dtype=torch.float32), nz


def layer_sign_sums(m: nn.Module, entries: list[list[torch.Tensor]],
                    track_zero: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Σ_i sign(g_i) of one layer's per-sample weight gradients (and where any g_i ≠ 0).

    ``entries`` holds ``[input, output_grad]`` per call of the layer. A Linear layer called
    once on 2-D inputs has g_i = δ_i a_iᵀ, a single product per entry, so
    Σ_i sign(g_i) = sign(δ)ᵀ sign(a): one small matmul of ±1/0 matrices (exact integers in
    float32), without materialising the per-sample gradients. Raises
    :class:`~nndiag.errors.AnalysisError` on NaN output gradients. Returns
    ``(None, None)`` when the loss does not reach the layer.
    """
    entries = [e for e in entries if len(e) == 2]
    if not entries:
        return None, None
    for _, d in entries:  # torch.sign(NaN) is 0: catch NaN before it vanishes
        if torch.isnan(d).any():  # (NaN activations already made the loss NaN)
            raise AnalysisError("GradSign: NaN gradients")
    w = m.weight
    if len(entries) == 1:
        a, d = entries[0]
        if isinstance(m, nn.Linear) and a.ndim == 2:
            s = torch.sign(d).float().T @ torch.sign(a).float()
            nz = ((d != 0).float().T @ (a != 0).float()) > 0 if track_zero else None
            return s, nz
        if isinstance(m, (nn.Conv1d, nn.Conv2d)):
            kh = 1 if isinstance(m, nn.Conv1d) else m.kernel_size[0]
            kw = m.kernel_size[-1]
            s = torch.zeros(w.shape[0], w.shape[1], kh, kw, dtype=torch.float32, device=w.device)
            nz = torch.zeros(s.shape, dtype=torch.bool, device=w.device) if track_zero else None
            for i, j, gij in _conv_offsets(m, a, d):
                si, zi = _sign_sum(gij, track_zero)
                s[:, :, i, j] = si
                if nz is not None:
                    nz[:, :, i, j] = zi
            return s.reshape(w.shape), None if nz is None else nz.reshape(w.shape)
    total = None  # a layer used several times: add the per-sample gradients first
    for a, d in entries:
        gi = _linear_grad(a, d) if isinstance(m, nn.Linear) else _conv_grad(m, a, d)
        total = gi if total is None else total + gi
    return _sign_sum(total, track_zero)


def per_sample_sign_sums(
    net: nn.Module,
    layers: list[nn.Module],
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    track_zero: bool = True,
) -> Iterator[tuple[torch.Tensor | None, torch.Tensor | None]]:
    """Per layer, Σ_i sign(∂ℓ_i/∂W) over the batch (and the mask of weights with any g_i ≠ 0).

    ``net`` must already have per-sample BatchNorms (:func:`per_sample_norms`). Yields
    ``(None, None)`` for a layer the loss does not reach.
    """
    records: dict[int, list[list[torch.Tensor]]] = {id(m): [] for m in layers}
    handles = []

    def hook(mod: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        entry = [inp[0].detach()]
        records[id(mod)].append(entry)
        if out.requires_grad:
            out.register_hook(lambda g: entry.append(g.detach()))

    for m in layers:
        handles.append(m.register_forward_hook(hook))
    flags = [p.requires_grad for p in net.parameters()]
    try:
        for p in net.parameters():
            p.requires_grad_(False)
        xin = x.detach().clone().requires_grad_(True)
        out = net(xin)
        loss = loss_fn(out, y) * x.shape[0]
        if torch.isnan(loss).any():
            raise AnalysisError("GradSign: NaN loss (NaN weights, activations or inputs)")
        if loss.requires_grad:
            loss.backward()
    finally:
        for h in handles:
            h.remove()
        for p, f in zip(net.parameters(), flags, strict=True):
            p.requires_grad_(f)
    for m in layers:
        entries = records[id(m)]
        records[id(m)] = []
        yield layer_sign_sums(m, entries, track_zero)
