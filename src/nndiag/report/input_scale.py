"""Is the model fed its inputs in the scale it was trained on?

A classic silent failure: a network trained on normalised images (e.g. ImageNet mean and
std, as most CIFAR ResNets are) evaluated on raw ``[0, 1]`` pixels. Nothing crashes; the
accuracy falls to little above chance (27–34 % instead of ~81 % for the CIFAR-10 ResNets
in ``../shared``), and every analysis that reads data — Hessian, landscape, slices — then
describes the model off its input distribution.

:func:`input_scale_finding` evaluates the model on a few hundred of the given examples as
they are and normalised each way the ``normalize=`` DATA option offers
(:data:`nndiag.io.data.NORMALIZATIONS`), and reports when one of them does much better.
It looks only where the mismatch is plausible: float inputs in ``[0, 1]`` that were not
normalised when loaded — or whole numbers in ``[0, 255]``, pixel values stored as floats,
which are also tried divided by 255 — and a classifier under the default cross-entropy.
For 3-channel images the best of these is also tried with the colour channels reversed
(BGR ↔ RGB: images read with OpenCV fed to a model trained on RGB, or the other way), and
so are the inputs as given.

``nndiag diagnose``, ``nndiag hessian`` and ``nndiag landscape`` run the check before their
analyses (:func:`check_data`, :func:`prepared`) and, when it fires, analyse the inputs so rescaled
(:func:`rescale`), saying so in the finding (:func:`applied`); ``--inputs as-given`` keeps the data
as given (the finding then only warns). The Python functions they call take the data as given.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nndiag.io.data import NORMALIZATIONS, normalize_inputs, reverse_channels
from nndiag.landscape._setup import logits_of
from nndiag.report.results import Finding

#: What the commands do when the check fires: rescale the data (``auto``) or keep them.
INPUTS = ("auto", "as-given")
#: Examples (the first ones, so that the check is deterministic) evaluated each way.
N_CHECK = 512
#: Report when a normalisation's mean loss is at most this fraction of the loss as given ...
LOSS_RATIO = 0.5
#: ... and its accuracy is higher by at least this much (absolute) ...
ACCURACY_GAIN = 0.10
#: ... or when its loss is at most this fraction on its own: a ReLU network keeps most argmax
#: decisions under a rescaled input (digits MLP: 94.9 % on 0–255 pixels, 96.9 % on [0, 1]) while
#: its loss explodes (21.4 vs 0.11), and every loss-based analysis with it.
LOSS_RATIO_ALONE = 0.1


def _scores(module: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``module`` (already in eval mode) on ``(x, y)``."""
    dev = next((p.device for p in module.parameters()), torch.device("cpu"))
    loss, correct = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(y), batch_size):
            out = logits_of(module(x[i:i + batch_size].to(dev)))
            yb = y[i:i + batch_size].to(dev)
            loss += float(F.cross_entropy(out.float(), yb, reduction="sum"))
            correct += int((out.argmax(1) == yb).sum())
    return loss / len(y), correct / len(y)


