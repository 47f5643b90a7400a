"""Differential privacy on what clients share: clipping, Gaussian noise and the accountant
(the ``[privacy]`` config section).

The unit of privacy is a **client** (user-level DP): two federations are neighbours when
one client's whole data set is replaced by any other (*replace-one*). Every upload is a
vector: all its floating-point entries (deltas, logits, soft labels, per-label logits...)
flattened together, clipped to L2 norm ``clip`` (C). Replacing a client's data moves its
clipped upload, and the sum of the round's clipped uploads, by at most 2C, so noise of std
σ·C is a Gaussian mechanism of noise multiplier σ/2 for that sensitivity.

Modes:

* ``local``: each client (honest or Byzantine; attackers tamper afterwards) clips its
  upload and adds N(0, (σ·C)²) to every float entry, before the codec and the wire, with
  a generator from (run seed, round, client): every executor gives the same noise. The
  server (and everyone else) sees only noisy uploads, so whatever it does with them
  (median, Krum, class weighting of the noisy values...) is post-processing. No
  amplification by subsampling (the server knows who took part): a client's ε is the
  composition of the rounds it uploaded in; the reported ε is the maximum over clients.
* ``central``: a trusted server clips every accepted upload and adds N(0, (σ·C)²/n) to each
  of the n, so their mean carries noise of std σ·C/n, i.e. σ·C on the sum. Only valid when
  the server's aggregation is a plain mean of the raw uploads followed by anything (see
  :func:`check_combination`). The clients are sampled by the server in secret: each round
  is a Gaussian mechanism on a sample of m of the N clients drawn without replacement,
  accounted as ``SampledWithoutReplacementDpEvent`` (Wang, Balle, Kasiviswanathan 2019)
  under the replace-one relation; with every client each round, a plain Gaussian.

Both modes give every upload the weight 1 (``num_examples`` is data-dependent and would
leak); integer and boolean entries (label counts, indices) are not noised, so an upload
holding them is refused unless ``allow_integer_entries`` (BatchNorm step counters
``*num_batches_tracked`` excepted: they only count local steps). Accounting uses Google's
``dp_accounting`` (RDP, the conversion of Balle et al. 2020): ``pip install "kdfl[privacy]"``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kdfl.rng import generator
from kdfl.types import ClientUpdate, KdflError, Payload, RoundMetrics, ServerState, Task

MODES = ("none", "local", "central")
EXEMPT_SUFFIX = "num_batches_tracked"  # BatchNorm step counters: they count local steps only


@dataclass(frozen=True)
class PrivacySettings:
    """The ``[privacy]`` config section.

    Args:
        mode: "none", "local" (clients clip and noise their uploads) or "central" (a
            trusted server clips every upload and noises the mean). When a config sets
            ``noise_multiplier`` > 0 and no mode, the mode is "local".
        clip: C, the L2 bound of a whole upload (all its float entries flattened together).
        noise_multiplier: σ; the noise std is σ·C (on each upload in "local", on the sum
            in "central").
        delta: δ at which ε is reported.
        allow_integer_entries: send integer/bool upload entries (label counts,
            indices) unprotected instead of refusing the run.
    """

    mode: str = "none"
    clip: float = 1.0
    noise_multiplier: float = 0.0
    delta: float = 1e-5
    allow_integer_entries: bool = False

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise KdflError(f"privacy.mode must be one of {', '.join(MODES)}; got {self.mode!r}")
        if not self.clip > 0 or not math.isfinite(self.clip):
            raise KdflError(f"privacy.clip must be a finite number > 0 (the L2 bound of a whole upload), "
                            f"got {self.clip}")
        if not self.noise_multiplier >= 0 or not math.isfinite(self.noise_multiplier):
            raise KdflError(f"privacy.noise_multiplier must be >= 0, got {self.noise_multiplier}")
        if not 0 < self.delta < 1:
            raise KdflError(f"privacy.delta must be in (0, 1) (e.g. 1e-5, below 1/number of clients), "
                            f"got {self.delta}")
        if self.mode != "none" and self.noise_multiplier == 0:
            raise KdflError(f"privacy.mode = {self.mode!r} needs privacy.noise_multiplier > 0 (e.g. 1.0); "
                            "without noise nothing is private: set privacy.mode = \"none\"")
        if self.mode == "none" and self.noise_multiplier > 0:
            raise KdflError(f"privacy.noise_multiplier = {self.noise_multiplier} with privacy.mode = \"none\" adds "
                            "no noise: set privacy.mode = \"local\" or \"central\", or noise_multiplier = 0")

    @property
    def enabled(self) -> bool:
        return self.mode != "none"


def settings_of(section: dict[str, Any] | None) -> PrivacySettings | None:
    """The settings of a validated ``[privacy]`` section, or None when privacy is off."""
    if not section:
        return None
    s = PrivacySettings(**section)
    return s if s.enabled else None


# -- clipping and noise --------------------------------------------------------------------
def _float_keys(payload: Payload) -> list[str]:
    return [k for k, v in payload.items() if v.is_floating_point()]


def unprotected_entries(payload: Payload) -> list[str]:
    """Integer/bool entries of ``payload`` that noise cannot protect (BN step counters aside)."""
    return [k for k, v in payload.items() if not v.is_floating_point() and not k.endswith(EXEMPT_SUFFIX)]


def upload_norm(payload: Payload) -> float:
    """L2 norm of all the float entries of ``payload`` flattened together."""
    sq = sum(float(payload[k].double().pow(2).sum()) for k in _float_keys(payload))
    return math.sqrt(sq)


def clip_and_noise(payload: Payload, clip: float, std: float, gen: torch.Generator | None) -> tuple[Payload, float]:
    """``payload`` with its float entries (flattened together) scaled to L2 norm at most
    ``clip`` and N(0, std²) noise added to every float coordinate (none when ``std`` is 0);
    other entries pass unchanged. Returns the new payload and the norm before clipping."""
    keys = _float_keys(payload)
    norm = upload_norm(payload)
    scale = min(1.0, clip / norm) if norm > 0 else 1.0
    total = sum(payload[k].numel() for k in keys)
    noise = torch.randn(total, generator=gen, dtype=torch.float64) * std if std > 0 else None
    out: Payload = {}
    pos = 0
    for k, v in payload.items():
        if k not in keys:
            out[k] = v
            continue
        x = v.double() * scale
        if noise is not None:
            x = x + noise[pos:pos + v.numel()].view(v.shape)
        pos += v.numel()
        out[k] = x.to(v.dtype)
    return out, norm


def _refuse_integers(update: ClientUpdate, settings: PrivacySettings) -> None:
    bad = unprotected_entries(update.payload)
    if bad and not settings.allow_integer_entries:
        raise KdflError(
            f"privacy: the upload of client {update.client_id} holds integer entries {bad} that noise does not "
            "protect (e.g. label counts; set algorithm.class_weighting = false where the algorithm has it), or "
            "set privacy.allow_integer_entries = true to send them unprotected"
        )


def privatize(update: ClientUpdate, settings: PrivacySettings, std: float, gen: torch.Generator) -> tuple[
        ClientUpdate, float]:
    """``update`` clipped and noised (std on every float coordinate), weighted 1; and its
    norm before clipping. Raises KdflError on unprotected integer entries."""
    _refuse_integers(update, settings)
    payload, norm = clip_and_noise(update.payload, settings.clip, std, gen)
    return dataclasses.replace(update, payload=payload, num_examples=1), norm


def local_noise(updates: Sequence[ClientUpdate], settings: PrivacySettings, seed: int,
                round_num: int) -> tuple[list[ClientUpdate], dict[str, float]]:
    """Local mode, on the client side of the transport: every upload clipped to C and noised
    with std σ·C from (seed, round, client). Returns the uploads and diagnostics
    (``dp_clipped_fraction``, ``dp_upload_norm``: simulator diagnostics, not released)."""
    out, norms = [], []
    for u in updates:
        v, norm = privatize(u, settings, settings.noise_multiplier * settings.clip,
                            generator(seed, "privacy-local", round_num, u.client_id))
        out.append(v)
        norms.append(norm)
    return out, _diagnostics(norms, settings.clip)


def diagnostics(norms: Sequence[float], clip: float) -> dict[str, float]:
    """The round's ``dp_clipped_fraction`` and ``dp_upload_norm`` from the uploads' norms
    before clipping (what :func:`local_noise` reports; a Flower server gets the norms from
    the clients' replies)."""
    return _diagnostics(norms, clip)


def _diagnostics(norms: Sequence[float], clip: float) -> dict[str, float]:
    if not norms:
        return {}
    return {"dp_clipped_fraction": sum(n > clip for n in norms) / len(norms),
            "dp_upload_norm": float(sum(norms) / len(norms))}


class CentralDP:
    """Central mode: ``algorithm`` whose ``server_update`` first clips every accepted upload
    to C and adds N(0, (σ·C)²/n) to each of the n, so that the mean the server computes
    carries noise of std σ·C/n (σ·C on the sum). Everything else is the algorithm's."""

    def __init__(self, algorithm: Any, settings: PrivacySettings) -> None:
        self.algorithm, self.settings = algorithm, settings

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["algorithm"], name)

    def init(self, task: Task) -> ServerState:
        return self.algorithm.init(task)  # type: ignore[no-any-return]

    def configure(self, task: Task, state: ServerState, client: Any) -> Payload:
        return self.algorithm.configure(task, state, client)  # type: ignore[no-any-return]

    def client_program(self, task: Task, downlink: Payload, client: Any) -> Any:
        return self.algorithm.client_program(task, downlink, client)

    def validate(self, task: Task, state: ServerState, update: ClientUpdate) -> None:
        self.algorithm.validate(task, state, update)

    def server_update(self, task: Task, state: ServerState,
                      updates: Sequence[ClientUpdate]) -> tuple[ServerState, RoundMetrics]:
        s = self.settings
        std = s.noise_multiplier * s.clip / math.sqrt(max(len(updates), 1))
        t = state.round + 1
        noisy, norms = [], []
        for u in updates:
            v, norm = privatize(u, s, std, generator(task.seed, "privacy-central", t, u.client_id))
            noisy.append(v)
            norms.append(norm)
        new_state, metrics = self.algorithm.server_update(task, state, noisy)
        return new_state, {**metrics, **_diagnostics(norms, s.clip)}


