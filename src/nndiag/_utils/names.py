"""Matching parameter names between two models of the same architecture."""

from __future__ import annotations

from nndiag.errors import InputError


def matching_names(ours: list[str], theirs: list[str]) -> dict[str, str] | None:
    """Our parameter names → the other model's, allowing one wrapper prefix on either side.

    Checkpoints of the same architecture often differ by a prefix: ``module.`` from
    ``DataParallel``, ``model.`` from a Lightning module or nndiag's own Hugging Face
    wrapper (:class:`~nndiag.io.hf.HFLogits`) against the folder's tensor names. Returns
    None when no single prefix (added to or removed from every name) matches all names;
    names of ``theirs`` outside the match are left out of the mapping.

    Raises
    ------
    AmbiguousNames
        When several prefixes match (the same architecture stored twice: a model and its EMA
        copy, a student and a teacher): nndiag does not guess which one is meant.

    Examples
    --------
    >>> matching_names(["model.fc.weight"], ["fc.weight", "fc.bias"])
    {'model.fc.weight': 'fc.weight'}
    >>> matching_names(["fc.weight"], ["module.fc.weight"])
    {'fc.weight': 'module.fc.weight'}
    """
    have = set(theirs)
    missing = [k for k in ours if k not in have]
    if not missing:
        return {k: k for k in ours}
    k0 = missing[0]
    parts = k0.split(".")
    options = [("strip", ".".join(parts[:i]) + ".") for i in range(1, len(parts))]
    options += [("add", t[: -len(k0)]) for t in theirs if t.endswith("." + k0)]
    found: dict[str, dict[str, str]] = {}
    for how, prefix in options:
        if how == "strip":
            names = {k: k[len(prefix):] for k in ours if k.startswith(prefix)}
            if len(names) != len(ours):
                continue
        else:
            names = {k: prefix + k for k in ours}
        if all(v in have for v in names.values()):
            found.setdefault(("-" if how == "strip" else "+") + prefix, names)
    if len(found) > 1:  # e.g. a student and a teacher, or a model and its EMA copy
        raise AmbiguousNames([p[1:] for p in found])
    return next(iter(found.values()), None)


class AmbiguousNames(InputError):
    """The other model's names match under several prefixes (:attr:`prefixes`)."""

    def __init__(self, prefixes: list[str]) -> None:
        self.prefixes = prefixes
        super().__init__(f"the checkpoint holds this architecture under several prefixes "
                         f"({', '.join(repr(p) for p in prefixes)}); choose one as FILE#PREFIX, "
                         f"e.g. FILE#{prefixes[0]}")
