"""Byzantine clients: attacks on uploads and on local data.

Upload attacks act on the round's uploads stacked as ``x: (n, d)`` (flattened deltas or
logits) with ``malicious: (n,) bool`` and an explicit ``rng: torch.Generator``:
``fn(x, malicious, rng, **hyper) -> x'`` returns a new tensor in which only the
malicious rows differ. *Omniscient* attacks (``alie``, ``ipm``, ``min_max``,
``min_sum``) compute their statistics from the honest rows ``x[~malicious]`` and send the
same tensor from every malicious client (collusion). The data attack
:func:`flip_labels` poisons a malicious client's labels before local training.

Sources:
    - ALIE: Baruch, Baruch, Goldberg, A Little Is Enough: Circumventing Defenses for
      Distributed Learning, NeurIPS 2019; z as in epfml/byzantine-robust-optimizer
      ``codes/attacks/alittle.py``.
    - IPM: Xie, Koyejo, Gupta, Fall of Empires: Breaking Byzantine-tolerant SGD by Inner
      Product Manipulation, UAI 2019.
    - min-max, min-sum: Shejwalkar, Houmansadr, Manipulating the Byzantine: Optimizing
      Model Poisoning Attacks and Defenses for Federated Learning, NDSS 2021
      (vrt1shjwlkr/NDSS21-Model-Poisoning).
    - sign flip, scaling, Gaussian noise, label flipping: standard baselines (e.g.
      epfml ``codes/attacks/bitflipping.py``, FutabatedLearning ``labelflip_attack``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from kdfl.registry import Check, Option, Registry, is_int, is_real, signature_options
from kdfl.types import KdflError

# hyperparameter -> what it accepts; ``dev`` and ``mode`` are checked against their
# Literal annotations, which differ per attack
_CHECKS: dict[str, Check] = {
    "scale": Check(lambda v: is_real(v) and v >= 0, "a finite number >= 0"),
    "lam": Check(is_real, "a finite number"),
    "sigma": Check(lambda v: is_real(v) and v >= 0, "a finite number >= 0"),
    "z": Check(lambda v: v is None or is_real(v), "None (computed from n and f) or a finite number"),
    "eps": Check(is_real, "a finite number"),
    "gamma_init": Check(lambda v: is_real(v) and v > 0, "a finite number > 0"),
    "tol": Check(lambda v: is_real(v) and v > 0, "a finite number > 0"),
}
# what the engine supplies to an attack: not hyperparameters
_INPUTS = ("x", "malicious", "rng", "y", "num_classes")


def _check_xm(x: Tensor, malicious: Tensor, owner: str) -> Tensor:
    """Validate ``x: (n, d)`` float and ``malicious: (n,)``; return the mask as bool on x's device."""
    if not isinstance(x, Tensor) or x.dim() != 2 or not x.is_floating_point():
        what = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
        raise KdflError(f"{owner}: x must be a (clients, d) float tensor, got {what}")
    mask = torch.as_tensor(malicious, device=x.device)
    if mask.shape != (x.shape[0],) or mask.dtype != torch.bool:
        raise KdflError(f"{owner}: malicious must be a ({x.shape[0]},) bool mask, got {tuple(mask.shape)} {mask.dtype}")
    return mask


def _honest(x: Tensor, mask: Tensor, owner: str) -> Tensor:
    """The honest rows ``(n - f, d)``; omniscient attacks need at least one."""
    h = x[~mask]
    if h.shape[0] == 0:
        raise KdflError(f"{owner} computes statistics over honest clients, but all {x.shape[0]} are malicious")
    return h


def _replace(x: Tensor, mask: Tensor, rows: Tensor) -> Tensor:
    """A copy of ``x`` with the malicious rows replaced by ``rows`` ((f, d) or (d,))."""
    out = x.clone()
    out[mask] = rows.to(x.dtype)
    return out


def sign_flip(x: Tensor, malicious: Tensor, rng: torch.Generator | None, *, scale: float = 1.0) -> Tensor:
    """Each malicious client sends ``-scale * x_i`` (negated logits / flipped update)."""
    ATTACKS.check("sign_flip", scale=scale)
    mask = _check_xm(x, malicious, "sign_flip")
    return _replace(x, mask, -scale * x[mask])


