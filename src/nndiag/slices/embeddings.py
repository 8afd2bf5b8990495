"""Representations, per-example losses, predictions and labels for slice discovery.

:func:`extract_embeddings` runs a classifier over a data set with a forward hook at the
input of its final ``nn.Linear`` (the default: the layer whose execution comes last) or
at the output of any named module, and returns an :class:`Embeddings` record.
:func:`load_embeddings` reads user-given embeddings and losses from ``.npy``/``.npz``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nndiag._utils.precision import full_precision
from nndiag.errors import DataError, InputError
from nndiag.io.data import as_data, misfit, model_inputs

#: Keys accepted in a user ``.npz`` (first match wins).
EMBEDDING_KEYS = ("embeddings", "z", "x", "features")
LOSS_KEYS = ("losses", "loss")


@dataclass(frozen=True)
class Embeddings:
    """Per-example representations with losses.

    Attributes
    ----------
    z : ndarray, shape (N, D)
        Representations (float64).
    losses : ndarray, shape (N,)
        Per-example loss (cross-entropy for classifiers).
    labels, preds : ndarray of int, shape (N,), optional
        True and predicted classes.
    probs : ndarray, shape (N, C), optional
        Predicted class probabilities.
    layer : str
        Where the representations came from.
    meta : dict
        Anything else (data name, number of classes).
    """

    z: np.ndarray
    losses: np.ndarray
    labels: np.ndarray | None = None
    preds: np.ndarray | None = None
    probs: np.ndarray | None = None
    layer: str = "user"
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.z.shape[0])

    @property
    def correct(self) -> np.ndarray | None:
        """Boolean array: prediction equals label (None when either is unknown)."""
        if self.labels is None or self.preds is None:
            return None
        return self.preds == self.labels

    def take(self, idx: np.ndarray) -> Embeddings:
        """The examples at ``idx``."""
        def sub(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else a[idx]

        return replace(self, z=self.z[idx], losses=self.losses[idx], labels=sub(self.labels),
                       preds=sub(self.preds), probs=sub(self.probs))


def validate(z: Any, losses: Any, name: str = "embeddings") -> tuple[np.ndarray, np.ndarray]:
    """Check and convert embeddings and losses to float64 arrays.

    Raises
    ------
    InputError
        Wrong shapes, mismatched lengths, NaN/Inf values or no examples.
    """
    z = np.asarray(z, dtype=np.float64)
    losses = np.asarray(losses, dtype=np.float64)
    if z.ndim == 1:
        z = z[:, None]
    if z.ndim != 2:
        z = z.reshape(z.shape[0], -1) if z.ndim > 2 else z
    if losses.ndim != 1:
        raise InputError(f"{name}: losses must be 1-D, got shape {losses.shape}")
    if z.shape[0] != losses.shape[0]:
        raise InputError(f"{name}: {z.shape[0]} embeddings but {losses.shape[0]} losses")
    if z.shape[0] == 0:
        raise InputError(f"{name}: no examples")
    bad = int((~np.isfinite(z)).any(axis=1).sum())
    if bad:
        raise InputError(f"{name}: {bad} embedding row(s) contain NaN or Inf; remove or impute them")
    bad = int((~np.isfinite(losses)).sum())
    if bad:
        raise InputError(f"{name}: {bad} loss value(s) are NaN or Inf")
    return z, losses


def _linear_in_execution_order(module: nn.Module, xb: torch.Tensor) -> list[str]:
    names = {m: n for n, m in module.named_modules()}
    order: list[str] = []
    handles = [m.register_forward_pre_hook(lambda mod, _inp: order.append(names[mod]))
               for m in module.modules() if isinstance(m, nn.Linear)]
    try:
        with torch.no_grad():
            module(xb)
    except (RuntimeError, ValueError, IndexError) as exc:
        raise misfit(module, xb, exc) from None
    finally:
        for h in handles:
            h.remove()
    return order


def layer_names(module: nn.Module) -> list[str]:
    """Names of the sub-modules a representation can be taken from."""
    return [n for n, _ in module.named_modules() if n]


@full_precision
def extract_embeddings(
    model: nn.Module,
    data: Any,
    *,
    layer: str | None = None,
    batch_size: int = 256,
    device: str | torch.device | None = None,
) -> Embeddings:
    """Representations, cross-entropy losses, predictions and labels of ``model`` on ``data``.

    Parameters
    ----------
    model : nn.Module
        A classifier returning logits. Left exactly as it was (mode, hooks, grads, weights);
        it runs in eval mode under ``torch.no_grad`` during extraction.
    data : DataBundle, spec or (x, y)
        Labelled examples (anything :func:`nndiag.io.data.as_data` accepts).
    layer : str, optional
        A module name whose *output* is the representation. Default: the *input* of the
        last ``nn.Linear`` executed in the forward pass.
    batch_size : int
        Examples per forward pass.
    device : str or torch.device, optional
        Where to run; default: where the model already is.

    Returns
    -------
    Embeddings

    Raises
    ------
    InputError
        ``layer`` names no module (the message lists the valid names), or the model has
        no ``nn.Linear`` and no layer was given.

    Examples
    --------
    >>> from nndiag.models import build_model
    >>> emb = extract_embeddings(build_model("digits-mlp"), "digits")
    >>> emb.z.shape
    (1797, 64)
    """
    from nndiag._utils.device import model_device, resolve_device
    from nndiag._utils.model_state import preserved
    from nndiag.landscape._setup import logits_of

    bundle = as_data(data)
    dev = model_device(model) if device is None else resolve_device(device)
    modules = dict(model.named_modules())
    with preserved(model, values=False):
        model.eval()
        if dev != model_device(model):
            raise InputError(f"the model is on {model_device(model)} but device={dev} was asked; "
                             "move the model or leave device unset")
        x = model_inputs(model, bundle.x, name=bundle.name)
        if layer is not None:
            if layer not in modules or not layer:
                valid = layer_names(model)
                shown = ", ".join(valid[:40]) + (" ..." if len(valid) > 40 else "")
                raise InputError(f"unknown layer '{layer}'; valid layer names: {shown}")
            target, use_input, where = modules[layer], False, f"{layer} (output)"
        else:
            order = _linear_in_execution_order(model, x[:2].to(dev))
            if not order:
                valid = layer_names(model)
                raise InputError("the model has no nn.Linear layer; name one with layer=... "
                                 f"(valid: {', '.join(valid[:40])})")
            target, use_input, where = modules[order[-1]], True, f"{order[-1]} (input)"
        captured: list[torch.Tensor] = []

        def hook(_m: nn.Module, inp: tuple[torch.Tensor, ...], out: Any) -> None:
            t = inp[0] if use_input else (out[0] if isinstance(out, (tuple, list)) else out)
            captured.append(t.detach().reshape(t.shape[0], -1).to("cpu", torch.float64))

        handle = target.register_forward_hook(hook)
        zs, losses, preds, probs = [], [], [], []
        try:
            with torch.no_grad():
                for i in range(0, len(bundle), batch_size):
                    xb, yb = x[i:i + batch_size], bundle.y[i:i + batch_size]
                    n_before = len(captured)
                    try:
                        logits = logits_of(model(xb.to(dev)))  # (a dict's or ModelOutput's logits)
                    except (RuntimeError, ValueError, IndexError) as exc:
                        raise misfit(model, xb, exc) from None
                    if len(captured) != n_before + 1:
                        raise InputError(f"layer '{where}' ran {len(captured) - n_before} times in one "
                                         "forward pass; choose a layer that runs once")
                    if logits.ndim != 2 or logits.shape[0] != xb.shape[0]:
                        raise InputError(f"the model must return (batch, classes) logits, got shape "
                                         f"{tuple(logits.shape)}")
                    if len(yb) and int(yb.max()) >= logits.shape[1]:
                        raise DataError(f"labels must lie in [0, {logits.shape[1] - 1}] for a model with "
                                        f"{logits.shape[1]} outputs (found {int(yb.max())})")
                    logits = logits.double().cpu()
                    zs.append(captured[-1])
                    losses.append(F.cross_entropy(logits, yb.cpu(), reduction="none"))
                    preds.append(logits.argmax(1))
                    probs.append(torch.softmax(logits, 1))
        finally:
            handle.remove()
    z, loss = validate(torch.cat(zs).numpy(), torch.cat(losses).numpy(), name=bundle.name)
    return Embeddings(z=z, losses=loss, labels=bundle.y.cpu().numpy().astype(np.int64),
                      preds=torch.cat(preds).numpy().astype(np.int64), probs=torch.cat(probs).numpy(),
                      layer=where, meta={"data": bundle.name, "num_classes": int(bundle.num_classes),
                                         "classes": [str(c) for c in (bundle.meta or {}).get("classes") or []]})


def load_embeddings(path: str | Path, losses: str | Path | None = None) -> Embeddings:
    """Read user-given embeddings and losses.

    Parameters
    ----------
    path : str or Path
        A ``.npz`` with an embeddings array (``embeddings``, ``z``, ``x`` or ``features``)
        and ``losses`` (optional ``labels``, ``preds``, ``probs``), or a ``.npy`` of
        embeddings (then ``losses`` is required).
    losses : str or Path, optional
        A ``.npy`` of per-example losses (overrides the ``.npz`` one).

    Returns
    -------
    Embeddings
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such file")
    arrays: dict[str, np.ndarray] = {}
    try:
        if p.suffix.lower() == ".npy":
            arrays["embeddings"] = np.load(p, allow_pickle=False)
        elif p.suffix.lower() == ".npz":
            with np.load(p, allow_pickle=False) as f:
                arrays = {k: f[k] for k in f.keys()}
        else:
            raise DataError(f"{p}: expected a .npy or .npz file of embeddings")
        if losses is not None:
            arrays["losses"] = np.load(Path(losses), allow_pickle=False)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{p}: cannot read ({(str(exc).splitlines() or [type(exc).__name__])[0]})") from None
    zkey = next((k for k in EMBEDDING_KEYS if k in arrays), None)
    lkey = next((k for k in LOSS_KEYS if k in arrays), None)
    if zkey is None or lkey is None:
        raise DataError(f"{p}: needs an embeddings array ({'/'.join(EMBEDDING_KEYS)}) and losses "
                        f"({'/'.join(LOSS_KEYS)}); found: {', '.join(arrays) or 'nothing'}")
    z, loss = validate(arrays[zkey], arrays[lkey], name=str(p))
    n = len(loss)

    def opt(key: str, dtype: Any) -> np.ndarray | None:
        if key not in arrays:
            return None
        a = np.asarray(arrays[key]).astype(dtype)
        if a.shape[0] != n:
            raise DataError(f"{p}: '{key}' has {a.shape[0]} rows but there are {n} embeddings")
        return a

    return Embeddings(z=z, losses=loss, labels=opt("labels", np.int64), preds=opt("preds", np.int64),
                      probs=opt("probs", np.float64), layer="user", meta={"data": str(p)})
