"""The Spotlight (d'Eon et al., FAccT 2022), reimplemented from the paper and made robust.

A spotlight is a kernel over the representation space, ``k_i = max(1 − τ‖x_i − μ‖², 0)``
(``"quadratic"``) or ``exp(−τ‖x_i − μ‖²/2)`` (``"gaussian"``), with a spherical (scalar)
or diagonal precision τ. It maximises the kernel-weighted mean loss
``Σ k_i ℓ_i / (Σ k_i + ε)`` subject to ``Σ k_i ≥ S`` through the quadratic barrier
``b·((W − (S + m))/m)²`` (active when ``W < S + m``) whose margin ``m`` shrinks
geometrically from ``N − S`` to ``0.05·S``. Adam on ``(μ, log τ)``; the learning rate
halves after ``patience`` steps without improvement.

Robustness beyond the paper (REFERENCES: the reference code collapses onto outliers and
its plateau schedule freezes the rate):

- default ``solver="exact"``: the barrier's target ``W = S + m`` is held exactly — the
  overall scale of τ is solved at every step (exactly, from the sorted distances, for the
  quadratic kernel; by bisection for the Gaussian) and Adam moves μ (and the shape of a
  diagonal τ) along the implicit total gradient; with ``free_size`` the target may grow
  above ``S + m`` when that raises the mean loss (the inequality allows it).
  ``solver="barrier"`` is the paper's penalty, with the weight ``b`` multiplied by the loss
  range so that the trade-off does not depend on the loss scale;
- ``ε`` in the weight sum keeps the objective finite when the weights vanish;
- the embeddings are centred and divided by their RMS distance to the centroid (one
  scalar: the geometry is kept), optionally after PCA;
- several restarts run at once (vectorised): the centroid, annealed from the whole data as
  in the paper, and the points of highest k-nearest-neighbour mean loss, annealed from a
  neighbourhood of 4·S; the best one that keeps its size wins;
- the margin shrinks over the first ``anneal`` (70 %) of the steps; the plateau schedule
  (on the weighted mean loss) runs after that, and the rate never falls below
  ``lr·min_lr_ratio``;
- a spotlight whose total weight ends below ``0.9·S`` is reported as failed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from nndiag._utils.threads import limit_threads
from nndiag.errors import InputError
from nndiag.slices.base import Slices, check_losses, resolve_size
from nndiag.slices.embeddings import validate

Kernel = Literal["quadratic", "gaussian"]
Precision = Literal["spherical", "diagonal"]
KERNELS = ("quadratic", "gaussian")
PRECISIONS = ("spherical", "diagonal")
SOLVERS = ("exact", "barrier")
#: Gaussian-kernel weights at or above this count as members (k ≥ e^{-2}: within 2 "sigmas").
GAUSSIAN_SUPPORT = math.exp(-2.0)


@dataclass(frozen=True)
class Projector:
    """Centre, optional PCA and one scale: the space the spotlights live in."""

    mean: np.ndarray
    components: np.ndarray | None
    scale: float

    def __call__(self, z: np.ndarray) -> np.ndarray:
        x = np.asarray(z, dtype=np.float64) - self.mean
        if self.components is not None:
            x = x @ self.components.T
        return x / self.scale

    @classmethod
    def fit(cls, z: np.ndarray, pca: int | None = None) -> Projector:
        """Fit on embeddings ``z`` (N, D); ``pca`` keeps that many principal components."""
        mean = z.mean(axis=0)
        xc = z - mean
        comps = None
        if pca is not None:
            if pca < 1:
                raise InputError(f"pca must be a positive number of components, got {pca}")
            if pca < z.shape[1]:
                _, _, vt = np.linalg.svd(xc, full_matrices=False)
                comps = vt[:pca]
                xc = xc @ comps.T
        scale = float(np.sqrt(np.mean(np.sum(xc**2, axis=1))))
        return cls(mean, comps, scale if scale > 0 else 1.0)


def kernel_weights(x: np.ndarray, mu: np.ndarray, tau: np.ndarray | float,
                   kernel: Kernel = "quadratic") -> np.ndarray:
    """Spotlight weights of points ``x`` (N, D) for centre ``mu`` and precision ``tau``.

    ``tau`` is a scalar (spherical) or a length-D vector (diagonal).

    Examples
    --------
    >>> kernel_weights(np.array([[0.0], [1.0], [3.0]]), np.array([0.0]), 0.25)
    array([1.  , 0.75, 0.  ])
    """
    d2 = np.sum(np.asarray(tau) * (x - mu) ** 2, axis=-1)
    if kernel == "gaussian":
        return np.exp(-0.5 * d2)
    return np.maximum(1.0 - d2, 0.0)


def _sqdist(x: torch.Tensor, mu: torch.Tensor, tau: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_j τ_j (x_ij − μ_rj)² for every (r, i), by matrix products (R, N); τ None → 1."""
    if tau is None:
        return torch.cdist(mu, x).pow(2)
    d2 = (x * x) @ tau.T - 2.0 * (x @ (tau * mu).T) + (tau * mu * mu).sum(1)[None]
    return d2.T.clamp_min(0.0)