def input_scale_finding(module: nn.Module, x: torch.Tensor, y: torch.Tensor, *, normalize: str | None,
                        name: str = "data", batch_size: int = 256) -> tuple[Finding | None, dict[str, Any]]:
    """A warning when the model does much better on normalised inputs than on ``x`` as given.

    Parameters
    ----------
    module : nn.Module
        The classifier, in eval mode (the caller preserves its state).
    x, y : torch.Tensor
        Inputs as the model takes them and integer labels.
    normalize : str or None
        How the data were normalised when loaded (``DataBundle.meta["normalize"]``); the
        check runs only for ``"none"``/None.
    name : str
        The data's name, for the message.
    batch_size : int
        Examples per forward.

    Returns
    -------
    (Finding or None, dict)
        The ``EVAL-INPUT-SCALE`` warning (or None) and the scores behind it:
        ``{"as given": (loss, accuracy), "imagenet": ..., ...}`` for the normalisations
        that apply (empty when the check did not run).
    """
    if normalize not in (None, "none") or not x.is_floating_point() or x.ndim < 2 or len(y) < 2:
        return None, {}
    xs, ys = x[:N_CHECK], y[:N_CHECK]
    lo, hi = float(xs.min()), float(xs.max())
    # 0–255 pixel values stored as floats (a uint8 array would have been read as [0, 1])
    pixels = lo >= 0.0 and 1.5 < hi <= 255.0 and bool(torch.all(xs == xs.round()))
    if lo < 0.0 or (hi > 1.0 and not pixels):
        return None, {}  # not raw pixels or probabilities: nothing to suggest
    base = xs / 255.0 if pixels else xs
    # each variant: (divided by 255, normalize= option) — standardising ignores the scale
    variants: dict[str, tuple[bool, str]] = {"/255": (True, "none")} if pixels else {}
    for how in NORMALIZATIONS:
        if how != "standard" and (xs.ndim != 4 or xs.shape[1] != 3):
            continue  # the dataset statistics are for 3-channel images
        divide = pixels and how != "standard"
        variants[f"/255, {how}" if divide else how] = (divide, how)
    scores = {"as given": _scores(module, xs, ys, batch_size)}
    for key, (_, how) in variants.items():
        scores[key] = _scores(module, normalize_inputs(base, how, name=name), ys, batch_size)
    if xs.ndim == 4 and xs.shape[1] == 3:  # colour channels in the other order
        top = min(variants, key=lambda h: scores[h][0], default=None)
        flipped = {"as given, bgr": (False, "none")} if pixels else {"bgr": (False, "none")}
        if top is not None:
            flipped[f"{top}, bgr"] = variants[top]
        for key, (divide, how) in flipped.items():
            src = base if (divide or key == "bgr") else xs
            scores[key] = _scores(module, normalize_inputs(reverse_channels(src), how, name=name), ys, batch_size)
        variants = {**variants, **flipped}
    given_loss, given_acc = scores["as given"]
    best = min(variants, key=lambda h: scores[h][0], default=None)
    if best is None:
        return None, scores
    loss, acc = scores[best]
    if not ((loss <= LOSS_RATIO * given_loss and acc >= given_acc + ACCURACY_GAIN)
            or loss <= LOSS_RATIO_ALONE * given_loss):
        return None, scores
    divide, how = variants[best]
    bgr = best.endswith("bgr")
    told = describe(divide, how, bgr)
    finding = Finding(
        "EVAL-INPUT-SCALE", "warn",
        f"on the first {len(ys)} examples of {name} the model does much better with the inputs {told} "
        f"(loss {loss:.3g}, accuracy {acc:.1%}) than as given (loss {given_loss:.3g}, accuracy "
        f"{given_acc:.1%}): it was probably trained on inputs in that scale",
        {"normalize": how, "divide_by_255": divide, "bgr": bgr, "n_examples": len(ys),
         "scores": {h: {"loss": v[0], "accuracy": v[1]} for h, v in scores.items()}},
        f"{_fix(divide, how, bgr)}; the analyses that read data otherwise describe the model off its input "
        "distribution")
    return finding, scores


def describe(divide: bool, how: str, bgr: bool) -> str:
    """How inputs were changed, in words (``"divided by 255 and normalised as 'imagenet'"``)."""
    parts = (["divided by 255"] if divide else []) + ([f"normalised as '{how}'"] if how != "none" else []) + (
        ["in reversed colour-channel order (BGR ↔ RGB)"] if bgr else [])
    return " and ".join(parts)


def _fix(divide: bool, how: str, bgr: bool) -> str:
    """What the user should do to give the data in the scale the model takes."""
    query = "&".join(([f"normalize={how}"] if how != "none" else []) + (["bgr=1"] if bgr else []))
    option = f"DATA?{query}"
    if divide:
        return ("store the inputs as uint8 (nndiag reads them as [0, 1]) or divide them by 255"
                + (f", and pass the data as {option}" if query else ""))
    return f"pass the data as {option} (or prepare it as in training)"


