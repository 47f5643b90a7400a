"""FedKD: a private mentor and a shared mentee per client, adaptive mutual distillation,
and the mentee's updates compressed by truncated SVD with a rising energy threshold.

Wu, Wu, Lyu, Huang, Xie. Communication-efficient federated learning via knowledge
distillation. Nature Communications 13, 2032 (2022). arXiv 2108.13323.
Reference code: github.com/wuch15/FedKD (``run.py``, ``model_bert.py``); what it does is
written up in ``../shared/research/official_code.md`` (section 2).

Round r (0-based), as implemented:
  1. downlink: the global mentee, as the SVD factors of the global updates the client has
     not applied yet (every round since it last took part), or as dense weights when it
     never took part or the factors would cost more than the weights; plus the energy
     threshold ``T_r = T_start + min(1, (r + 1) / R) · (T_end − T_start)`` (the reference's
     linear schedule, 0.95 → 0.98; R = ``energy_rounds``, the run's length in the paper).
  2. client: rebuilds the mentee (its last synced copy plus the missed global updates, in
     order: bit for bit the server's global mentee), and trains it together with its
     private mentor (kept across rounds, any architecture: ``mentor``, or the client's
     own ``model.client_archs`` entry; before its first round the global mentee's initial
     weights when it has the mentee's architecture, as PFLlib) on its private data with
     ``L_T + L_S + a·(KL(p_S‖p_T) + KL(p_T‖p_S)) + hidden·a·MSE(P(h_S), h_T)``:
     L_T, L_S the two cross-entropies; ``a = 1/(L_T + L_S + eps)`` the adaptive weight
     (not detached, as in the references; ``detach_weight`` detaches it); the KL terms
     with targets not detached (each sends gradient into both models, as the references)
     and reduced as ``nn.KLDivLoss()`` by default (the mean over the B·C elements); h the
     models' features (the input of the last Linear) and P a learned linear map of the
     mentee's features to the mentor's width (kept with the mentor; PFLlib's ``W_h``,
     learned also at equal widths; ``projection = "width"`` only where they differ);
     hidden = 2, as both references count the term twice. Each model's gradient norm is
     clipped to 10 per step (PFLlib).
  3. upload: the mentee's update (trained − synced copy), every weight matrix (a conv
     kernel viewed as (out, in·k·k)) as truncated SVD factors with energy ``T_r``
     (:class:`kdfl.compression.SVD`: the smallest rank keeping ``T_r`` of the energy, at
     least 1; dense where the factors would not be smaller, and 1-D tensors dense, as the
     reference). Bytes are those of the factors actually sent.
  4. server: rebuilds each update, averages them (uniformly over clients, the reference;
     ``weighting = "examples"`` weights by sample counts; ``aggregator`` any robust
     rule), factorises the average again with ``T_r`` (``compress_downlink``), and adds
     the rebuilt factors to the global mentee.

Evaluated: the run's ``test_accuracy`` is the global mentee's (the server model); per
client, ``accuracy`` is the client's mentor on its own held-out split (what both
references report, and FedKD's headline: the authors' ``test()`` scores the local models,
PFLlib's evaluation is its personalised one) and ``mentee_accuracy`` the shared mentee on
the same split.

What follows the reference: the two models trained jointly by one optimizer, a = 1/(L_T +
L_S) not detached, two-way KL at temperature 1 with targets not detached, the schedule
and its constants, the rank rule (fixed: at least rank 1, full rank allowed), uniform
averaging, compression both ways, clients adding the averaged update to their synced copy,
the KL's reduction, the hidden weight 2; from PFLlib (``system/flcore/clients/clientkd.py``
@ d832e76) the learned map, the mentor's initial weights and the clipping at 10.
Ours: ``eps`` in the adaptive weight (without it a batch both models fit exactly gives
inf / NaN and costs the client its round); the hidden loss is the features' MSE (the
authors pair transformer layers and their attention maps; PFLlib, as here, the features);
the map has a bias (PFLlib's has none); partial participation (the reference
runs 4 clients every round): a client that missed rounds receives every missed update,
or dense weights when cheaper, so every client starts from the exact global mentee. (A
lossy ``[compression] downlink`` codec on top, fp16 say, rounds the factors the clients
add, so their copies then drift from the server's by that rounding per update until their
next dense download; the uplink codec has no such effect.)

Byzantine upload attacks see the matrices the factors encode (:func:`kdfl.compression.unfactor`)
and send their result at the attacker's own rank.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdfl import tree, wire
from kdfl.algorithms.kit import weights
from kdfl.algorithms.kit.features import arch_feature_dim
from kdfl.algorithms.program import DELTA, Custom, Model, Phase, Program, fresh_weights
from kdfl.compression import FACTOR_SEP, SVD
from kdfl.losses import KL_REDUCTIONS, Batch, Outputs, mutual_kl
from kdfl.train import LocalSGD, evaluate
from kdfl.types import (
    Client,
    ClientInfo,
    ClientState,
    ClientUpdate,
    KdflError,
    Payload,
    PayloadError,
    RoundMetrics,
    ServerState,
    StateDict,
    Task,
    TensorData,
)

MENTOR, MENTEE, PROJ = "mentor", "mentee", "proj"
SYNC = "mentee_sync"  # kept: the client's copy of the global mentee it last received
PART = FACTOR_SEP  # "<tensor>#u": a factor of one weight matrix in a payload
WEIGHTINGS = ("uniform", "examples")
# downlink entries
ENERGY, AT, SINCE, ROUNDS, DENSE = "energy", "sync_round", "from_round", "rounds", "mentee."


# ----------------------------------------------------------------------------- SVD payloads
def compress(delta: StateDict, energy: float, prefix: str) -> Payload:
    """``delta`` as payload entries ``<prefix><name>``: each weight matrix (ndim >= 2,
    viewed as (shape[0], -1)) as :class:`SVD` factors ``<prefix><name>#u/#s/#vt`` (or
    ``#values`` when dense is not larger); 1-D tensors and integer buffers as they are."""
    codec, out = SVD(energy), dict[str, Tensor]()
    for k, v in delta.items():
        if v.is_floating_point() and v.dim() >= 2 and v.numel():
            for part, t in codec.encode(v.reshape(v.shape[0], -1)).items():
                out[f"{prefix}{k}{PART}{part}"] = t
        else:
            out[prefix + k] = v.detach().clone()
    return out