# -- which (algorithm, rule, mode) combinations are accounted ------------------------------
MEAN_AGGREGATED = ("fedavg, fedprox, fedavgm, fedntd, fedssd and fml with aggregator = \"mean\"; "
                   "fedema_distill with aggregator = \"mean\", class_weighting = false, space = \"logits\" or "
                   "\"centered\" and clip = 0; dsfl with aggregator = \"mean\" and upload = \"probs\"")


def mean_aggregation_refusal(algorithm: Any) -> str | None:
    """Why ``algorithm``'s server needs more than the (weighted) mean of the round's
    uploads, or None when the mean is all it uses (:data:`MEAN_AGGREGATED`). Central DP
    and secure aggregation (:mod:`kdfl.flower.secagg`) both need the mean to be enough."""
    from kdfl.algorithms.dsfl import DSFL
    from kdfl.algorithms.fedavg import FedAvg
    from kdfl.algorithms.fedema_distill import FedEMADistill
    from kdfl.algorithms.fedssd import FedSSD
    from kdfl.algorithms.fml import FML
    from kdfl.spec import parse_spec

    def rule() -> str:
        return parse_spec(algorithm.aggregator)[0]

    # the server-side methods whose aggregation was checked to be a plain mean (then post-processing)
    checked = {FedAvg.server_update, FedSSD.server_update, FML.server_update, FedEMADistill.server_update,
               FedEMADistill.teacher, DSFL.server_update, DSFL.global_soft_labels, DSFL.probabilities}
    cls = type(algorithm)
    for method in ("server_update", "teacher", "global_soft_labels", "probabilities"):
        impl = getattr(cls, method, None)
        if impl is not None and isinstance(algorithm, (FedAvg, FML, FedEMADistill, DSFL)) and impl not in checked:
            return f"{cls.__name__} overrides {method}, whose aggregation kdfl has not checked"
    if isinstance(algorithm, (FedAvg, FML)):
        return None if rule() == "mean" else f"aggregator = {algorithm.aggregator!r} needs the individual uploads"
    if isinstance(algorithm, FedEMADistill):
        why = []
        if rule() != "mean":
            why.append(f"aggregator = {algorithm.aggregator!r} needs the individual uploads")
        if algorithm.class_weighting:
            why.append("class_weighting = true weighs each client by its (unprotected) label counts")
        if algorithm.space not in ("logits", "centered"):
            why.append(f"space = {algorithm.space!r} maps each upload non-linearly before averaging")
        if algorithm.clip:
            why.append(f"clip = {algorithm.clip} clamps each upload before averaging")
        return "; ".join(why) or None
    if isinstance(algorithm, DSFL):
        why = []
        if rule() != "mean":
            why.append(f"aggregator = {algorithm.aggregator!r} needs the individual uploads")
        if algorithm.upload != "probs":
            why.append(f"upload = {algorithm.upload!r} applies a softmax to each upload before averaging")
        return "; ".join(why) or None
    return "its server does not aggregate the uploads with a plain mean (it uses each client's upload)"


