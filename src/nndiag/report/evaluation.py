"""The ``evaluation`` probe: accuracy, loss and confusion of a classifier on the given data.

It gives the report the numbers every other analysis is read against (and the
accuracies next to which ``nndiag diagnose A B ...`` ranks models). It follows the
probe contract of :mod:`nndiag.report.probes`.

Examples
--------
>>> from nndiag.io.data import load_data
>>> from nndiag.io.models import load_model
>>> res = run(load_model("digits-cnn"), load_data("digits", n_samples=64), seed=0,
...           device=None)
>>> res.summary["n_samples"], 0.0 <= res.summary["accuracy"] <= 1.0
(64, True)
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from nndiag.errors import DataError
from nndiag.report.input_scale import input_scale_finding
from nndiag.report.results import Finding, Result, provenance

NAME = "evaluation"
NEEDS_DATA = True
#: Token sequences get the next-token loss and accuracy (:func:`_evaluate_tokens`).
TOKENS = True
#: Summary values compared across models in a multi-model report.
COMPARE = ("accuracy", "loss")


#: How far above the most common target's share accuracy must be to count as better than chance:
#: this many binomial standard errors of that share, and at least :data:`CHANCE_MARGIN_MIN`.
CHANCE_SIGMAS = 2.0
CHANCE_MARGIN_MIN = 0.02


def chance_finding(accuracy: float, targets: np.ndarray, *, what: str, name: str) -> Finding | None:
    """``EVAL-CHANCE`` when ``accuracy`` is no better than always predicting the most common target.

    Parameters
    ----------
    accuracy : float
        Top-1 accuracy on ``targets``.
    targets : ndarray of int
        The true classes (or next tokens), any shape.
    what : str
        ``"class"`` or ``"token"``, for the message.
    name : str
        The data's name.
    """
    t = np.asarray(targets).reshape(-1)
    if t.size == 0:
        return None
    share = float(np.bincount(t).max() / t.size)
    margin = max(CHANCE_MARGIN_MIN, CHANCE_SIGMAS * float(np.sqrt(share * (1 - share) / t.size)))
    if accuracy > share + margin:
        return None
    return Finding(
        "EVAL-CHANCE", "fail",
        f"accuracy {accuracy:.1%} on {name} is no better than always predicting the most common {what} "
        f"({share:.1%}): the model has learned nothing it can use on these data",
        {"accuracy": accuracy, "majority_share": share, "margin": margin, "n": int(t.size)},
        "check that these are the trained weights and that the data match its training (labels, "
        "preprocessing, tokenizer); if they do, the training failed: see the other findings")


def _class_names(data: Any, k: int) -> list[str]:
    names = data.meta.get("classes") if isinstance(getattr(data, "meta", None), dict) else None
    if names is not None and len(names) >= k:
        return [str(n) for n in list(names)[:k]]
    return [str(i) for i in range(k)]


def run(model: Any, data: Any, *, seed: int = 0, device: torch.device | None = None,
        loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        batch_size: int = 256, input_scale: tuple[Finding | None, dict[str, Any]] | None = None, **_: Any) -> Result:
    """Evaluate ``model`` (in eval mode, without gradients) on ``data``.

    Parameters
    ----------
    model : LoadedModel
        The model; it needs a runnable module.
    data : DataBundle
        Labelled examples.
    seed : int
        Recorded only (evaluation is deterministic).
    device : torch.device, optional
        Ignored: the model is evaluated where it already is.
    loss : callable, optional
        ``loss(logits, targets)`` returning per-example losses (``reduction='none'``);
        cross-entropy by default.
    batch_size : int
        Examples per forward pass.
    input_scale : (Finding or None, dict), optional
        The input-scale check already made (by ``nndiag diagnose``, on the data as given:
        :func:`~nndiag.report.input_scale.check_data`), reported instead of checking again.

    Returns
    -------
    Result
        ``summary``: accuracy, loss, n_samples, num_classes; tables ``per_class``
        (name, n, accuracy, loss) and ``confusion`` (name = true class, one column
        per predicted class). For unnormalised ``[0, 1]`` inputs and the default loss also
        the table ``input_scale`` (loss and accuracy on the first examples as given and
        normalised each way) and, when a normalisation does much better, the finding
        ``EVAL-INPUT-SCALE`` (:mod:`nndiag.report.input_scale`). ``EVAL-CHANCE`` when the
        accuracy is no better than always predicting the most common class
        (:func:`chance_finding`).
    """
    if data is None:
        raise DataError("evaluation needs labelled data")
    module = model.require_module("evaluation")
    if (data.meta or {}).get("tokens"):
        return _evaluate_tokens(module, data, seed=seed, batch_size=batch_size)
    from nndiag.landscape._setup import logits_of

    t0 = time.perf_counter()
    preds, losses = [], []
    with _evaluating(module, data) as (x, dev):
        for i in range(0, len(data), batch_size):
            xb, yb = x[i:i + batch_size], data.y[i:i + batch_size]
            out = logits_of(module(xb.to(dev)))  # (a dict's or ModelOutput's logits)
            if out.ndim != 2:
                raise DataError(f"{data.name}: the model's output has shape {tuple(out.shape)}; "
                                "evaluation needs class logits (batch, classes)")
            if int(yb.max()) >= out.shape[1]:
                raise DataError(f"{data.name}: labels go up to {int(yb.max())} but the model "
                                f"predicts {out.shape[1]} classes")
            yb = yb.to(dev)
            per = loss(out, yb) if loss is not None else F.cross_entropy(out, yb, reduction="none")
            per = per.reshape(-1) if per.numel() == len(yb) else per.mean().expand(len(yb))
            preds.append(out.argmax(1).cpu())
            losses.append(per.detach().float().cpu())
        if input_scale is not None:
            finding, scores = input_scale
        elif loss is not None:
            finding, scores = None, {}
        else:
            finding, scores = input_scale_finding(module, x, data.y, normalize=(data.meta or {}).get("normalize"),
                                                  name=data.name, batch_size=batch_size)
    y = data.y.cpu().numpy()
    p = torch.cat(preds).numpy()
    lo = torch.cat(losses).numpy()
    k = max(int(data.num_classes), int(y.max()) + 1, int(p.max()) + 1)
    names = _class_names(data, k)
    conf = np.zeros((k, k), dtype=np.int64)
    np.add.at(conf, (y, p), 1)
    per_class = pd.DataFrame({
        "name": names,
        "n": conf.sum(1),
        "accuracy": [conf[i, i] / conf[i].sum() if conf[i].sum() else np.nan for i in range(k)],
        "loss": [float(lo[y == i].mean()) if (y == i).any() else np.nan for i in range(k)],
    })
    confusion = pd.DataFrame(conf, columns=[f"pred_{n}" for n in names])
    confusion.insert(0, "name", names)
    summary = {
        "accuracy": float((p == y).mean()),
        "loss": float(lo.mean()),
        "n_samples": len(y),
        "num_classes": k,
        "worst_class": names[int(np.nanargmin(per_class["accuracy"].to_numpy(dtype=float)))],
    }
    tables = {"per_class": per_class, "confusion": confusion}
    if scores:
        tables["input_scale"] = pd.DataFrame([{"name": h, "loss": v[0], "accuracy": v[1]} for h, v in scores.items()])
    chance = chance_finding(summary["accuracy"], y, what="class", name=data.name)
    findings = [f for f in (finding, chance) if f is not None]
    return Result(NAME, tables=tables, summary=summary, findings=findings,
                  params={"batch_size": batch_size, "loss": "custom" if loss else "cross_entropy",
                          "data": data.name},
                  seed=seed, timing={"total": time.perf_counter() - t0}, meta=provenance(str(dev)))


@contextlib.contextmanager
def _evaluating(module: torch.nn.Module, data: Any) -> Iterator[tuple[torch.Tensor, torch.device]]:
    """The model in eval mode without gradients (its state restored afterwards), with the
    data's inputs as it takes them and its device."""
    from nndiag._utils.device import model_device
    from nndiag._utils.model_state import preserved
    from nndiag.io.data import model_inputs

    with preserved(module, values=False), torch.no_grad():
        module.eval()
        yield model_inputs(module, data.x, name=data.name), model_device(module)