def scaled(x: Tensor, malicious: Tensor, rng: torch.Generator | None, *, lam: float = 10.0) -> Tensor:
    """Each malicious client sends ``lam * x_i`` (over-confident teacher / boosted update)."""
    ATTACKS.check("scaled", lam=lam)
    mask = _check_xm(x, malicious, "scaled")
    return _replace(x, mask, lam * x[mask])


def gaussian(
    x: Tensor,
    malicious: Tensor,
    rng: torch.Generator,
    *,
    sigma: float = 1.0,
    mode: Literal["replace", "add"] = "replace",
) -> Tensor:
    """Gaussian noise: ``x_i' ~ N(0, sigma^2 I)`` (``replace``) or ``x_i + N(0, sigma^2 I)`` (``add``).

    Each malicious row gets its own draw from ``rng`` (same generator state, same noise).
    """
    ATTACKS.check("gaussian", sigma=sigma, mode=mode)
    mask = _check_xm(x, malicious, "gaussian")
    if not isinstance(rng, torch.Generator):
        raise KdflError("gaussian: pass an explicit torch.Generator as rng (kdfl never draws from global state)")
    f = int(mask.sum())
    noise = torch.randn((f, x.shape[1]), generator=rng, dtype=x.dtype, device=rng.device).to(x.device)
    noise = sigma * noise  # (f, d)
    return _replace(x, mask, noise if mode == "replace" else x[mask] + noise)


def alie_z(n: int, f: int) -> float:
    """ALIE's ``z_max`` as in epfml ``alittle.py``.

    ``s = floor(n/2 + 1) - f``, ``z = Phi^-1((n - f - s) / (n - f))`` with Phi the standard
    normal CDF. The probability is clamped to ``[1e-6, 1 - 1e-6]`` so that z stays finite
    (|z| <= 4.75), e.g. when the attackers are a majority. (n=20, f=4) gives 0.157.
    """
    if n - f <= 0:
        raise KdflError(f"alie: needs at least one honest client (n={n}, f={f})")
    s = math.floor(n / 2 + 1) - f
    p = min(max((n - f - s) / (n - f), 1e-6), 1 - 1e-6)
    return float(torch.special.ndtri(torch.tensor(p, dtype=torch.float64)))


def alie(x: Tensor, malicious: Tensor, rng: torch.Generator | None, *, z: float | None = None) -> Tensor:
    """A Little Is Enough (Baruch et al., NeurIPS 2019): ``mu - z * sigma`` coordinate-wise.

    ``mu`` and ``sigma`` (unbiased std; 0 with one honest client) are over the honest rows.

    Args:
        z: the deviation in standard deviations; None computes it from n and
            f = #malicious with :func:`alie_z`.
    """
    ATTACKS.check("alie", z=z)
    mask = _check_xm(x, malicious, "alie")
    if not bool(mask.any()):
        return x.clone()
    h = _honest(x, mask, "alie")  # (n - f, d)
    if z is None:
        z = alie_z(x.shape[0], int(mask.sum()))
    mu = h.mean(dim=0)
    sigma = h.std(dim=0) if h.shape[0] > 1 else torch.zeros_like(mu)
    return _replace(x, mask, mu - z * sigma)


def ipm(x: Tensor, malicious: Tensor, rng: torch.Generator | None, *, eps: float = 0.1) -> Tensor:
    """Inner-product manipulation (Xie et al., UAI 2019): ``-eps * mean(honest)``."""
    ATTACKS.check("ipm", eps=eps)
    mask = _check_xm(x, malicious, "ipm")
    if not bool(mask.any()):
        return x.clone()
    return _replace(x, mask, -eps * _honest(x, mask, "ipm").mean(dim=0))


def _deviation(h: Tensor, mu: Tensor, dev: str) -> Tensor:
    """The perturbation direction (d,), subtracted from ``mu`` (so ``-dev`` is ∇p)."""
    if dev == "unit_vec":
        norm = mu.norm()
        return mu / norm if float(norm) > 0 else torch.zeros_like(mu)
    if dev == "sign":
        return mu.sign()
    return h.std(dim=0) if h.shape[0] > 1 else torch.zeros_like(mu)