def _weights_t(x: torch.Tensor, mu: torch.Tensor, log_tau: torch.Tensor, kernel: str) -> torch.Tensor:
    # x (N, D); mu (R, D); log_tau (R, 1) spherical or (R, D) diagonal -> (R, N)
    tau = log_tau.exp()
    d2 = tau * _sqdist(x, mu) if tau.shape[1] == 1 else _sqdist(x, mu, tau)
    if kernel == "gaussian":
        return torch.exp(-0.5 * d2)
    return torch.clamp(1.0 - d2, min=0.0)


def spotlight_objective(x: torch.Tensor, losses: torch.Tensor, mu: torch.Tensor, log_tau: torch.Tensor,
                        size: float, margin: float | torch.Tensor, barrier: float, eps: float = 1e-6,
                        kernel: str = "quadratic") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The penalised objective (to maximise) of R spotlights at once.

    Parameters
    ----------
    x : Tensor (N, D)
    losses : Tensor (N,)
    mu : Tensor (R, D)
    log_tau : Tensor (R, 1) or (R, D)
    size : float
        The minimum total weight S.
    margin : float or Tensor (R,)
        The current barrier margin m.
    barrier : float
        The barrier weight b (already scaled to the loss range).
    eps : float
        Added to the weight sum.
    kernel : {"quadratic", "gaussian"}

    Returns
    -------
    objective, mean_loss, total_weight : Tensor (R,)
        ``mean_loss − b·((W − (S + m))/m)²·[W < S + m]``, the weighted mean loss and ``W``.
    """
    k = _weights_t(x, mu, log_tau, kernel)
    w = k.sum(1)
    mean_loss = (k @ losses) / (w + eps)
    gap = torch.clamp(size + margin - w, min=0.0)
    return mean_loss - barrier * (gap / margin) ** 2, mean_loss, w


def _initial_centres(x: np.ndarray, losses: np.ndarray, size: float, restarts: int,
                     rng: np.random.Generator) -> np.ndarray:
    """The centroid plus the candidate points of highest k-NN mean loss, spread apart."""
    n = len(x)
    centres = [np.zeros(x.shape[1])]
    if restarts <= 1:
        return np.stack(centres)
    k = int(min(max(5, round(size)), n - 1))
    cand = rng.choice(n, size=min(n, 512), replace=False)
    sq = (x * x).sum(1)
    d2 = np.maximum(sq[cand, None] - 2.0 * (x[cand] @ x.T) + sq[None], 0.0)
    nn_idx = np.argpartition(d2, k, axis=1)[:, :k]
    local = losses[nn_idx].mean(1)
    order = cand[np.argsort(-local)]
    # greedily pick high-local-loss candidates that are not among each other's neighbours
    taken: list[int] = []
    radius2 = np.partition(d2, k, axis=1)[:, k]
    rad = dict(zip(cand.tolist(), radius2.tolist(), strict=True))
    for i in order:
        if len(taken) >= restarts - 1:
            break
        if all(((x[i] - x[j]) ** 2).sum() > rad[int(j)] for j in taken):
            taken.append(int(i))
    centres += [x[i] for i in taken]
    return np.stack(centres)


def _scale_for_weight(d2: torch.Tensor, target: torch.Tensor, kernel: str, iters: int = 50) -> torch.Tensor:
    """Per row of ``d2`` (R, N), the log-scale ``s`` with ``Σ k(e^s·d2) = target``.

    Quadratic kernel: exact, from the sorted distances (with the k nearest points inside,
    ``W = k − c·Σ_{j≤k} d2_j``, so ``c = (k − target)/Σ_{j≤k} d2_j`` where it is consistent).
    Gaussian kernel: bisection.
    """
    target = torch.as_tensor(target, dtype=d2.dtype).reshape(-1).expand(d2.shape[0])
    if kernel == "quadratic":
        srt, _ = torch.sort(d2.clamp_min(1e-300), dim=1)
        csum = torch.cumsum(srt, 1)
        k = torch.arange(1, d2.shape[1] + 1, dtype=d2.dtype)
        c = (k - target[:, None]) / csum  # candidate scale with exactly the k nearest inside
        nxt = torch.cat([srt[:, 1:], torch.full_like(srt[:, :1], math.inf)], 1)
        ok = (c > 0) & (c * srt < 1.0) & (c * nxt >= 1.0)
        # the smallest consistent k (W is continuous and strictly monotone, so it is unique)
        idx = torch.argmax(ok.to(torch.int8), dim=1)
        cc = c.gather(1, idx[:, None])[:, 0]
        return torch.log(cc.clamp_min(1e-300))
    lo = torch.full((d2.shape[0],), -60.0, dtype=d2.dtype)
    hi = torch.full((d2.shape[0],), 60.0, dtype=d2.dtype)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        w = torch.exp(-0.5 * mid.exp()[:, None] * d2).sum(1)
        big = w > target  # weight falls as the scale grows
        lo = torch.where(big, mid, lo)
        hi = torch.where(big, hi, mid)
    return 0.5 * (lo + hi)


def _adam(params: tuple[torch.Tensor, ...], grads: tuple[torch.Tensor, ...], state: list[Any],
          rates: torch.Tensor, t: int, scales: tuple[float, ...]) -> None:
    beta1, beta2, eps = 0.9, 0.99, 1e-8
    for p, g, (m1, m2), sc in zip(params, grads, state, scales, strict=True):
        g = torch.nan_to_num(g)
        m1.mul_(beta1).add_(g, alpha=1 - beta1)
        m2.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        mhat = m1 / (1 - beta1 ** (t + 1))
        vhat = m2 / (1 - beta2 ** (t + 1))
        p.sub_(sc * rates[:, None] * mhat / (vhat.sqrt() + eps))


def fit_spotlight(
    x: np.ndarray,
    losses: np.ndarray,
    size: float,
    *,
    kernel: Kernel = "quadratic",
    precision: Precision = "spherical",
    solver: str = "exact",
    steps: int = 1000,
    lr: float = 0.02,
    patience: int = 20,
    barrier: float = 1.0,
    eps: float = 1e-6,
    restarts: int = 4,
    min_lr_ratio: float = 1e-2,
    anneal: float = 0.7,
    free_size: bool = True,
    seed: int = 0,
    trace: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Fit one spotlight on prepared (projected) points.

    Parameters
    ----------
    x : ndarray (N, D)
        Points in the spotlight space (see :class:`Projector`).
    losses : ndarray (N,)
        Losses to seek (already down-weighted / flipped by the caller).
    size : float
        Minimum total weight S (a count).
    solver : {"exact", "barrier"}
        ``barrier``: the paper's penalty, Adam on (μ, log τ). ``exact``: the barrier's target
        ``W = S + m`` held exactly — the overall scale of τ is solved by bisection at every
        step and Adam moves μ (and the shape of a diagonal τ) along the total (implicit)
        gradient. Both anneal ``m`` from ``N − S`` to ``0.05·S``.
    free_size : bool
        ``exact`` solver: let the target grow above ``S + m`` (by a factor ``1 + softplus(g)``,
        ``g`` learnt along ``∂(mean loss)/∂W``) when a larger region has a higher mean loss,
        as the barrier's inequality allows; otherwise ``W = S + m`` exactly.
    kernel, precision, steps, lr, patience, barrier, eps, restarts, min_lr_ratio, anneal, seed
        See :func:`spotlight`.
    trace : list, optional
        Receives a record every 50 steps (for debugging and tests).

    Returns
    -------
    dict
        ``mu`` (D,), ``tau`` (scalar or (D,)), ``weight`` (Σk), ``mean_loss``, ``failed``,
        ``restart``, ``lr`` (final learning rate), ``weights`` (N,).
    """
    if solver not in SOLVERS:
        raise InputError(f"unknown solver '{solver}'; valid: {', '.join(SOLVERS)}")
    # small tensors: one thread is fastest, and immune to oversubscribed machines
    with limit_threads(1):
        return _fit(x, losses, size, kernel, precision, solver, steps, lr, patience, barrier, eps,
                    restarts, min_lr_ratio, anneal, free_size, seed, trace)


