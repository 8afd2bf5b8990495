"""Leave the user's model exactly as it was.

:func:`preserved` snapshots a module's train/eval flags, ``requires_grad`` flags,
``.grad`` tensors, forward/backward hooks and (optionally) parameters and buffers,
and restores them on exit, also when the block raises.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

#: The hook dictionaries ``nn.Module.__init__`` gives every module (``_forward_hooks`` etc.).
_HOOK_NAMES = tuple(n for n, v in vars(nn.Module()).items() if n.endswith("_hooks") and isinstance(v, dict))


def _hook_dicts(module: nn.Module) -> dict[str, dict[Any, Any]]:
    """Copies of the module's non-empty hook dictionaries (``_forward_hooks`` etc.).

    Only PyTorch's own (:data:`_HOOK_NAMES`, looked up by name: scanning every attribute of
    every module cost 1.3 ms of each snapshot of a ResNet56)."""
    d = vars(module)
    out = {}
    for n in _HOOK_NAMES:
        v = d.get(n)
        if isinstance(v, dict) and v:
            out[n] = dict(v)
    return out


@contextlib.contextmanager
def preserved(model: nn.Module, *, values: bool = True) -> Iterator[nn.Module]:
    """Restore ``model``'s mode, grad flags, grads, hooks and (optionally) tensors on exit.

    Parameters
    ----------
    model : nn.Module
        The user's model.
    values : bool
        Also snapshot and restore parameter and buffer values (BatchNorm running
        statistics included). Costs one copy of the state.

    Yields
    ------
    nn.Module
        The same model.
    """
    modules = list(model.modules())
    training = [m.training for m in modules]
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    grads = [None if p.grad is None else p.grad.detach().clone() for p in params]
    hooks = [_hook_dicts(m) for m in modules]
    state = (
        {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
        if values
        else None
    )
    try:
        yield model
    finally:
        with torch.no_grad():
            if state is not None:
                current = model.state_dict(keep_vars=True)
                for k, v in state.items():
                    live = current.get(k)
                    if live is not None and live.shape == v.shape:
                        live.data.copy_(v)
            for p, flag, g in zip(params, flags, grads, strict=True):
                # (set only what changed: ~0.5 ms of a 75 ms spectral analysis of ResNet56 otherwise)
                if p.requires_grad != flag:
                    p.requires_grad_(flag)
                if g is not None or p.grad is not None:
                    p.grad = g
        for m, t, h in zip(modules, training, hooks, strict=True):
            if m.training != t:
                m.training = t
            now = _hook_dicts(m)
            if now != h:  # (mostly both empty: nothing to restore)
                for name in now.keys() | h.keys():
                    live = getattr(m, name)
                    live.clear()
                    live.update(h.get(name, {}))


def snapshot(model: nn.Module) -> dict[str, Any]:
    """A comparable snapshot of everything :func:`preserved` restores (for tests)."""
    return {
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.detach().clone() for p in model.parameters()],
        "hooks": [{k: list(v) for k, v in _hook_dicts(m).items()} for m in model.modules()],
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
    }


def same_snapshot(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two :func:`snapshot` results are identical (bitwise for tensors)."""
    if a["training"] != b["training"] or a["requires_grad"] != b["requires_grad"]:
        return False
    if a["hooks"] != b["hooks"]:
        return False
    for ga, gb in zip(a["grads"], b["grads"], strict=False):
        if (ga is None) != (gb is None):
            return False
        if ga is not None and not torch.equal(ga, gb):
            return False
    if a["state"].keys() != b["state"].keys():
        return False
    return all(torch.equal(a["state"][k], b["state"][k]) for k in a["state"])