def _optimise_gamma(
    h: Tensor, dev: str, gamma_init: float, tol: float, constraint: Callable[[Tensor], bool]
) -> Tensor:
    """Shejwalkar & Houmansadr's search for the largest feasible ``gamma``.

    Candidate ``mu - gamma * dev``; the search starts at ``gamma_init`` with step
    ``gamma_init / 2``, halving the step each time, moving up on success and down on
    failure, until the last success and the current gamma differ by at most ``tol``
    (exactly the authors' loop). gamma = 0 (the honest mean) is always feasible.
    """
    mu = h.mean(dim=0)  # (d,)
    direction = _deviation(h, mu, dev)  # (d,)
    gamma, step, good = float(gamma_init), float(gamma_init), 0.0
    for _ in range(200):  # the step halves every pass: 200 passes exhaust float64
        if abs(good - gamma) <= tol:
            break
        if constraint(mu - gamma * direction):
            good = gamma
            gamma += step / 2
        else:
            gamma -= step / 2
        step /= 2
    return mu - good * direction


def _pair_dists(h: Tensor) -> Tensor:
    return torch.cdist(h, h, compute_mode="donot_use_mm_for_euclid_dist")  # (m, m)


def min_max(
    x: Tensor,
    malicious: Tensor,
    rng: torch.Generator | None,
    *,
    dev: Literal["unit_vec", "std", "sign"] = "unit_vec",
    gamma_init: float = 10.0,
    tol: float = 1e-5,
) -> Tensor:
    """Min-Max (Shejwalkar & Houmansadr, NDSS 2021).

    Sends ``mu - gamma * dev`` with the largest gamma found such that
    ``max_{i in H} ||x' - x_i|| <= max_{i,j in H} ||x_i - x_j||``.

    Args:
        dev: perturbation direction: ``unit_vec`` (mu/||mu||), ``std`` (coordinate std of
            the honest rows) or ``sign`` (sign(mu)).
        gamma_init: the first gamma tried (γ_init).
        tol: the search stops when the step falls below this.
    """
    ATTACKS.check("min_max", dev=dev, gamma_init=gamma_init, tol=tol)
    mask = _check_xm(x, malicious, "min_max")
    if not bool(mask.any()):
        return x.clone()
    h = _honest(x, mask, "min_max")  # (m, d)
    bound = _pair_dists(h).max()

    def ok(cand: Tensor) -> bool:
        return bool((h - cand).norm(dim=1).max() <= bound)

    return _replace(x, mask, _optimise_gamma(h, dev, gamma_init, tol, ok))


def min_sum(
    x: Tensor,
    malicious: Tensor,
    rng: torch.Generator | None,
    *,
    dev: Literal["unit_vec", "std", "sign"] = "unit_vec",
    gamma_init: float = 10.0,
    tol: float = 1e-5,
) -> Tensor:
    """Min-Sum (Shejwalkar & Houmansadr, NDSS 2021).

    Like :func:`min_max` with the constraint
    ``sum_{i in H} ||x' - x_i||^2 <= max_{i in H} sum_{j in H} ||x_i - x_j||^2``.
    """
    ATTACKS.check("min_sum", dev=dev, gamma_init=gamma_init, tol=tol)
    mask = _check_xm(x, malicious, "min_sum")
    if not bool(mask.any()):
        return x.clone()
    h = _honest(x, mask, "min_sum")  # (m, d)
    bound = (_pair_dists(h) ** 2).sum(dim=1).max()

    def ok(cand: Tensor) -> bool:
        return bool(((h - cand) ** 2).sum() <= bound)

    return _replace(x, mask, _optimise_gamma(h, dev, gamma_init, tol, ok))