def _fit(x: np.ndarray, losses: np.ndarray, size: float, kernel: str, precision: str, solver: str,
         steps: int, lr: float, patience: int, barrier: float, eps: float, restarts: int,
         min_lr_ratio: float, anneal: float, free_size: bool, seed: int,
         trace: list[dict[str, Any]] | None) -> dict[str, Any]:
    n, d = x.shape
    rng = np.random.default_rng(seed)
    loss_range = check_losses(losses)
    xt = torch.as_tensor(x, dtype=torch.float64)
    lt = torch.as_tensor(losses, dtype=torch.float64)
    mu0 = _initial_centres(x, losses, size, restarts, rng)
    r = len(mu0)
    # the centroid restart anneals from the whole data (margin N − S, as in the paper); the
    # restarts at high-local-loss points anneal from a local neighbourhood (margin ≤ 4·S),
    # so that they explore their own region instead of drifting to the global optimum
    m_end = 0.05 * size
    m_start = torch.full((r,), max(n - size, 1e-9), dtype=torch.float64)
    m_start[1:] = torch.clamp(m_start[1:], max=max(4.0 * size, m_end))
    d2_0 = _sqdist(xt, torch.as_tensor(mu0, dtype=torch.float64))
    log_tau0 = _scale_for_weight(d2_0, (size + m_start).clamp(max=0.999 * n), kernel).numpy()
    width = 1 if precision == "spherical" else d
    mu = torch.tensor(mu0, dtype=torch.float64, requires_grad=True)
    log_tau = torch.tensor(np.repeat(log_tau0[:, None], width, axis=1), dtype=torch.float64,
                           requires_grad=True)
    if solver == "exact":
        with torch.no_grad():
            log_tau.zero_()  # only the shape (mean zero) is a parameter; the scale is solved
    b = barrier * loss_range
    rates = torch.full((r,), float(lr), dtype=torch.float64)
    best = torch.full((r,), -math.inf, dtype=torch.float64)
    wait = torch.zeros(r, dtype=torch.long)
    grow = torch.full((r, 1), -4.0 if free_size else -math.inf, dtype=torch.float64)
    params = (mu, log_tau, grow)
    state = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
    # the count inside a ball grows like radius^d: slow log tau down with the dimension
    scales = (1.0, 1.0 / max(1.0, d / 2), 1.0 if free_size else 0.0)
    for t in range(steps):
        frac = min(1.0, t / max(1.0, anneal * steps - 1))
        margin = m_start * (m_end / m_start) ** frac
        if solver == "barrier":
            obj, mean_loss, w = spotlight_objective(xt, lt, mu, log_tau, size, margin, b, eps, kernel)
            grads = (*torch.autograd.grad(-obj.sum(), (mu, log_tau)), torch.zeros_like(grow))
        else:
            shape = log_tau - log_tau.mean(1, keepdim=True)
            with torch.no_grad():
                d2 = _sqdist(xt, mu, None if width == 1 else shape.exp())
                factor = 1.0 + torch.nn.functional.softplus(grow[:, 0])
                s0 = _scale_for_weight(d2, (size + margin) * factor, kernel)
            s = s0.clone().requires_grad_(True)
            _, mean_loss, w = spotlight_objective(xt, lt, mu, shape + s[:, None], size, margin, b, eps,
                                                  kernel)
            gl = torch.autograd.grad(mean_loss.sum(), (mu, log_tau, s), retain_graph=True)
            gw = torch.autograd.grad(w.sum(), (mu, log_tau, s))
            # implicit function theorem: ds/dθ = −(∂W/∂θ)/(∂W/∂s) keeps W fixed
            ratio = (gl[2] / torch.where(gw[2].abs() > 1e-30, gw[2], torch.full_like(gw[2], -1e-30)))
            grads = tuple(-(a - ratio[:, None] * c) for a, c in zip(gl[:2], gw[:2], strict=True))
            # d(mean loss)/d(target W) = ratio; the target is (S + m)(1 + softplus(g))
            g_grow = -(ratio * (size + margin) * torch.sigmoid(grow[:, 0]))[:, None]
            grads = (*grads, g_grow if free_size else torch.zeros_like(grow))
        with torch.no_grad():
            _adam(params, grads, state, rates, t, scales)
            # plateau on the weighted mean loss, once the margin has reached its floor: the
            # penalised value falls as the margin shrinks, which would freeze the rate early
            improved = mean_loss > best + 1e-9 * loss_range
            best = torch.where(improved, mean_loss.detach(), best)
            wait = torch.where(improved, torch.zeros_like(wait), wait + 1)
            halve = (wait >= patience) & (frac >= 1.0)
            rates = torch.where(halve, torch.clamp(rates / 2, min=lr * min_lr_ratio), rates)
            wait = torch.where(halve, torch.zeros_like(wait), wait)
            if trace is not None and t % 50 == 0:
                trace.append({"step": t, "margin": margin, "mean_loss": mean_loss.tolist(),
                              "weight": w.tolist(), "lr": rates.tolist()})
    with torch.no_grad():
        final_log_tau = log_tau
        if solver == "exact":
            shape = log_tau - log_tau.mean(1, keepdim=True)
            d2 = _sqdist(xt, mu, None if width == 1 else shape.exp())
            factor = 1.0 + torch.nn.functional.softplus(grow[:, 0])
            final_log_tau = shape + _scale_for_weight(d2, (size + m_end) * factor, kernel)[:, None]
        _, mean_loss, w = spotlight_objective(xt, lt, mu, final_log_tau, size, m_end, b, eps, kernel)
    ok = (w >= 0.9 * size).numpy()
    ml = mean_loss.numpy()
    i = int(np.argmax(np.where(ok, ml, -np.inf))) if ok.any() else int(np.argmax(w.numpy()))
    tau = final_log_tau.detach()[i].exp().numpy()
    tau_out: np.ndarray | float = float(tau[0]) if precision == "spherical" else tau
    mu_i = mu.detach()[i].numpy().copy()
    return {
        "mu": mu_i, "tau": tau_out, "weight": float(w[i]), "mean_loss": float(ml[i]),
        "failed": not bool(ok[i]), "restart": i, "restarts": r, "lr": float(rates[i]),
        "weights": kernel_weights(x, mu_i, tau_out, kernel),
    }