def applied(finding: Finding, what: str = "every analysis of this report") -> Finding:
    """``finding`` (an ``EVAL-INPUT-SCALE``) as a command reports it after running ``what`` on the
    rescaled inputs (:func:`rescale`): ``evidence["applied"]`` is True."""
    ev = finding.evidence
    told = describe(ev["divide_by_255"], ev["normalize"], ev["bgr"])
    return Finding(
        finding.code, finding.severity,
        f"{finding.message}; {what} ran on the inputs {told} (--inputs as-given keeps them as given)",
        {**ev, "applied": True},
        f"{_fix(ev['divide_by_255'], ev['normalize'], ev['bgr'])}, for this and the other commands")


def rescale(bundle: Any, finding: Finding) -> Any:
    """The :class:`~nndiag.io.data.DataBundle` with its inputs as ``finding`` (an
    ``EVAL-INPUT-SCALE`` on it) says the model takes them: divided by 255, colour channels
    reversed and normalised as the DATA options ``bgr=1`` and ``normalize=`` do it, in that
    order (as :func:`input_scale_finding` tried them). ``meta["rescaled"]`` records what was done.
    """
    from nndiag.io.data import with_options

    ev = finding.evidence
    x = bundle.x.float() / 255.0 if ev["divide_by_255"] else bundle.x
    opts = ({"normalize": ev["normalize"]} if ev["normalize"] != "none" else {}) | (
        {"bgr": "1"} if ev["bgr"] else {})
    out = with_options(replace(bundle, x=x), opts)
    out.meta["rescaled"] = {k: ev[k] for k in ("divide_by_255", "normalize", "bgr")}
    return out


def check_data(module: nn.Module, bundle: Any, *, batch_size: int = 256) -> tuple[Finding | None, dict[str, Any]]:
    """:func:`input_scale_finding` for a model and a :class:`~nndiag.io.data.DataBundle`: the
    finding (or None) and the scores (empty when the check does not apply).

    The model is evaluated in eval mode without gradients and left exactly as it was; the
    inputs go through :func:`~nndiag.io.data.model_inputs` (token ids are never checked).
    """
    from nndiag._utils.model_state import preserved
    from nndiag.errors import DataError
    from nndiag.io.data import model_inputs

    if bundle is None or len(bundle) < 2:
        return None, {}
    with preserved(module, values=False):
        module.eval()
        try:
            x = model_inputs(module, bundle.x[:N_CHECK], name=bundle.name)
            return input_scale_finding(module, x, bundle.y[:N_CHECK], name=bundle.name, batch_size=batch_size,
                                       normalize=(bundle.meta or {}).get("normalize"))
        except (RuntimeError, ValueError, IndexError, DataError):
            return None, {}  # outputs that are not class logits for these labels: nothing to suggest


def prepared(module: nn.Module, bundle: Any, inputs: str = "auto", *, what: str = "the analysis",
             batch_size: int = 256) -> tuple[Any, Finding | None]:
    """The data a command's analysis should read, and the ``EVAL-INPUT-SCALE`` finding on them.

    ``nndiag hessian`` and ``nndiag landscape`` call this before their analysis: the curvature or
    landscape of a model fed inputs off its training scale describes the wrong function. With
    ``inputs="auto"`` a check that fires (:func:`check_data`) rescales the data (:func:`rescale`)
    and the finding says so (:func:`applied`); with ``"as-given"`` the data stay as given and the
    finding only warns. ``what`` names what ran on the rescaled data, in the finding.

    Raises
    ------
    InputError
        ``inputs`` is not one of :data:`INPUTS`.
    """
    from nndiag.errors import InputError

    if inputs not in INPUTS:
        raise InputError(f"unknown inputs '{inputs}'; choose one of {', '.join(INPUTS)}")
    finding = check_data(module, bundle, batch_size=batch_size)[0]
    if finding is None or inputs != "auto":
        return bundle, finding
    return rescale(bundle, finding), applied(finding, what)
