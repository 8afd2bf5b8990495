"""Per-sample weight gradients of Conv/Linear layers from one batched backward pass.

When no operation mixes samples, the gradient of Σ_i ℓ_i with respect to a layer's
output, restricted to sample i, is the gradient of ℓ_i alone. BatchNorm in train mode
does mix samples, so on the working copy each BatchNorm normalises every sample with its
own statistics (the batch folded into the channel axis, so the
kernel computes exactly what BN computes on a batch of one). The per-sample weight
gradient is then an outer product per sample:

- Linear: ``g_i = δ_iᵀ a_i`` (summed over extra axes);
- Conv2d: ``g_i[:, :, u, v] = δ_i · shift_{u,v}(a_i)ᵀ`` per group and kernel offset
  (one batched matmul per offset); Conv1d as a 1×k Conv2d.

One forward and one input-only backward per chunk, then one batched matmul per layer —
the cost of a training step instead of N batch-of-one steps.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def _per_sample_bn_forward(self: _BatchNorm, x: torch.Tensor) -> torch.Tensor:
    # samples folded into channels: (N, C, ...) -> (1, N·C, ...), so the kernel reduces
    # over exactly the elements (and in the order) a batch of one would
    n, c = x.shape[0], x.shape[1]
    w = None if self.weight is None else self.weight.repeat(n)
    b = None if self.bias is None else self.bias.repeat(n)
    out = nn.functional.batch_norm(x.reshape(1, n * c, *x.shape[2:]), None, None, w, b,
                                   training=True, momentum=0.0, eps=self.eps)
    return out.reshape(x.shape)


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


def _conv_grad(m: nn.Conv1d | nn.Conv2d, a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    if isinstance(m, nn.Conv1d):
        a, d = a.unsqueeze(2), d.unsqueeze(2)
        k, s, p, dil = (1, *m.kernel_size), (1, *m.stride), (0, *m.padding), (1, *m.dilation)
    else:
        k, s, p, dil = m.kernel_size, m.stride, m.padding, m.dilation
    n, g = a.shape[0], m.groups
    ho, wo = d.shape[2], d.shape[3]
    dd = d.reshape(n * g, d.shape[1] // g, ho * wo)
    if p[0] or p[1]:
        a = nn.functional.pad(a, (p[1], p[1], p[0], p[0]))
    per_offset = []
    # one batched matmul per kernel offset: cheaper than materialising im2col columns
    for i in range(k[0]):
        for j in range(k[1]):
            r0, c0 = i * dil[0], j * dil[1]
            win = a[:, :, r0:r0 + s[0] * (ho - 1) + 1:s[0], c0:c0 + s[1] * (wo - 1) + 1:s[1]]
            win = win.reshape(n * g, a.shape[1] // g, ho * wo)
            per_offset.append(torch.bmm(dd, win.transpose(1, 2)))
    out = per_offset[0].unsqueeze(-1) if len(per_offset) == 1 else torch.stack(per_offset, -1)
    return out.reshape(n, *m.weight.shape)


def _linear_grad(a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    n = a.shape[0]
    return torch.einsum("nso,nsi->noi", d.reshape(n, -1, d.shape[-1]), a.reshape(n, -1, a.shape[-1]))


def per_sample_grads(
    net: nn.Module,
    layers: list[nn.Module],
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> Iterator[torch.Tensor | None]:
    """Per-sample gradients ``(N, *weight.shape)`` of each layer's weight, in order.

    ``net`` must already have per-sample BatchNorms (:func:`per_sample_norms`). Yields
    None for a layer the loss does not reach.
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
        if loss.requires_grad:
            loss.backward()
    finally:
        for h in handles:
            h.remove()
        for p, f in zip(net.parameters(), flags, strict=True):
            p.requires_grad_(f)
    for m in layers:
        total = None
        for entry in records[id(m)]:
            if len(entry) < 2:
                continue
            a, d = entry
            gi = _linear_grad(a, d) if isinstance(m, nn.Linear) else _conv_grad(m, a, d)
            total = gi if total is None else total + gi
        records[id(m)] = []
        yield total
