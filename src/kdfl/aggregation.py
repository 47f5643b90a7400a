"""Aggregation rules: plain functions over stacked client uploads.

Every rule has the signature ``fn(x, w, **hyper) -> Tensor`` with ``x: (n, d)`` float
(one row per client: a flattened weight delta, or flattened (N, C) logits) and
``w: (n,)`` non-negative client weights (usually ``num_examples``); it returns ``(d,)``.
The same functions serve weights and logits; :func:`aggregate_tensors` does the
stacking and reshaping.

Which rules use ``w``: every rule that *averages* (``mean``, ``trimmed_mean``,
``multi_krum``, ``geometric_median``, ``centered_clipping``) weights by ``w``; the rules
that *select* (``median``, ``krum``, ``bulyan``) ignore it. Client weights are claimed by
the clients, so pass uniform weights when Byzantine clients could inflate theirs.

Sources:
    - median, trimmed mean: Yin, Chen, Ramchandran, Bartlett, Byzantine-Robust
      Distributed Learning: Towards Optimal Statistical Rates, ICML 2018.
    - Krum, Multi-Krum: Blanchard, El Mhamdi, Guerraoui, Stainer, Machine Learning with
      Adversaries: Byzantine Tolerant Gradient Descent, NeurIPS 2017.
    - Bulyan: El Mhamdi, Guerraoui, Rouault, The Hidden Vulnerability of Distributed
      Learning in Byzantium, ICML 2018.
    - geometric median (RFA, smoothed Weiszfeld): Pillutla, Kakade, Harchaoui, Robust
      Aggregation for Federated Learning, IEEE TSP 2022; epfml/byzantine-robust-optimizer
      ``codes/aggregator/rfa.py``.
    - centered clipping: Karimireddy, He, Jaggi, Learning from History for
      Byzantine Robust Optimization, ICML 2021.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from kdfl.registry import Check, Option, Registry, is_int, is_real, signature_options
from kdfl.types import KdflError

Aggregator = Callable[..., Tensor]


# ---------------------------------------------------------------------------------------
# hyperparameters
# ---------------------------------------------------------------------------------------

# hyperparameter -> what it accepts; one table for every rule that has it, used both by
# make_aggregator and by the rules themselves (so direct calls are checked too)
_CHECKS: dict[str, Check] = {
    "beta": Check(lambda v: is_real(v) and 0 <= v < 0.5, "a number in [0, 0.5)"),
    "f": Check(lambda v: is_int(v) and v >= 0, "an integer >= 0"),
    "m": Check(lambda v: v is None or (is_int(v) and v >= 1), "None (meaning n - f) or an integer >= 1"),
    "tau": Check(lambda v: is_real(v) and v > 0, "a finite number > 0"),
    "iters": Check(lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    "nu": Check(lambda v: is_real(v) and v > 0, "a finite number > 0"),
    "eps": Check(lambda v: is_real(v) and v >= 0, "a finite number >= 0"),
    "init": Check(lambda v: v is None or isinstance(v, Tensor), "None or a (d,) tensor"),
}


def _hyperparameters(fn: Aggregator) -> dict[str, Option]:
    """A rule's hyperparameters: everything after ``x`` and ``w``."""
    return signature_options(fn, skip=("x", "w"), checks=_CHECKS)


def _check_xw(x: Tensor, w: Tensor | Sequence[float], owner: str, *, need_weight: bool) -> Tensor:
    """Validate ``x: (n, d)`` and ``w: (n,)``; return ``w`` as ``x``'s dtype and device."""
    if not isinstance(x, Tensor) or x.dim() != 2 or not x.is_floating_point():
        what = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
        raise KdflError(f"{owner}: x must be a (clients, d) float tensor, got {what}")
    n = x.shape[0]
    if n == 0:
        raise KdflError(f"{owner}: no client uploads to aggregate (x has 0 rows)")
    w = torch.as_tensor(w, dtype=x.dtype, device=x.device)
    if w.shape != (n,):
        raise KdflError(f"{owner}: w must have shape ({n},) to match x {tuple(x.shape)}, got {tuple(w.shape)}")
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise KdflError(f"{owner}: client weights must be finite and >= 0, got {w.tolist()[:8]}")
    if need_weight and float(w.sum()) <= 0:
        raise KdflError(f"{owner}: client weights sum to 0; at least one client needs weight > 0")
    return w