def check_combination(algorithm: Any, settings: PrivacySettings | None) -> None:
    """Refuse, with the reason and what works, a combination the accountant does not cover."""
    if settings is None or not settings.enabled:
        return
    from kdfl.algorithms.dsfl import DSFL

    name = type(algorithm).__name__
    require_accounting()
    if settings.mode == "central":
        why = mean_aggregation_refusal(algorithm)
        if why is not None:
            raise KdflError(
                f"privacy.mode = \"central\" is not accounted for {name}: {why}. Central noise on the mean is "
                f"accounted for {MEAN_AGGREGATED}. Use privacy.mode = \"local\" (any algorithm and rule) instead."
            )
    if settings.mode == "local" and isinstance(algorithm, DSFL) and algorithm.upload == "probs":
        raise KdflError(f"privacy.mode = \"local\" with {name} upload = \"probs\": noisy soft labels leave the "
                        "simplex and the server rejects them; set algorithm.upload = \"logits\"")
    if getattr(algorithm, "class_weighting", False) and not settings.allow_integer_entries:
        raise KdflError(f"privacy with {name} class_weighting = true: clients upload label counts, integers that "
                        "noise does not protect; set algorithm.class_weighting = false, or "
                        "privacy.allow_integer_entries = true to send them unprotected")


