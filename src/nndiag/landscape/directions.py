"""Directions in parameter space for loss landscapes, and their normalisations.

A direction is a dict ``name -> tensor`` over the trainable parameters.

* :func:`random_direction` — seeded standard Gaussian (not uniform on [0, 1) as in LLA
  and loss-landscapes, which biases every coordinate the same way).
* :func:`normalize_direction` — ``filter`` (Li et al. 2018: each slice along dim 0 of a
  ≥2-D weight is rescaled to the norm of the matching weight slice), ``layer`` (each
  tensor to the norm of its weight), ``model`` (the whole direction to the norm of all
  weights), ``weight`` (element-wise ``d ⊙ |θ|``: a relative perturbation of each
  weight), ``none``.
* 1-D parameters (biases, BatchNorm weight/bias) follow ``one_d``: ``zero`` (removed
  from the direction, Li et al.'s default), ``keep`` (normalised as one filter, i.e. to
  the norm of the vector) or ``scale`` (the direction is the parameter itself, so a step
  α rescales it by ``1 + α``).
* :func:`toward` — the difference to another model's weights (interpolation).

Examples
--------
>>> import torch
>>> from torch import nn
>>> m = nn.Linear(3, 2)
>>> w = {k: p.detach() for k, p in m.named_parameters()}
>>> d = normalize_direction(random_direction(w, seed=0), w, norm="filter")
>>> torch.allclose(d["weight"].norm(dim=1), w["weight"].norm(dim=1)), float(d["bias"].abs().sum())
(True, 0.0)
"""

from __future__ import annotations

from typing import Any

import torch

from nndiag._utils.names import matching_names
from nndiag.errors import InputError

Direction = dict[str, torch.Tensor]
NORMS = ("filter", "layer", "model", "weight", "none")
ONE_D = ("zero", "keep", "scale")
_EPS = 1e-12


def random_direction(weights: dict[str, torch.Tensor], *, seed: int = 0,
                     generator: torch.Generator | None = None) -> Direction:
    """A standard Gaussian direction shaped like ``weights`` (seeded, CPU generator)."""
    gen = generator or torch.Generator().manual_seed(int(seed))
    return {k: torch.randn(w.shape, generator=gen, dtype=torch.float64).to(w.dtype).to(w.device)
            for k, w in weights.items()}


def _check(norm: str, one_d: str) -> None:
    if norm not in NORMS:
        raise InputError(f"unknown normalisation '{norm}'; choose one of {', '.join(NORMS)}")
    if one_d not in ONE_D:
        raise InputError(f"unknown 1-D parameter policy '{one_d}'; choose one of {', '.join(ONE_D)}")


def normalize_direction(direction: Direction, weights: dict[str, torch.Tensor], *,
                        norm: str = "filter", one_d: str = "zero") -> Direction:
    """Rescale ``direction`` to the scale of ``weights`` (see the module docstring).

    Parameters
    ----------
    direction, weights : dict of str to Tensor
        Same keys and shapes.
    norm : {"filter", "layer", "model", "weight", "none"}
    one_d : {"zero", "keep", "scale"}
        Policy for parameters with fewer than 2 dimensions.

    Returns
    -------
    dict of str to Tensor
        A new direction (inputs are not modified).
    """
    _check(norm, one_d)
    if set(direction) != set(weights):
        raise InputError("the direction and the weights name different parameters")
    out: Direction = {}
    for k, d in direction.items():
        w = weights[k]
        if d.shape != w.shape:
            raise InputError(f"direction for '{k}' has shape {tuple(d.shape)}, weights {tuple(w.shape)}")
        if w.ndim <= 1 and norm != "none":
            if one_d == "zero":
                out[k] = torch.zeros_like(d)
                continue
            if one_d == "scale":
                out[k] = w.detach().clone()
                continue
            if norm in ("filter", "layer"):
                out[k] = d * (w.norm() / (d.norm() + _EPS))
                continue
        if norm == "filter":
            dn = d.reshape(d.shape[0], -1).norm(dim=1)
            wn = w.reshape(w.shape[0], -1).norm(dim=1)
            out[k] = d * (wn / (dn + _EPS)).reshape((-1,) + (1,) * (d.ndim - 1))
        elif norm == "layer":
            out[k] = d * (w.norm() / (d.norm() + _EPS))
        elif norm == "weight":
            out[k] = d * w.abs()
        else:  # model / none: handled below
            out[k] = d.clone()
    if norm == "model":
        free = [k for k in out if weights[k].ndim > 1 or one_d == "keep"]
        wn = torch.sqrt(sum((weights[k].double() ** 2).sum() for k in free))
        dn = torch.sqrt(sum((out[k].double() ** 2).sum() for k in free))
        for k in free:
            out[k] = out[k] * (wn / (dn + _EPS)).to(out[k].dtype)
    return out


def toward(weights: dict[str, torch.Tensor], other: Any) -> Direction:
    """The direction ``θ_other − θ`` to another model.

    Parameters
    ----------
    weights : dict of str to Tensor
        This model's trainable parameters.
    other : nn.Module, mapping of str to Tensor, LoadedModel or TensorSource
        The other model, its state dict, or a loaded checkpoint/folder (only the matching
        tensors are read). Names may differ by one wrapper prefix (:func:`matching_names`).

    Raises
    ------
    InputError
        When the other model lacks a parameter or its shape differs.
    """
    source = getattr(other, "tensors", other)  # a LoadedModel's tensors
    if hasattr(other, "state_dict"):
        state: Any = other.state_dict()
        names = list(state)
    elif hasattr(source, "infos") and hasattr(source, "get"):
        state, names = source, [i.name for i in source.infos()]
    else:
        state = dict(other)
        names = list(state)
    mapping = matching_names(list(weights), names) or {}
    out: Direction = {}
    for k, w in weights.items():
        if k not in mapping:
            raise InputError(f"the other model has no parameter '{k}'; interpolation needs the same architecture")
        t = state.get(mapping[k]) if not isinstance(state, dict) else state[mapping[k]]
        t = t.detach().to(device=w.device, dtype=w.dtype)
        if t.shape != w.shape:
            raise InputError(f"parameter '{k}' has shape {tuple(t.shape)} in the other model, {tuple(w.shape)} here")
        out[k] = t - w
    return out


def flat_to_direction(v: torch.Tensor, weights: dict[str, torch.Tensor]) -> Direction:
    """A flat vector (e.g. a Hessian eigenvector) as a direction dict."""
    out, i = {}, 0
    for k, w in weights.items():
        n = w.numel()
        out[k] = v[i:i + n].reshape(w.shape).to(device=w.device, dtype=w.dtype)
        i += n
    if i != v.numel():
        raise InputError(f"vector of length {v.numel()} does not match {i} parameters")
    return out


def direction_table(directions: list[Direction], weights: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    """Rows ``name, shape, numel, weight_norm, d1_norm[, d2_norm]`` for the result."""
    rows = []
    for k, w in weights.items():
        row: dict[str, Any] = {"name": k, "shape": "×".join(map(str, w.shape)) or "scalar",
                               "numel": w.numel(), "weight_norm": float(w.double().norm())}
        for i, d in enumerate(directions, 1):
            row[f"d{i}_norm"] = float(d[k].double().norm())
        rows.append(row)
    return rows