def _byzantine_precondition(owner: str, n: int, f: int, mult: int) -> None:
    """Raise unless ``n >= mult*f + 3`` (Krum: mult=2, Bulyan: mult=4)."""
    if n >= mult * f + 3:
        return
    best_f = (n - 3) // mult
    fix = f"lower f to {best_f} or " if best_f >= 0 else ""
    raise KdflError(
        f"{owner} needs n >= {mult}f+3 clients (got n={n}, f={f}): "
        f"{fix}sample at least {mult * f + 3} clients per round"
    )


# ---------------------------------------------------------------------------------------
# the rules
# ---------------------------------------------------------------------------------------


def _median(x: Tensor) -> Tensor:
    """Coordinate-wise median of ``x: (n, d)``; for even n the mean of the two middle values."""
    n = x.shape[0]
    s = x.sort(dim=0).values  # (n, d)
    return (s[(n - 1) // 2] + s[n // 2]) / 2


def mean(x: Tensor, w: Tensor) -> Tensor:
    """Weighted mean ``sum_i w_i x_i / sum_i w_i`` (FedAvg). Breakdown point 0."""
    w = _check_xw(x, w, "mean", need_weight=True)
    return (w / w.sum()) @ x  # (d,)


def median(x: Tensor, w: Tensor) -> Tensor:
    """Coordinate-wise median (Yin et al., ICML 2018); ignores ``w``.

    For even n each coordinate is the average of the two middle values (not torch's
    lower median), so the result is symmetric in the clients. Tolerates fewer than n/2
    arbitrary rows per coordinate.
    """
    _check_xw(x, w, "median", need_weight=False)
    return _median(x)


def trimmed_mean(x: Tensor, w: Tensor, *, beta: float = 0.1) -> Tensor:
    """Coordinate-wise trimmed mean (Yin et al., ICML 2018).

    Per coordinate, drop the ``b = floor(beta * n)`` largest and ``b`` smallest values and
    average the remaining ``n - 2b``, weighted by the weights of the clients that
    supplied them (so ``beta=0`` is exactly :func:`mean`).

    Args:
        x: (n, d) uploads.
        w: (n,) client weights.
        beta: trim fraction per side (β), in [0, 0.5); tolerates ``f <= floor(beta n)``.
    """
    AGGREGATORS.check("trimmed_mean", beta=beta)
    w = _check_xw(x, w, "trimmed_mean", need_weight=True)
    n = x.shape[0]
    b = math.floor(beta * n)
    s, idx = x.sort(dim=0)  # (n, d) each
    ws = w[idx]  # (n, d): the weight of the client behind each sorted value
    s, ws = s[b : n - b], ws[b : n - b]
    total = ws.sum(dim=0)  # (d,)
    # coordinates whose surviving clients all have weight 0 fall back to the plain mean
    plain = s.mean(dim=0)
    out = (ws * s).sum(dim=0) / total.clamp_min(torch.finfo(x.dtype).tiny)
    return torch.where(total > 0, out, plain)


def _sq_dists(x: Tensor) -> Tensor:
    """(n, n) squared Euclidean distances, computed without the matmul shortcut (exact)."""
    return torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist") ** 2


def _krum_scores(d2: Tensor, f: int) -> Tensor:
    """Krum scores ``(n,)``: sum of squared distances to the ``n - f - 2`` nearest others.

    ``d2`` is an (n, n) squared-distance matrix; with few rows left (Bulyan's recursion)
    the neighbour count is clamped to ``[1, n - 1]``.
    """
    n = d2.shape[0]
    k = min(max(n - f - 2, 1), n - 1)
    d2 = d2.clone()
    d2.fill_diagonal_(math.inf)
    return d2.sort(dim=1).values[:, :k].sum(dim=1)


def krum(x: Tensor, w: Tensor, *, f: int) -> Tensor:
    """Krum (Blanchard et al., NeurIPS 2017): the upload with the lowest score.

    ``score(i) = sum of ||x_i - x_j||^2 over the n - f - 2 nearest j != i``; ties go to
    the lowest index. Ignores ``w``.

    Args:
        x: (n, d) uploads.
        w: (n,) client weights (unused).
        f: number of Byzantine clients to tolerate; needs ``n >= 2f + 3``.
    """
    AGGREGATORS.check("krum", f=f)
    _check_xw(x, w, "krum", need_weight=False)
    _byzantine_precondition("krum", x.shape[0], f, 2)
    scores = _krum_scores(_sq_dists(x), f)  # (n,)
    return x[int(scores.argmin())].clone()


def multi_krum(x: Tensor, w: Tensor, *, f: int, m: int | None = None) -> Tensor:
    """Multi-Krum (Blanchard et al., NeurIPS 2017): weighted mean of the ``m`` uploads with
    the lowest Krum scores.

    Args:
        x: (n, d) uploads.
        w: (n,) client weights, used to average the selected uploads.
        f: number of Byzantine clients to tolerate; needs ``n >= 2f + 3``.
        m: how many uploads to average; ``None`` means ``n - f``. ``m=1`` is Krum.
    """
    AGGREGATORS.check("multi_krum", f=f, m=m)
    w = _check_xw(x, w, "multi_krum", need_weight=False)
    n = x.shape[0]
    _byzantine_precondition("multi_krum", n, f, 2)
    m = n - f if m is None else m
    if m > n:
        raise KdflError(f"multi_krum: m={m} exceeds the number of clients n={n}; use m <= {n} (or m=None)")
    scores = _krum_scores(_sq_dists(x), f)  # (n,)
    chosen = scores.argsort(stable=True)[:m]  # (m,)
    wc = w[chosen]
    if float(wc.sum()) <= 0:  # selected clients all weigh 0: plain average
        wc = torch.ones_like(wc)
    return (wc / wc.sum()) @ x[chosen]


def bulyan(x: Tensor, w: Tensor, *, f: int) -> Tensor:
    """Bulyan (El Mhamdi et al., ICML 2018); ignores ``w``.

    (1) Select ``theta = n - 2f`` uploads by applying Krum recursively (each pick is
    removed before the next; the neighbour count is clamped to at least 1 once few
    uploads remain). (2) Per coordinate, average the ``theta - 2f`` selected values
    closest to the coordinate-wise median of the selection.

    Args:
        x: (n, d) uploads.
        w: (n,) client weights (unused).
        f: number of Byzantine clients to tolerate; needs ``n >= 4f + 3``.
    """
    AGGREGATORS.check("bulyan", f=f)
    _check_xw(x, w, "bulyan", need_weight=False)
    n = x.shape[0]
    _byzantine_precondition("bulyan", n, f, 4)
    theta = n - 2 * f
    d2 = _sq_dists(x)  # (n, n)
    remaining, selected = list(range(n)), list[int]()
    while len(selected) < theta:
        idx = torch.tensor(remaining, device=x.device)
        pick = int(_krum_scores(d2[idx][:, idx], f).argmin()) if len(remaining) > 1 else 0
        selected.append(remaining.pop(pick))
    sel = x[torch.tensor(selected, device=x.device)]  # (theta, d)
    med = _median(sel)  # (d,)
    keep = theta - 2 * f
    near = (sel - med).abs().topk(keep, dim=0, largest=False).indices  # (keep, d)
    return sel.gather(0, near).mean(dim=0)


def geometric_median(
    x: Tensor, w: Tensor, *, iters: int = 10, nu: float = 0.1, eps: float = 1e-6
) -> Tensor:
    """Weighted geometric median by smoothed Weiszfeld iterations (RFA, Pillutla et al.).

    Approximates ``argmin_z sum_i a_i max(nu, ||z - x_i||)`` with ``a_i = w_i / sum w``:
    ``b_i = a_i / max(nu, ||z - x_i||)``, ``z <- sum_i b_i x_i / sum_i b_i``. The start
    ``z_0`` is the coordinate-wise median (robust, so few iterations suffice; the fixed
    point does not depend on it). Stops early when ``||z_new - z|| <= eps * max(1, ||z||)``.

    Args:
        x: (n, d) uploads.
        w: (n,) client weights (α_i after normalisation).
        iters: maximum number of Weiszfeld iterations (T).
        nu: smoothing (ν): distances below ``nu`` count as ``nu`` (code default 0.1).
        eps: relative tolerance for stopping early; 0 runs all ``iters``.
    """
    AGGREGATORS.check("geometric_median", iters=iters, nu=nu, eps=eps)
    w = _check_xw(x, w, "geometric_median", need_weight=True)
    a = w / w.sum()  # (n,)
    z = _median(x)  # (d,)
    for _ in range(iters):
        b = a / (x - z).norm(dim=1).clamp_min(nu)  # (n,)
        z_new = (b / b.sum()) @ x  # (d,)
        done = float((z_new - z).norm()) <= eps * max(1.0, float(z.norm()))
        z = z_new
        if done:
            break
    return z


def centered_clipping(
    x: Tensor, w: Tensor, *, tau: float, iters: int = 1, init: Tensor | None = None
) -> Tensor:
    """Centered clipping (Karimireddy, He, Jaggi, ICML 2021).

    Repeats ``iters`` (L) times: ``v <- v + sum_i a_i clip_tau(x_i - v)`` with
    ``clip_tau(u) = u * min(1, tau / ||u||)`` and ``a_i = w_i / sum w`` (the paper's 1/n
    for uniform weights).

    Args:
        x: (n, d) uploads.
        w: (n,) client weights.
        tau: clipping radius (τ), in the units of ``x``; epfml sweeps {0.1, 10, 1000}.
        iters: clipping iterations (L).
        init: the starting centre ``v``, normally the previous round's aggregate. When
            None (no history) the coordinate-wise median of ``x`` is used, so a first
            round is not dragged by outliers.
    """
    AGGREGATORS.check("centered_clipping", tau=tau, iters=iters, init=init)
    w = _check_xw(x, w, "centered_clipping", need_weight=True)
    a = w / w.sum()  # (n,)
    if init is None:
        v = _median(x)
    else:
        if init.shape != x.shape[1:]:
            raise KdflError(f"centered_clipping: init must have shape {tuple(x.shape[1:])}, got {tuple(init.shape)}")
        v = init.to(dtype=x.dtype, device=x.device)
    for _ in range(iters):
        u = x - v  # (n, d)
        scale = (tau / u.norm(dim=1, keepdim=True)).clamp(max=1.0)  # (n, 1); ||u||=0 -> inf -> 1
        v = v + a @ (u * scale)
    return v


AGGREGATORS: Registry[Aggregator] = Registry(
    "aggregator",
    {
        "mean": mean,
        "median": median,
        "trimmed_mean": trimmed_mean,
        "krum": krum,
        "multi_krum": multi_krum,
        "bulyan": bulyan,
        "geometric_median": geometric_median,
        "centered_clipping": centered_clipping,
    },
    word="hyperparameter",
    positional=True,  # "krum:2" means f=2
    options_of=_hyperparameters,
)


def make_aggregator(name: str, **hyper: Any) -> Callable[[Tensor, Tensor], Tensor]:
    """The rule ``name`` with its hyperparameters bound: ``fn(x, w) -> (d,)``.

    A bare value from a spec string (``"krum:2"`` gives ``_=2``) binds the rule's first
    hyperparameter. Checks everything that does not depend on the number of clients now
    (the name, the hyperparameter names and their ranges); ``n``-dependent preconditions
    such as Krum's ``n >= 2f + 3`` are checked when the rule is called.

    Raises:
        KdflError: unknown rule (with close matches), unknown or missing hyperparameter,
            or a value out of range.
    """
    return functools.partial(AGGREGATORS.get(name), **AGGREGATORS.bind(name, hyper))


def aggregate_tensors(
    fn: Callable[[Tensor, Tensor], Tensor], tensors: Sequence[Tensor], w: Tensor | Sequence[float]
) -> Tensor:
    """Apply ``fn`` to same-shaped client tensors (e.g. (N, C) logits or flat deltas).

    Args:
        fn: an aggregator with its hyperparameters bound (see :func:`make_aggregator`).
        tensors: one tensor per client, all of the same shape ``S``.
        w: (n,) client weights.

    Returns:
        The aggregate, of shape ``S``.
    """
    if len(tensors) == 0:
        raise KdflError("aggregate_tensors: no client tensors to aggregate")
    shape = tensors[0].shape
    for i, t in enumerate(tensors):
        if t.shape != shape:
            raise KdflError(f"aggregate_tensors: tensor {i} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    x = torch.stack([t.reshape(-1) for t in tensors])  # (n, prod(S))
    return fn(x, torch.as_tensor(w)).reshape(shape)