def _evaluate_tokens(module: torch.nn.Module, data: Any, *, seed: int, batch_size: int) -> Result:
    """Next-token loss and accuracy of a causal language model on token sequences.

    Position ``t`` of each sequence predicts token ``t + 1`` (as
    :func:`nndiag.landscape._setup.lm_loss`). ``summary``: accuracy (top-1 next token), loss
    (mean cross-entropy over the predicted tokens), perplexity, n_samples (sequences),
    n_tokens, num_classes (vocabulary); table ``per_position`` (loss and accuracy by position
    in the context: a model that cannot use its context does no better late than early).
    """
    from nndiag.landscape._setup import logits_of

    t0 = time.perf_counter()
    losses, hits = [], []
    with _evaluating(module, data) as (x, dev):
        if x.ndim != 2 or x.shape[1] < 2:
            raise DataError(f"{data.name}: token sequences must be (sequences, T) with T >= 2, got {tuple(x.shape)}")
        for i in range(0, len(data), batch_size):
            xb = x[i:i + batch_size].to(dev)
            z = logits_of(module(xb))
            if z.ndim != 3 or tuple(z.shape[:2]) != tuple(xb.shape):
                raise DataError(f"{data.name}: the model's output has shape {tuple(z.shape)}; the next-token "
                                "evaluation needs (sequences, T, vocabulary) logits")
            if int(xb.max()) >= z.shape[-1]:
                raise DataError(f"{data.name}: token ids go up to {int(xb.max())} but the vocabulary has "
                                f"{z.shape[-1]} entries")
            z, target = z[:, :-1].float(), xb[:, 1:]
            losses.append(F.cross_entropy(z.transpose(1, 2), target, reduction="none").cpu())
            hits.append((z.argmax(-1) == target).cpu())
    lo, hit = torch.cat(losses).double().numpy(), torch.cat(hits).numpy()
    chance = chance_finding(float(hit.mean()), x[:, 1:].cpu().numpy(), what="next token", name=data.name)
    loss = float(lo.mean())
    per_position = pd.DataFrame({"name": [f"t={t + 1}" for t in range(lo.shape[1])],
                                 "position": np.arange(1, lo.shape[1] + 1),
                                 "loss": lo.mean(0), "accuracy": hit.mean(0)})
    summary = {"accuracy": float(hit.mean()), "loss": loss, "perplexity": float(np.exp(loss)),
               "n_samples": int(lo.shape[0]), "n_tokens": int(lo.size), "num_classes": int(z.shape[-1])}
    return Result(NAME, tables={"per_position": per_position}, summary=summary,
                  findings=[chance] if chance else [],
                  params={"batch_size": batch_size, "loss": "next_token_cross_entropy", "data": data.name},
                  seed=seed, timing={"total": time.perf_counter() - t0}, meta=provenance(str(dev)))


