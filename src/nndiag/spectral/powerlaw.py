"""Continuous power-law fit of an ESD tail (Clauset, Shalizi & Newman 2009), vectorised.

For sorted eigenvalues ``x_0 ≤ … ≤ x_{n-1}`` (values ≤ ``thresh`` dropped), every
``x_i`` except the last is a candidate ``xmin``. With ``n_i = n − i`` tail values:

* ``α_i = 1 + n_i / Σ_{k≥i} ln(x_k / x_i)`` (continuous MLE), ``σ_i = (α_i − 1)/√n_i``;
* ``D_i = max_{k≥i} |1 − (x_k/x_i)^{1−α_i} − (k − i)/n_i|`` (KS distance, the
  empirical CDF taken at the left of each step, as WeightWatcher and the
  ``powerlaw`` package do);
* the fit is the candidate with the smallest ``D`` (candidates with ``α ≤ 1`` get
  ``D = 1``, as in WeightWatcher).

The MLE for every candidate comes from one suffix sum of ``ln x``; the KS distances
are computed in blocks of candidates × tail values with NumPy (no Python loop over
candidates). For :data:`PRUNE_MIN` values or more, candidates that cannot be the argmin
are first discarded: the KS maximum over a sample of a candidate's tail is a lower bound
of ``D_i``, and the exact D of the 16 candidates with the smallest bounds is an attained
value; candidates whose lower bound exceeds it are dropped. The first sample is eight
points of each candidate's own tail, later ones fixed grids refined on the survivors. The
chosen candidate and its ``D`` are exactly those of the full O(n²) computation (tested).

Options: ``min_tail`` (smallest tail allowed), ``xmin_range`` (restrict candidates),
``clip_top`` (drop the largest eigenvalues first), ``fix_fingers`` (``"xmin_peak"`` or
``"clip_xmax"``, done as WeightWatcher documents them), ``small_n="ww"`` (WeightWatcher
0.7.7's small-sample rule, used only in its conventions mode) and a truncated
power-law fit (:func:`fit_truncated_powerlaw`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from nndiag.errors import InputError

#: Eigenvalues at or below this are left out of the fit (WeightWatcher's ``EVALS_THRESH``).
EVALS_THRESH = 1e-5
FIX_FINGERS = (None, "xmin_peak", "clip_xmax")
_BLOCK_ELEMS = 1 << 21
#: Candidates (smallest lower bounds) whose exact D sets the pruning bar: 16 instead of 64 cut
#: the fits of ResNet56's and ResNet-18's 77 ESDs by 12 % (same fits; the bar barely moves).
_EXACT_TOP = 16
#: Fewest eigenvalues for which :func:`ks_distances_pruned` prunes. ResNet56's pooled conv
#: ESDs, per fit: 144 values 0.13 ms whole / 0.14–0.16 ms pruned; 288: 0.32–0.36 / 0.21–0.25;
#: 576: 1.01 / 0.27–0.33 (same argmin in every case).
PRUNE_MIN = 256


@dataclass(frozen=True)
class PowerLawFit:
    """The outcome of a power-law fit.

    Attributes
    ----------
    alpha, xmin, xmax, D, sigma : float
        Exponent, tail start, largest value fitted, KS distance, standard error of
        alpha. NaN when the fit failed.
    num_pl_spikes : int
        Number of eigenvalues ``≥ xmin`` (0 when failed).
    n_fit : int
        Number of values entering the fit (after threshold and clipping).
    status : str
        ``"success"`` or ``"failed"``.
    reason : str
        Why the fit failed ("" on success).
    num_fingers : int
        Top eigenvalues clipped by ``fix_fingers="clip_xmax"``.
    raw_alpha : float
        Alpha before ``fix_fingers`` (NaN when not used).
    xmins, alphas, Ds : ndarray
        Per-candidate values (empty unless ``keep_candidates=True``).
    """

    alpha: float
    xmin: float
    xmax: float
    D: float
    sigma: float
    num_pl_spikes: int
    n_fit: int
    status: str = "success"
    reason: str = ""
    num_fingers: int = 0
    raw_alpha: float = math.nan
    xmins: np.ndarray = field(default_factory=lambda: np.empty(0), repr=False)
    alphas: np.ndarray = field(default_factory=lambda: np.empty(0), repr=False)
    Ds: np.ndarray = field(default_factory=lambda: np.empty(0), repr=False)

    @property
    def ok(self) -> bool:
        """Whether the fit succeeded."""
        return self.status == "success"


def _failed(reason: str, n_fit: int = 0) -> PowerLawFit:
    nan = math.nan
    return PowerLawFit(nan, nan, nan, nan, nan, 0, n_fit, "failed", reason)


def candidate_alphas(x: np.ndarray, small_n: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """MLE exponent of every candidate ``xmin = x[i]`` (i < n−1) and the log-sum it uses.

    Parameters
    ----------
    x : ndarray
        Sorted, positive values.
    small_n : bool
        Use the bias-corrected ``(n_i − 1)`` numerator (WeightWatcher's small-N rule).

    Returns
    -------
    alphas, s : ndarray
        ``α_i`` and ``s_i = Σ_{k≥i} ln(x_k/x_i)`` for ``i = 0 … n−2``.
    """
    n = x.size
    logx = np.log(x)
    suffix = np.cumsum(logx[::-1])[::-1]  # Σ_{k≥i} ln x_k
    tail = (n - np.arange(n)).astype(np.float64)
    s = suffix[:-1] - tail[:-1] * logx[:-1]
    num = tail[:-1] - 1.0 if small_n else tail[:-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        alphas = 1.0 + num / s
    return alphas, s


def ks_distances(x: np.ndarray, alphas: np.ndarray, candidates: np.ndarray | None = None) -> np.ndarray:
    """KS distance ``D_i`` of each candidate's fitted tail, vectorised in blocks.

    Parameters
    ----------
    x : ndarray
        Sorted positive values (length n).
    alphas : ndarray
        Exponent of each candidate ``i = 0 … n−2``.
    candidates : ndarray of int, optional
        Indices to evaluate (others get ``inf``); all by default.

    Returns
    -------
    ndarray
        ``D_i`` (``1.0`` where ``α_i ≤ 1``; ``inf`` where not evaluated or α not finite).
    """
    n = x.size
    D = np.full(n - 1, np.inf)
    idx = np.arange(n - 1) if candidates is None else np.asarray(candidates, dtype=np.int64)
    a = alphas[idx]
    le1 = a <= 1.0
    D[idx[le1]] = 1.0
    idx = idx[np.isfinite(a) & ~le1]
    if idx.size == 0:
        return D
    logx = np.log(x)
    # blocks of ≥ 64 candidates, at most 1/8 of them, so each block starts near its own xmin
    # and the masked (k < i) part stays small
    step = max(1, min(_BLOCK_ELEMS // max(1, n), max(64, idx.size // 8)))
    for b0 in range(0, idx.size, step):
        blk = idx[b0 : b0 + step]
        lo = int(blk.min())
        k = np.arange(lo, n, dtype=np.float64)
        # (x_k/x_i)^(1−α) as exp((1−α)(ln x_k − ln x_i)), in place to spare temporaries
        work = np.subtract(logx[None, lo:], logx[blk, None])
        work *= (1.0 - alphas[blk])[:, None]
        np.minimum(work, 0.0, out=work)  # entries k < i (masked below) must not overflow
        np.exp(work, out=work)
        inv = 1.0 / (n - blk).astype(np.float64)
        # |1 − p − (k − i)/n_i| = |(1 + i/n_i) − p − k/n_i|
        work += k[None, :] * inv[:, None]
        np.subtract((1.0 + blk * inv)[:, None], work, out=work)
        np.abs(work, out=work)
        work[k[None, :] < blk[:, None]] = 0.0
        D[blk] = work.max(axis=1)
    return D


def _lower_bounds(x: np.ndarray, alphas: np.ndarray, cand: np.ndarray, stride: int) -> np.ndarray:
    """Lower bounds of ``D_i``: the KS maximum over the tail sampled every ``stride`` values
    (a subset of the points the exact ``D_i`` maximises over).

    Laid out (grid point, candidate), so the maximum runs over the first axis as element-wise
    maxima of long rows (a reduction over ~17-value rows, the coarse pass's shape, cost ~5×
    its arithmetic: ResNet-18's 4,608-value ESDs, 1.46 → 0.82 ms).
    """
    n = x.size
    logx = np.log(x)
    grid = np.unique(np.r_[np.arange(0, n, stride), n - 1])
    lg, gk = logx[grid][:, None], grid[:, None]
    lb = np.empty(cand.size)
    step = max(1, _BLOCK_ELEMS // max(1, grid.size))
    for b0 in range(0, cand.size, step):
        blk = cand[b0 : b0 + step]
        # points at or below x_i contribute 0: clip both terms there instead of masking
        rel = lg - logx[blk][None, :]
        np.maximum(rel, 0.0, out=rel)
        rel *= (1.0 - alphas[blk])[None, :]
        F = np.expm1(rel, out=rel)  # −F(x_k)
        E = (gk - blk[None, :]).astype(np.float64)
        np.maximum(E, 0.0, out=E)
        E *= (1.0 / (n - blk))[None, :]
        F += E  # E − F
        np.abs(F, out=F)
        lb[b0 : b0 + step] = F.max(axis=0)
    return lb


#: Points per candidate of the first, tail-relative lower-bound pass (:func:`_tail_bounds`).
_TAIL_POINTS = 8


def _tail_bounds(x: np.ndarray, alphas: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """Lower bounds of ``D_i`` from :data:`_TAIL_POINTS` points of each candidate's own tail.

    The points sit at fractions ``1/8, 2/8, …, 1`` of tail ``i`` (a fixed grid leaves a
    candidate near the top of the spectrum one or two points of its tail). On random-init
    ResNet-18 ESDs (4,608 values, best xmin near the top) this leaves ~30 candidates where
    a 16-point fixed grid left ~550, at half its cost; on power-law samples it is looser,
    and the fixed-grid passes of :func:`ks_distances_pruned` follow on what is left.
    """
    n = x.size
    logx = np.log(x)
    ni = (n - cand).astype(np.float64)
    frac = np.arange(1, _TAIL_POINTS + 1, dtype=np.float64)[:, None] / _TAIL_POINTS
    k = cand[None, :] + np.floor(frac * (ni[None, :] - 1.0)).astype(np.int64)  # (points, candidates)
    rel = logx[k] - logx[cand][None, :]
    rel *= (1.0 - alphas[cand])[None, :]
    F = np.expm1(rel, out=rel)  # −F(x_k)
    F += (k - cand[None, :]) / ni[None, :]  # E − F
    np.abs(F, out=F)
    return F.max(axis=0)


def ks_distances_pruned(x: np.ndarray, alphas: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """:func:`ks_distances` for the candidates that can be the argmin; ``inf`` for the others.

    Candidates whose lower bound (:func:`_tail_bounds` on every candidate, then
    :func:`_lower_bounds` on finer grids) exceeds the exact ``D`` of another candidate cannot
    have the smallest ``D`` and are skipped; the rest are computed exactly, so the chosen
    candidate and its ``D`` equal the full computation's.
    """
    n = x.size
    cand = np.asarray(cand, dtype=np.int64)
    a = alphas[cand]
    good = np.isfinite(a) & (a > 1.0)
    if n < PRUNE_MIN or good.sum() < 64:
        return ks_distances(x, alphas, cand)
    gc = cand[good]
    stride = max(2, int(np.sqrt(n)))
    # each candidate's own tail first, then fixed grids, coarse to fine, on the survivors: every
    # 16th value when that is at least twice as coarse as √n (ResNet-18's 4,608-value ESDs: the
    # all-candidate bound pass was 2 of 2.4 ms; 12 % less over the large ResNet-18/56 ESDs)
    strides = ([n // 16] if n // 16 >= 2 * stride else []) + [stride] + ([stride // 4] if stride // 4 >= 8 else [])
    bounds = [lambda g: _tail_bounds(x, alphas, g)] + [
        lambda g, st=st: _lower_bounds(x, alphas, g, st) for st in strides]
    best = np.inf
    for bound in bounds:
        lb = bound(gc)
        # the exact D of the most promising candidates (smallest lower bounds, O(n) each) is an
        # attained value, so no candidate whose lower bound exceeds it can be the argmin (a
        # tighter bar than sampled upper bounds, and half the work of computing those)
        top = gc[np.argpartition(lb, _EXACT_TOP)[:_EXACT_TOP]] if lb.size > _EXACT_TOP else gc
        best = min(best, float(ks_distances(x, alphas, top)[top].min()))
        gc = gc[lb <= best * (1 + 1e-9) + 1e-15]
        if gc.size <= 64:
            break
    return ks_distances(x, alphas, np.r_[cand[~good], gc])


def _fit_sorted(x: np.ndarray, *, min_tail: int, xmin_range: tuple[float, float] | None,
                small_n: bool, keep: bool) -> PowerLawFit | str:
    n = x.size
    if n < 2:
        return f"too few positive eigenvalues to fit ({n})"
    alphas, s = candidate_alphas(x, small_n=small_n)
    tail = n - np.arange(n - 1)
    ok = np.ones(n - 1, dtype=bool)
    if min_tail > 1:
        ok &= tail >= min_tail
    if xmin_range is not None:
        lo, hi = xmin_range
        ok &= (x[:-1] >= lo) & (x[:-1] <= hi)
    if small_n:
        ok &= s > 1e-12
    cand = np.flatnonzero(ok)
    if cand.size == 0:
        return "no admissible xmin candidate (tail too short or xmin range empty)"
    D = ks_distances_pruned(x, alphas, cand)
    # WeightWatcher 0.7.7's small-N code scores candidates by J = D − 0.868/√n, but its
    # caller (WWFit.__init__) then re-selects by argmin D: the effective rule is argmin D.
    score = D
    if not np.isfinite(score[cand]).any():
        return "no candidate gave a finite fit (all tail values equal?)"
    i = int(np.argmin(np.where(ok, score, np.inf)))
    a = float(alphas[i])
    if not math.isfinite(a) or a <= 1.0:
        return f"fitted exponent {a:.3g} is not > 1"
    sig = (a - 1.0) / math.sqrt(tail[i])
    return PowerLawFit(
        alpha=a, xmin=float(x[i]), xmax=float(x[-1]), D=float(D[i]), sigma=float(sig),
        num_pl_spikes=0, n_fit=n,
        xmins=x[:-1].copy() if keep else np.empty(0),
        alphas=alphas if keep else np.empty(0),
        Ds=D if keep else np.empty(0),
    )


def _with(fit: PowerLawFit, **kw: object) -> PowerLawFit:
    return PowerLawFit(**{**fit.__dict__, **kw})


def fit_powerlaw(
    evals: np.ndarray,
    *,
    thresh: float = EVALS_THRESH,
    min_tail: int = 1,
    xmin_range: tuple[float, float] | None = None,
    clip_top: int = 0,
    fix_fingers: str | None = None,
    xmin_max: float | None = None,
    max_fingers: int = 10,
    finger_thresh: float = 1.0,
    small_n: str | None = None,
    keep_candidates: bool = False,
) -> PowerLawFit:
    """Fit a continuous power law to the tail of an ESD (CSN, argmin KS distance).

    Parameters
    ----------
    evals : array-like
        Eigenvalues (any order). Values ``≤ thresh`` are ignored, non-finite values
        make the fit fail.
    thresh : float
        Lower cut (WeightWatcher: 1e-5).
    min_tail : int
        Smallest number of tail values a candidate xmin may leave (1 = CSN as is).
    xmin_range : (float, float), optional
        Only candidates with ``lo ≤ xmin ≤ hi``.
    clip_top : int
        Drop the ``clip_top`` largest eigenvalues before fitting (``xmax`` handling).
    fix_fingers : {None, "xmin_peak", "clip_xmax"}
        ``xmin_peak``: xmin restricted to ``[0.95·peak, xmin_max or 1.5·peak]`` where
        ``peak`` is the mode of a 100-bin histogram of ``log10 λ`` (bounds in linear
        units, unlike WeightWatcher 0.7.7's mixed log/linear bounds).
        ``clip_xmax``: refit after dropping the top ``k = 1 … max_fingers`` values and
        keep the first fit whose alpha is more than ``finger_thresh`` below the
        original; stop (keeping the original) when alpha falls to 2 or below.
    xmin_max, max_fingers, finger_thresh
        Options of ``fix_fingers``.
    small_n : {None, "ww"}
        ``"ww"``: for fewer than 20 values use WeightWatcher 0.7.7's small-sample
        rule as it takes effect: bias-corrected ``α = 1 + (n_i − 1)/Σ ln(x/xmin)``,
        tails of at least 8 values, selection by smallest D (its ``D − 0.868/√n``
        score is computed but then overridden by its caller).
    keep_candidates : bool
        Keep per-candidate ``xmins``, ``alphas`` and ``Ds`` in the result (for plots).

    Returns
    -------
    PowerLawFit

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> x = (1 - rng.random(5000)) ** (-1 / 2.0)   # Pareto, alpha = 3
    >>> round(fit_powerlaw(x).alpha, 1)
    3.0
    """
    if fix_fingers not in FIX_FINGERS:
        raise InputError(f"unknown fix_fingers '{fix_fingers}'; choose xmin_peak or clip_xmax")
    if small_n not in (None, "ww"):
        raise InputError(f"unknown small_n '{small_n}'; choose None or 'ww'")
    ev = np.asarray(evals, dtype=np.float64).ravel()
    if ev.size and not np.isfinite(ev).all():
        return _failed("non-finite eigenvalues")
    ev = np.sort(ev)
    x = ev[ev > thresh]
    if clip_top:
        if clip_top >= x.size / 2:
            return _failed(f"clip_top={clip_top} would remove half the eigenvalues or more", x.size)
        x = x[:-clip_top]
    use_small = small_n == "ww" and x.size < 20
    kw = dict(min_tail=8 if use_small else min_tail, small_n=use_small, keep=keep_candidates)

    if fix_fingers == "xmin_peak" and x.size >= 2:
        h, edges = np.histogram(np.log10(x), bins=100)
        peak = 10 ** edges[int(np.argmax(h))]
        hi = 1.5 * peak if xmin_max is None else float(xmin_max)
        xmin_range = (0.95 * peak, hi) if xmin_range is None else xmin_range
    out = _fit_sorted(x, xmin_range=xmin_range, **kw)
    if isinstance(out, str):
        return _failed(out, x.size)
    fit = out
    if fix_fingers == "clip_xmax":
        raw = fit.alpha
        chosen, fingers = fit, 0
        for k in range(1, max(1, int(max_fingers)) + 1):
            if x.size - k < 2:
                break
            f = _fit_sorted(x[:-k], xmin_range=xmin_range, **kw)
            if isinstance(f, str):
                break
            if f.alpha + finger_thresh < raw:
                chosen, fingers = f, k
                break
            if f.alpha <= 2.0:
                break
        fit = _with(chosen, num_fingers=fingers, raw_alpha=raw)
    return _with(fit, num_pl_spikes=int(np.count_nonzero(ev >= fit.xmin)))
