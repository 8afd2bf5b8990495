"""The probe contract: how ``nndiag diagnose`` runs each analysis family.

A probe is a module (e.g. ``nndiag.spectral.probe``) that defines:

``NAME: str``
    The probe's name (also ``Result.kind``), e.g. ``"spectral"``.
``NEEDS_DATA: bool``
    Whether it needs a DATA set; probes needing data are skipped (with a note) without one.
``run(model: LoadedModel, data: DataBundle | None, *, seed: int, device: torch.device, **options) -> Result``
    Computes the analysis and returns a :class:`~nndiag.report.results.Result` with findings.
    It must leave the user's model as it was (see ``nndiag._utils.model_state.preserved``).
``figures(result: Result) -> dict[str, matplotlib.figure.Figure]``
    Pictures built **only** from the result's tables/summary/params, so that a report
    re-renders from its JSON without recomputation.

:data:`PROBE_MODULES` lists the probes in report order; a probe whose module does
not exist yet is skipped. ``evaluation`` (accuracy, loss and confusion on the given
data) is the report's own probe; the others are the analysis families.

Optional attributes a probe may define: ``OPTIONS: dict[str, str]`` (option name →
how to give it, e.g. ``{"second_seed": "--second-seed CKPT"}``) for keyword options
its ``run`` requires; without them it is skipped with that hint. ``COMPARE: tuple[str, ...]``
(summary keys) picks the metrics shown side by side when several models are diagnosed
(default: every float in the summary). Shared inputs (``loss``, ``second_seed``) reach
only the probes whose ``run`` names them as parameters. ``TRAIN_DATA: bool`` says the
probe reads the model's *training* data (a Hessian at the minimum, the failure-mode
diagnosis); when the user gives ``train_data`` (``--train-data``) those probes get it
and the others get ``data``. :data:`TRAIN_DATA_PROBES` is the default for probes that
do not say. ``TOKENS: bool`` says the probe also runs on token sequences (a causal language
model's data, ``DataBundle.meta["tokens"]``, with the next-token loss); the others are
skipped there.
"""

from __future__ import annotations

import importlib
from types import ModuleType

PROBE_MODULES: dict[str, str] = {
    "evaluation": "nndiag.report.evaluation",
    "spectral": "nndiag.spectral.probe",
    "hessian": "nndiag.landscape.probe_hessian",
    "landscape": "nndiag.landscape.probe_landscape",
    "mdtree": "nndiag.diagnosis.probe",
    "zerocost": "nndiag.zerocost.probe",
    "slices": "nndiag.slices.probe",
}

#: Probes that read the training data by default (``TRAIN_DATA`` in the module overrides).
TRAIN_DATA_PROBES: frozenset[str] = frozenset({"hessian", "landscape", "mdtree"})


def wants_train_data(name: str, module: ModuleType) -> bool:
    """Whether probe ``name`` should get the training data when it is given."""
    return bool(getattr(module, "TRAIN_DATA", name in TRAIN_DATA_PROBES))


def load_probe(name: str) -> ModuleType | None:
    """The probe module for ``name``, or None when that family is not built."""
    target = PROBE_MODULES.get(name)
    if target is None:
        return None
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as exc:
        if exc.name == target:
            return None
        raise