def _support(k: np.ndarray, kernel: str) -> np.ndarray:
    return k > 0 if kernel == "quadratic" else k >= GAUSSIAN_SUPPORT


def spotlight(
    embeddings: Any,
    losses: Any = None,
    size: float = 0.02,
    n: int = 5,
    *,
    kernel: Kernel = "quadratic",
    precision: Precision = "spherical",
    flip: bool = False,
    pca: int | None = None,
    steps: int = 1000,
    lr: float = 0.02,
    patience: int = 20,
    barrier: float = 1.0,
    eps: float = 1e-6,
    restarts: int = 4,
    solver: str = "exact",
    free_size: bool = True,
    min_lr_ratio: float = 1e-2,
    anneal: float = 0.7,
    seed: int = 0,
) -> Slices:
    """Find ``n`` spotlights: regions of the representation space with high mean loss.

    Parameters
    ----------
    embeddings : array (N, D) or Embeddings
        Representations (an :class:`~nndiag.slices.embeddings.Embeddings` carries its losses).
    losses : array (N,), optional
        Per-example losses (required with a plain array).
    size : float
        Minimum spotlight size S: a fraction of N (< 1) or a count. Default 2 %.
    n : int
        Number of spotlights, found in turn; each multiplies the losses by ``1 − k/max k``
        of the spotlights before it.
    kernel : {"quadratic", "gaussian"}
        ``max(1 − τ‖x−μ‖², 0)`` or ``exp(−τ‖x−μ‖²/2)``.
    precision : {"spherical", "diagonal"}
        Scalar τ or one τ per dimension.
    flip : bool
        Seek regions of unusually *low* loss instead.
    pca : int, optional
        Project the embeddings on this many principal components first.
    steps, lr, patience : int, float, int
        Adam steps, initial learning rate, plateau patience (halve the rate).
    barrier : float
        Barrier weight, in units of the loss range.
    eps : float
        Added to the weight sum.
    restarts : int
        Starting points tried per spotlight (the best that keeps its size wins): the
        centroid and points of highest k-nearest-neighbour mean loss.
    solver : {"exact", "barrier"}
        How the size constraint is handled (see :func:`fit_spotlight`).
    free_size : bool
        Let a spotlight grow above the size when that raises its mean loss.
    min_lr_ratio : float
        Floor of the learning rate, as a fraction of ``lr`` (0: none, as in the paper).
    anneal : float
        Fraction of the steps over which the margin shrinks (then the plateau schedule runs).
    seed : int
        Seeds the choice of restart candidates.

    Returns
    -------
    Slices
        ``method="spotlight"``; ``info`` holds each spotlight's centre, precision, total
        weight, mean loss, restart and final learning rate.

    Raises
    ------
    InputError
        NaN embeddings, fewer examples than the size, constant losses, bad options.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> z = rng.normal(size=(400, 2)); loss = (np.linalg.norm(z - 2, axis=1) < 1).astype(float)
    >>> s = spotlight(z, loss, size=0.05, n=1, steps=300)
    >>> bool(s.failed[0])
    False
    """
    from nndiag.slices.embeddings import Embeddings

    if isinstance(embeddings, Embeddings):
        losses = embeddings.losses if losses is None else losses
        embeddings = embeddings.z
    if losses is None:
        raise InputError("spotlight needs per-example losses (losses=...)")
    z, loss = validate(embeddings, losses)
    if kernel not in KERNELS:
        raise InputError(f"unknown kernel '{kernel}'; valid: {', '.join(KERNELS)}")
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision '{precision}'; valid: {', '.join(PRECISIONS)}")
    if n < 1:
        raise InputError(f"n must be at least 1, got {n}")
    if steps < 1 or lr <= 0 or patience < 1 or barrier <= 0 or eps <= 0 or restarts < 1:
        raise InputError("steps, lr, patience, barrier, eps and restarts must be positive")
    s = resolve_size(size, len(z))
    check_losses(loss)
    proj = Projector.fit(z, pca)
    x = proj(z)
    work = (loss.max() - loss) if flip else loss.copy()
    fits: list[dict[str, Any]] = []
    for j in range(n):
        if float(work.max() - work.min()) <= 1e-12 * max(1.0, float(np.abs(work).max())):
            fits.append({"mu": np.zeros(x.shape[1]), "tau": 0.0, "weight": 0.0, "mean_loss": float("nan"),
                         "failed": True, "restart": -1, "restarts": 0, "lr": lr,
                         "weights": np.zeros(len(x))})
            continue
        fit = fit_spotlight(x, work, s, kernel=kernel, precision=precision, solver=solver,
                            steps=steps, lr=lr, patience=patience, barrier=barrier, eps=eps,
                            restarts=restarts, free_size=free_size, min_lr_ratio=min_lr_ratio,
                            anneal=anneal, seed=seed + j)
        fits.append(fit)
        k = fit["weights"]
        if k.max() > 0:
            work = work * (1.0 - k / k.max())
    centres = [f["mu"] for f in fits]
    taus = [f["tau"] for f in fits]

    def scorer(new: Any) -> tuple[np.ndarray, np.ndarray]:
        zz = new.z if isinstance(new, Embeddings) else validate(new, np.zeros(len(new)))[0]
        xx = proj(zz)
        w = np.stack([kernel_weights(xx, c, t, kernel) if np.any(np.asarray(t) > 0)
                      else np.zeros(len(xx)) for c, t in zip(centres, taus, strict=True)])
        return w, _support(w, kernel)

    weights = np.stack([f["weights"] for f in fits])
    info = [{k: v for k, v in f.items() if k != "weights"} for f in fits]
    params = {"size": size, "size_count": s, "n": n, "kernel": kernel, "precision": precision,
              "flip": flip, "pca": pca, "steps": steps, "lr": lr, "patience": patience,
              "barrier": barrier, "eps": eps, "restarts": restarts, "solver": solver,
              "free_size": free_size, "min_lr_ratio": min_lr_ratio, "anneal": anneal}
    return Slices("spotlight", weights, _support(weights, kernel), tuple(bool(f["failed"]) for f in fits),
                  scorer, params, info)