def _tick_style(names: list[str], axis_chars: int) -> dict[str, Any]:
    """Class names under an axis about ``axis_chars`` characters wide: slanted when the
    longest would not fit its slot (CIFAR-10's "automobile" under ten bars), else level."""
    if max(map(len, names), default=0) * len(names) > axis_chars:
        return {"rotation": 45, "ha": "right", "rotation_mode": "anchor"}
    return {"rotation": 0}


def figures(result: Result) -> dict[str, Any]:
    """Per-class accuracy bars and the confusion matrix, from the result's tables."""
    from matplotlib.figure import Figure

    figs: dict[str, Any] = {}
    pc = result.tables.get("per_class")
    if pc is not None and len(pc):
        fig = Figure(figsize=(5.5, 3.0), layout="constrained")
        ax = fig.add_subplot()
        acc = pc["accuracy"].astype(float).to_numpy()
        ax.bar(range(len(pc)), acc, color="#4c72b0")
        mean = result.summary.get("accuracy")
        if mean is not None:
            ax.axhline(mean, color="#c44e52", lw=1, ls="--", label=f"overall {mean:.3f}")
            ax.legend(loc="lower right", fontsize=8)
        names = [str(n) for n in pc["name"]]
        ax.set_xticks(range(len(pc)), names, fontsize=8, **_tick_style(names, 70))
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("true class")
        ax.set_ylabel("accuracy")
        ax.set_title("Accuracy per class")
        figs["per_class_accuracy"] = fig
    pp = result.tables.get("per_position")
    if pp is not None and len(pp):
        fig = Figure(figsize=(5.5, 3.0), layout="constrained")
        ax = fig.add_subplot()
        ax.plot(pp["position"].to_numpy(), pp["loss"].astype(float).to_numpy(), color="#4c72b0", marker=".")
        ax.set_xlabel("tokens of context")
        ax.set_ylabel("next-token loss")
        ax.set_title("Loss by position in the context")
        figs["loss_by_position"] = fig
    cm = result.tables.get("confusion")
    if cm is not None and len(cm):
        mat = cm.drop(columns=["name"]).to_numpy(dtype=float)
        norm = mat / np.maximum(mat.sum(1, keepdims=True), 1)
        fig = Figure(figsize=(4.2, 3.6), layout="constrained")
        ax = fig.add_subplot()
        im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
        fig.colorbar(im, ax=ax, shrink=0.8, label="share of the true class")
        ticks, names = range(len(cm)), [str(n) for n in cm["name"]]
        ax.set_xticks(ticks, names, fontsize=7, **_tick_style(names, 45))
        ax.set_yticks(ticks, names, fontsize=7)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title("Confusion matrix")
        figs["confusion"] = fig
    return figs