# -- the accountant ------------------------------------------------------------------------
def require_accounting() -> Any:
    """The ``dp_accounting`` module, or a KdflError saying how to install it."""
    try:
        import dp_accounting
    except ImportError:
        raise KdflError("differential privacy needs Google's dp-accounting package: "
                        "pip install \"kdfl[privacy]\" (or pip install dp-accounting)") from None
    return dp_accounting


@functools.lru_cache(maxsize=256)
def _round_rdp(noise_multiplier: float, num_clients: int, sampled: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(orders, RDP) of one round: a Gaussian of multiplier σ/2 (sensitivity 2C, replace-one)
    on ``sampled`` of ``num_clients`` clients drawn without replacement."""
    dpa = require_accounting()
    from dp_accounting.rdp import rdp_privacy_accountant as rdp

    acc = rdp.RdpAccountant(neighboring_relation=dpa.privacy_accountant.NeighboringRelation.REPLACE_ONE)
    event: Any = dpa.GaussianDpEvent(noise_multiplier / 2)
    if 0 < sampled < num_clients:
        event = dpa.SampledWithoutReplacementDpEvent(num_clients, sampled, event)
    acc.compose(event)
    return tuple(float(o) for o in acc.orders), tuple(float(r) for r in acc.rdp)


def epsilon(noise_multiplier: float, delta: float, rounds: int, num_clients: int = 1, sampled: int = 0) -> float:
    """ε at ``delta`` after ``rounds`` rounds, each a Gaussian mechanism of noise std
    σ·C for sensitivity 2C (replace-one client), on ``sampled`` of ``num_clients`` clients
    drawn without replacement (0 or ``num_clients``: no subsampling). Local mode passes
    a client's number of participations as ``rounds`` and no subsampling."""
    if rounds <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    require_accounting()
    from dp_accounting.rdp import rdp_privacy_accountant as rdp

    orders, per_round = _round_rdp(float(noise_multiplier), int(num_clients), int(sampled))
    eps, _ = rdp.compute_epsilon(orders, [rounds * r for r in per_round], delta)
    return float(eps)


def noise_for_epsilon(target_epsilon: float, delta: float, rounds: int, num_clients: int = 1,
                      sampled: int = 0, tol: float = 1e-3) -> float:
    """The smallest noise multiplier σ (to relative ``tol``) whose :func:`epsilon` is at
    most ``target_epsilon`` (bisection; ε decreases in σ)."""
    if not target_epsilon > 0:
        raise KdflError(f"target epsilon must be > 0, got {target_epsilon}")

    def eps(s: float) -> float:
        return epsilon(s, delta, rounds, num_clients, sampled)

    lo, hi = 1e-2, 1.0
    while eps(hi) > target_epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e6:
            raise KdflError(f"no noise multiplier below 1e6 reaches epsilon {target_epsilon}")
    while hi - lo > tol * hi:
        mid = (lo + hi) / 2
        if eps(mid) > target_epsilon:
            lo = mid
        else:
            hi = mid
    return hi


def participations(records: Sequence[dict[str, Any]]) -> int:
    """The most rounds any client uploaded in (sampled and not dropped), from the records."""
    counts: dict[int, int] = {}
    for r in records:
        dropped = set(r.get("dropped", ()))
        for c in r.get("clients", ()):
            if c not in dropped:
                counts[c] = counts.get(c, 0) + 1
    return max(counts.values(), default=0)


def run_epsilon(settings: PrivacySettings, records: Sequence[dict[str, Any]], num_clients: int,
                clients_per_round: int) -> float:
    """ε at ``settings.delta`` after the rounds in ``records``: central mode composes one
    subsampled Gaussian per round; local mode composes, with no subsampling, as many
    Gaussians as the client that uploaded most often."""
    if settings.mode == "local":
        return epsilon(settings.noise_multiplier, settings.delta, participations(records))
    m = clients_per_round or num_clients
    return epsilon(settings.noise_multiplier, settings.delta, len(records), num_clients, min(m, num_clients))
