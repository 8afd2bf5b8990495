"""Settings read from the environment."""

from __future__ import annotations

import os


def env_count(name: str) -> int | None:
    """A count from environment variable ``name`` (at least 1), or None when it is unset or
    not a whole number.

    Examples
    --------
    >>> import os
    >>> os.environ["NNDIAG_EXAMPLE_COUNT"] = "0"
    >>> env_count("NNDIAG_EXAMPLE_COUNT"), env_count("NNDIAG_UNSET_EXAMPLE")
    (1, None)
    """
    value = os.environ.get(name)
    if not value:
        return None
    try:
        return max(1, int(value))
    except ValueError:
        return None