def decompress(payload: Payload, like: StateDict, prefix: str) -> StateDict:
    """Inverse of :func:`compress` for tensors shaped like ``like``; every entry under
    ``prefix`` must be used.

    Raises:
        PayloadError: a missing, extra, misshapen or non-finite entry (naming it).
    """
    codec, out, used = SVD(), {}, set[str]()
    for k, ref in like.items():
        if ref.is_floating_point() and ref.dim() >= 2 and ref.numel():
            parts = {key[len(prefix) + len(k) + 1:]: t for key, t in payload.items()
                     if key.startswith(f"{prefix}{k}{PART}")}
            if not parts:
                raise PayloadError(f"missing the factors of {prefix}{k} (entries {prefix}{k}{PART}u/s/vt or "
                                   f"{PART}values)")
            used.update(f"{prefix}{k}{PART}{p}" for p in parts)
            try:
                x = codec.decode(parts, shape=(ref.shape[0], ref[0].numel()))
            except PayloadError as e:
                raise PayloadError(f"{prefix}{k}: {e}") from None
            out[k] = x.reshape(ref.shape)
            continue
        t = payload.get(prefix + k)
        if t is None:
            raise PayloadError(f"missing entry {prefix}{k}")
        used.add(prefix + k)
        if tuple(t.shape) != tuple(ref.shape) or t.is_floating_point() != ref.is_floating_point():
            raise PayloadError(f"{prefix}{k} is {tuple(t.shape)} {t.dtype}, expected {tuple(ref.shape)} {ref.dtype}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise PayloadError(f"{prefix}{k} holds NaN or infinite values")
        out[k] = t.to(ref.dtype)
    extra = sorted(k for k in payload if k.startswith(prefix) and k not in used)
    if extra:
        raise PayloadError(f"unexpected entries {extra[:5]}{' ...' if len(extra) > 5 else ''}")
    return out


def advance(weights_: StateDict, update: StateDict) -> StateDict:
    """The global mentee after one rebuilt update: the same float operations on the
    server and on every client, so both hold the same bits."""
    return tree.add(weights_, update)


# ----------------------------------------------------------------------------- loss
PROJECTIONS = ("always", "width")
MENTOR_INITS = ("mentee", "fresh")


@dataclass(frozen=True)
class FedKDLoss:
    """``L_T + L_S + a·(KL(p_S‖p_T) + KL(p_T‖p_S)) + hidden·a·MSE(P(h_S), h_T)`` with
    ``a = 1/(L_T + L_S + eps)`` (see the module docstring).

    Args:
        hidden: weight of the hidden-state MSE (0: off; then no features are needed).
        detach_weight: detach ``a`` (the reference backpropagates through it).
        project: the mentee's features go through the adapter ``proj`` first.
        kl_reduction: "mean" (``nn.KLDivLoss()``'s default, the references) or "batchmean".
        eps: added to ``L_T + L_S`` so that a batch both models fit perfectly (both losses
            0 in float32) gives a finite weight (the references have none).
    """

    hidden: float = 2.0
    detach_weight: bool = False
    project: bool = False
    kl_reduction: str = "mean"
    eps: float = 1e-6
    per_sample_mean: ClassVar[bool] = False  # a depends on the whole batch: never padded

    def __call__(self, out: Outputs, batch: Batch, consts: Mapping[str, Any]) -> Tensor:
        assert batch.y is not None, "FedKD trains on labelled private data"
        t, s = out.logits(MENTOR), out.logits(MENTEE)
        lt, ls = F.cross_entropy(t, batch.y), F.cross_entropy(s, batch.y)
        a = 1.0 / (lt + ls + self.eps)
        if self.detach_weight:
            a = a.detach()
        r = self.kl_reduction
        total = lt + ls + a * (mutual_kl(s, t, reduction=r, detach_target=False)
                               + mutual_kl(t, s, reduction=r, detach_target=False))
        if self.hidden:
            hs, ht = out.features(MENTEE), out.features(MENTOR)
            if self.project:
                hs = out.apply(PROJ, hs)
            total = total + self.hidden * a * ((hs - ht) ** 2).mean()
        return total


# ----------------------------------------------------------------------------- states
@dataclass(frozen=True)
class FedKDState(ServerState):
    """``params``: the global mentee W_n after n = ``round`` rounds. ``synced``: client id
    -> the round whose W the client last received. ``history``: (n, bytes, factors of the
    update from W_{n-1} to W_n), newest last, no more in total than the dense weights."""

    synced: Mapping[int, int] = field(default_factory=dict)
    history: tuple[tuple[int, int, Payload], ...] = ()
    dense_bytes: int = 0


@dataclass(frozen=True)
class FedKDClientState(ClientState):
    """The mentor (and projection) plus ``mentee_sync`` = W_``synced``."""

    synced: int = -1


@dataclass(frozen=True)
class FedKD:
    """FedKD (Wu et al., Nature Communications 2022); see the module docstring.

    Args:
        local: local-training settings (one optimizer over mentor, mentee and projection).
        mentor: architecture of every client's private mentor; "" = the client's own
            architecture (``model.client_archs``, else ``model.arch``). The mentee, the
            shared and evaluated model, is ``model.arch``.
        energy_start, energy_end: T_start and T_end of the energy threshold (0.95, 0.98).
        energy_rounds: R, the round at which T reaches T_end (set it to ``run.rounds``).
        hidden: weight of the hidden-state MSE (0 turns it off). 2: both references count
            it twice (the authors' loss adds it twice; PFLlib puts it in both models'
            losses and backpropagates both through all models).
        detach_weight: detach the adaptive weight a = 1/(L_T + L_S + eps).
        kl_reduction: "mean" (``nn.KLDivLoss()``'s default in both references: the
            per-sample KL / C) or "batchmean" (the per-sample KL, C times stronger).
        eps: added to L_T + L_S in the adaptive weight (finite on a perfectly fitted batch).
        projection: "always": a learned linear map P of the mentee's features to the
            mentor's width, also at equal widths (PFLlib's ``W_h``); "width": only where
            the widths differ (the authors' models share one width and use none).
        mentor_init: "mentee": a mentor of the mentee's architecture starts from the
            global mentee's initial weights (PFLlib's deep copy of the initial model; the
            authors' mentor and mentee load one checkpoint); "fresh": from the client's
            own seed. A mentor of another architecture always starts fresh.
        clip_grad_norm: clip each model's gradient norm to this per step (PFLlib: 10, "to
            prevent divergency"); used when ``local.clip_grad_norm`` is 0; 0 = off.
        weighting: "uniform" (the reference) or "examples" (by sample counts).
        aggregator: rule for the rebuilt updates ("mean"; or "median", ...).
        compress_downlink: factorise the averaged update for the downlink too (the
            reference); false sends it dense (fp32).
    """

    local: LocalSGD = field(default_factory=LocalSGD)
    mentor: str = ""
    energy_start: float = 0.95
    energy_end: float = 0.98
    energy_rounds: int = 20
    hidden: float = 2.0
    detach_weight: bool = False
    kl_reduction: str = "mean"
    eps: float = 1e-6
    projection: str = "always"
    mentor_init: str = "mentee"
    clip_grad_norm: float = 10.0
    weighting: str = "uniform"
    aggregator: str = "mean"
    compress_downlink: bool = True

    def __post_init__(self) -> None:
        if not (0 < self.energy_start <= 1 and 0 < self.energy_end <= 1):
            raise KdflError(f"fedkd: energy_start and energy_end must be in (0, 1], got {self.energy_start}, "
                            f"{self.energy_end}")
        if self.energy_rounds < 1:
            raise KdflError(f"fedkd: energy_rounds must be >= 1 (set it to run.rounds), got {self.energy_rounds}")
        if self.hidden < 0 or self.eps < 0 or self.clip_grad_norm < 0:
            raise KdflError(f"fedkd: hidden, eps and clip_grad_norm must be >= 0, got hidden={self.hidden}, "
                            f"eps={self.eps}, clip_grad_norm={self.clip_grad_norm}")
        for key, value, allowed in (("kl_reduction", self.kl_reduction, KL_REDUCTIONS),
                                    ("projection", self.projection, PROJECTIONS),
                                    ("mentor_init", self.mentor_init, MENTOR_INITS)):
            if value not in allowed:
                raise KdflError(f"fedkd: {key} must be one of {allowed}, got {value!r}")
        if self.weighting not in WEIGHTINGS:
            raise KdflError(f"fedkd: weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        weights.check_aggregator(self.aggregator)

    def energy(self, round_num: int) -> float:
        """T_r for 0-based round r (linear from T_start to T_end over ``energy_rounds``)."""
        frac = min(1.0, (round_num + 1) / self.energy_rounds)
        return self.energy_start + frac * (self.energy_end - self.energy_start)

    # -- server ------------------------------------------------------------------------
    def init(self, task: Task) -> FedKDState:
        params = weights.init_params(task)
        return FedKDState(params, 0, {}, (), wire.nbytes({DENSE + k: v for k, v in params.items()}))

    def configure(self, task: Task, state: ServerState, client: ClientInfo) -> Payload:
        assert isinstance(state, FedKDState)
        n = state.round
        head: Payload = {ENERGY: torch.tensor([self.energy(n)], dtype=torch.float32),
                         AT: torch.tensor([n], dtype=torch.int64)}
        since = state.synced.get(client.id)
        chain = [(m, nb, d) for m, nb, d in state.history if since is not None and m > since]
        complete = since is not None and [m for m, _, _ in chain] == list(range(since + 1, n + 1))
        if not complete or sum(nb for _, nb, _ in chain) >= state.dense_bytes:
            return {**head, **{DENSE + k: v for k, v in state.params.items()}}
        out = {**head, SINCE: torch.tensor([since], dtype=torch.int64),
               ROUNDS: torch.tensor([m for m, _, _ in chain], dtype=torch.int64)}
        for m, _, d in chain:
            out.update({f"d{m}.{k}": v for k, v in d.items()})
        return out

    def validate(self, task: Task, state: ServerState, update: ClientUpdate) -> None:
        extra = sorted(k for k in update.payload if not k.startswith(DELTA))
        if extra:
            raise PayloadError(f"unexpected entries {extra[:5]} (a FedKD upload holds only the mentee's update)")
        decompress(update.payload, state.params, DELTA)

    def server_update(self, task: Task, state: FedKDState,  # type: ignore[override]
                      updates: Sequence[ClientUpdate]) -> tuple[FedKDState, RoundMetrics]:
        n = state.round
        if not updates:  # W unchanged; a client that missed this round gets dense weights
            return replace(state, round=n + 1), {}
        rebuilt = [ClientUpdate(u.client_id, 1 if self.weighting == "uniform" else u.num_examples,
                                {DELTA + k: v for k, v in decompress(u.payload, state.params, DELTA).items()}, {})
                   for u in updates]
        avg = weights.aggregate_deltas(rebuilt, self.aggregator)
        if self.compress_downlink:
            down = compress(avg, self.energy(n), "")
            update = decompress(down, state.params, "")
        else:
            down, update = dict(avg), avg
        nb = wire.nbytes(down)
        history = [*state.history, (n + 1, nb, down)]
        while history and sum(h[1] for h in history) > state.dense_bytes:  # dense is cheaper beyond this
            history.pop(0)
        synced = {**state.synced, **{u.client_id: n for u in updates}}
        new = FedKDState(advance(state.params, update), n + 1, synced, tuple(history), state.dense_bytes)
        return new, {"downlink_update_bytes": float(nb)}

    # -- client ------------------------------------------------------------------------
    def mentee_weights(self, task: Task, downlink: Payload, client: Client) -> StateDict:
        """The global mentee W_n from the downlink (dense, or the client's synced copy plus
        the missed updates in order)."""
        if SINCE not in downlink:
            return {k[len(DENSE):]: v for k, v in downlink.items() if k.startswith(DENSE)}
        since = int(downlink[SINCE][0])
        have = client.state.synced if isinstance(client.state, FedKDClientState) else -1
        w = client.kept(SYNC)
        if w is None or have < since:
            raise KdflError(f"fedkd: client {client.id} holds the global mentee of round {have}, but the server sent "
                            f"the updates since round {since}: its kept state was lost (restart the run)")
        for m in downlink[ROUNDS].tolist():
            if m > have:
                w = advance(w, decompress({k: v for k, v in downlink.items() if k.startswith(f"d{m}.")}, w, f"d{m}."))
        return w

    def mentor_arch(self, client: Client) -> str:
        return self.mentor or client.arch

    def _projection(self, task: Task, mentor: str) -> str | None:
        ds, dt = arch_feature_dim(task, task.server_arch, "fedkd"), arch_feature_dim(task, mentor, "fedkd")
        if ds == dt and self.projection == "width":
            return None
        return f"linear:in_features={ds},out_features={dt}"

    @functools.cached_property
    def _phases(self) -> dict[bool, Phase]:  # one Phase object per structure (executors group by it)
        feats = frozenset({"features"}) if self.hidden else frozenset()
        local = self.local
        if not local.clip_grad_norm and self.clip_grad_norm:
            local = replace(local, clip_grad_norm=self.clip_grad_norm)
        return {p: Phase(FedKDLoss(self.hidden, self.detach_weight, p, self.kl_reduction, self.eps), local,
                         train=(MENTOR, MENTEE, PROJ) if p else (MENTOR, MENTEE),
                         adapters=(PROJ,) if p else (), outputs=feats)
                for p in (False, True)}

    def initial_mentor(self, task: Task, client: Client) -> StateDict:
        """A client's mentor before its first round (see ``mentor_init``)."""
        arch = self.mentor_arch(client)
        if self.mentor_init == "mentee" and arch == task.server_arch:
            return weights.init_params(task)  # the global mentee's initial weights W_0
        return fresh_weights(task, client.id, arch)

    def client_program(self, task: Task, downlink: Payload, client: Client) -> Program:
        sync = self.mentee_weights(task, downlink, client)
        energy, at = float(downlink[ENERGY][0]), int(downlink[AT][0])
        mentor = self.mentor_arch(client)
        proj = self._projection(task, mentor) if self.hidden else None
        models = {MENTOR: Model(mentor, client.kept(MENTOR) or self.initial_mentor(task, client)),
                  MENTEE: Model(task.server_arch, sync)}
        if proj is not None:
            models[PROJ] = Model(proj, client.kept(PROJ) or fresh_weights(task, client.id, proj))

        def upload(trained: Mapping[str, nn.Module]) -> Payload:
            return compress(tree.sub(tree.state_of(trained[MENTEE]), sync), energy, DELTA)

        def keep_state(trained: Mapping[str, nn.Module], kept: ClientState) -> ClientState:
            return FedKDClientState({**kept.models, SYNC: sync}, at)

        return Program(models=models, phases=(self._phases[proj is not None],), upload=(Custom(upload),),
                       keep=(MENTOR, PROJ) if proj is not None else (MENTOR,), keep_state=keep_state)

    def client_model(self, task: Task, downlink: Payload, client: Client) -> Model:
        """Per-client metrics: the client's mentor (its personal, larger model); before
        its first round, the global mentee."""
        kept = client.kept(MENTOR)
        if kept is not None:
            return Model(self.mentor_arch(client), kept)
        return Model(task.server_arch, self.mentee_weights(task, downlink, client))

    def client_eval_metrics(self, task: Task, downlink: Payload, client: Client, module: nn.Module,
                            data: TensorData) -> dict[str, float]:
        """``mentee_accuracy``: the shared global mentee on the client's own held-out split,
        beside the mentor's ``accuracy`` (the model both references report: the authors'
        ``test()`` and PFLlib's personalised evaluation). Not computed on the global test
        set, where the mentee is the server model (``test_accuracy`` of the run)."""
        if data is task.test or not len(data):
            return {}
        mentee = task.borrow_model(task.server_arch)
        try:
            mentee.load_state_dict(self.mentee_weights(task, downlink, client))
            return {"mentee_accuracy": evaluate(mentee, data)["accuracy"]}
        finally:
            task.return_model(task.server_arch, mentee)
