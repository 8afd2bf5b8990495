"""Zero-cost proxies: predict how well an *untrained* architecture will train.

GradSign (:func:`gradsign`, reference loop and a fast batched path with the same integer
score), the standard proxies (:mod:`nndiag.zerocost.proxies`: grad_norm, snip, grasp,
fisher, synflow, jacob_cov, nwot, zen, params, flops), a rank-aggregated vote, the
NAS-Bench-201 search space (:mod:`nndiag.zerocost.nb201`) and an evaluation harness
(:func:`evaluate`) that correlates the proxies with benchmark accuracy.

Examples
--------
>>> import torch
>>> from nndiag.zerocost import gradsign
>>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
>>> x, y = torch.randn(8, 3, 2, 2), torch.randint(0, 3, (8,))
>>> gradsign(net, x, y) <= 36 * 8
True
"""

from __future__ import annotations

from nndiag._utils.lazy import lazy_exports

# imported eagerly: the function ``gradsign`` shares its name with its module, and a lazy
# attribute would be shadowed by the submodule once anything imports it
from nndiag.zerocost.gradsign import GradSignDetail as GradSignDetail
from nndiag.zerocost.gradsign import gradsign as gradsign
from nndiag.zerocost.gradsign import gradsign_detail as gradsign_detail

_LAZY = {
    "proxies": "nndiag.zerocost.proxies:",
    "compute_proxies": "nndiag.zerocost.score:compute_proxies",
    "PROXY_NAMES": "nndiag.zerocost.score:PROXY_NAMES",
    "evaluate": "nndiag.zerocost.evaluate:evaluate",
    "score_archs": "nndiag.zerocost.evaluate:score_archs",
    "correlations": "nndiag.zerocost.evaluate:correlations",
    "rank_vote": "nndiag.zerocost.evaluate:rank_vote",
    "rank_models": "nndiag.zerocost.rank:rank_models",
    "reinitialised": "nndiag.zerocost.rank:reinitialised",
}

__all__ = sorted([*_LAZY, "gradsign", "gradsign_detail", "GradSignDetail"])

__getattr__, __dir__ = lazy_exports(__name__, globals(), _LAZY, __all__)