def flip_labels(
    y: Tensor,
    num_classes: int,
    *,
    mode: Literal["reverse", "shift"] = "reverse",
    rng: torch.Generator | None = None,
) -> Tensor:
    """Label flipping (data poisoning) for a malicious client's training labels.

    Args:
        y: (n,) integer labels in ``[0, num_classes)``.
        num_classes: C.
        mode: ``reverse``: ``C - 1 - y`` (FutabatedLearning's ``9 - label``);
            ``shift``: ``(y + 1) mod C``.
        rng: unused by these deterministic maps; accepted for a uniform signature.

    Returns:
        The flipped labels, same shape and dtype as ``y``.
    """
    ATTACKS.check("label_flip", mode=mode)
    if not is_int(num_classes) or num_classes < 2:
        raise KdflError(f"flip_labels: num_classes must be an integer >= 2, got {num_classes!r}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise KdflError(f"flip_labels: labels must be an integer tensor, got {y.dtype}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise KdflError(f"flip_labels: labels must lie in [0, {num_classes}), got [{int(y.min())}, {int(y.max())}]")
    return num_classes - 1 - y if mode == "reverse" else (y + 1) % num_classes


@dataclass(frozen=True)
class AttackSpec:
    """A registered attack.

    Attributes:
        fn: the function (see the module docstring for the two signatures).
        omniscient: whether it reads the honest clients' uploads.
        space: ``"upload"`` (acts on stacked uploads) or ``"data"`` (on local labels).
        description: one line for ``kdfl list attacks``.
    """

    fn: Callable[..., Tensor]
    omniscient: bool
    space: Literal["upload", "data"]
    description: str


def _hyperparameters(spec: AttackSpec) -> dict[str, Option]:
    return signature_options(spec.fn, skip=_INPUTS, checks=_CHECKS)


ATTACKS: Registry[AttackSpec] = Registry(
    "attack",
    {
        "sign_flip": AttackSpec(sign_flip, False, "upload", "send -scale * own upload"),
        "scaled": AttackSpec(scaled, False, "upload", "send lam * own upload"),
        "gaussian": AttackSpec(gaussian, False, "upload", "send (or add) N(0, sigma^2) noise"),
        "alie": AttackSpec(alie, True, "upload", "A Little Is Enough: mu - z * sigma of the honest uploads"),
        "ipm": AttackSpec(ipm, True, "upload", "inner-product manipulation: -eps * honest mean"),
        "min_max": AttackSpec(min_max, True, "upload", "NDSS'21 min-max: within the honest max pairwise distance"),
        "min_sum": AttackSpec(
            min_sum, True, "upload", "NDSS'21 min-sum: within the honest max sum of squared distances"
        ),
        "label_flip": AttackSpec(flip_labels, False, "data", "train on flipped labels (C-1-y or y+1 mod C)"),
    },
    word="hyperparameter",
    positional=True,  # "scaled:5" means lam=5
    options_of=_hyperparameters,
)


def make_attack(name: str, **hyper: Any) -> Callable[..., Tensor]:
    """The attack ``name`` with its hyperparameters bound.

    Upload attacks become ``fn(x, malicious, rng)``; ``label_flip`` becomes
    ``fn(y, num_classes)``. Look up ``ATTACKS[name]`` for ``omniscient`` and ``space``.

    Raises:
        KdflError: unknown attack (with close matches), unknown hyperparameter (naming the
            allowed ones) or a value out of range.
    """
    return functools.partial(ATTACKS.get(name).fn, **ATTACKS.bind(name, hyper))


def choose_malicious(num_clients: int, fraction: float, seed: int) -> frozenset[int]:
    """The fixed set of Byzantine client ids for a run.

    ``round(fraction * num_clients)`` ids (Python rounding) drawn without replacement by
    ``numpy.random.default_rng(seed)``: the same arguments give the same set.
    """
    if not is_int(num_clients) or num_clients < 1:
        raise KdflError(f"choose_malicious: num_clients must be an integer >= 1, got {num_clients!r}")
    if not is_real(fraction) or not 0 <= fraction < 1:
        raise KdflError(f"choose_malicious: fraction={fraction!r} is out of range; allowed: [0, 1)")
    k = round(fraction * num_clients)
    ids = np.random.default_rng(seed).choice(num_clients, size=k, replace=False)
    return frozenset(int(i) for i in ids)
