"""Client programs: an algorithm's client half declares *what* to train; one runner
decides *how*.

A :class:`Program` names its models (architecture and starting weights: from the
downlink, from the client's kept state or a fresh initialisation), lists its phases in
order (each with its data: the client's private data or a public subset with per-sample
targets from the server; its length and optimizer; which models it trains and which it
only runs; its loss over the models' outputs), says what to upload (weight deltas,
logits on given inputs, constants, or anything a function computes from the trained
models) and which models the client keeps for the next round.

Generated samples (FedGen's latents from a downloaded generator) are drawn before
training, from the client's own generator (``client.generator(stream)``), and attached
to a phase's data as per-sample targets (``Data(x, y, targets={"z": ..., "y_gen": ...})``):
the loss reads them from ``batch.targets`` and runs ``out.head(model, z)``, and the
program stays deterministic and batchable.

:func:`run_program` is the reference runner (the sequential executor). The vectorized
executor (:mod:`kdfl.simulation.vectorized`) runs the same program for many clients at
once when they declare the same structure: equal losses (frozen dataclasses, see
:mod:`kdfl.losses`), equal settings, and per-client tensors only in the places made for
them (weights, ``Phase.consts``, the phase data). Nothing is inferred from closures.

Statistics of the training itself are *declared* too, never collected inside a loss
(losses are pure: the vectorized executor vmaps them). ``Phase(..., track=LabelLogits(C))``
accumulates, over every batch of the phase, the per-label sums of the tracked model's
training logits (train mode, the very forward pass the loss sees, before the optimizer
step) and the label counts: :class:`LabelStats`, ``sums`` (C, C) float64 (row l: the sum
of the logits of the label-l samples) and ``counts`` (C,) int64. FD and FedGen's
FedDistill upload them. The reference runner and the vectorized executor accumulate them
identically (the batched step returns the tracked logits as an auxiliary output of
``vmap(grad)`` and one batched matmul adds them for every client; padded rows of ragged
batches are masked out). The runners hand them to the uploads and ``keep_state`` on the
trained-models mapping (:class:`Trained`: ``models.tracked[phase name]``); the
:class:`Tracked` upload turns them into payload entries (per-label averages and counts,
optionally on top of earlier sums and counts: a tracker that persists across rounds is
client state that ``keep_state`` stores and the next program passes as ``start``).

Examples (FedAvg's and a FedMD-like client)::

    Program(models={MAIN: Model(client.arch, downlink)},
            phases=[Phase(CrossEntropy(), self.local)],
            upload=[Delta(downlink)])

    Program(models={MAIN: Model(client.arch, client.kept(MAIN) or fresh_weights(task, client))},
            phases=[Phase(L1Logits(), digest, data=Data(proxy[idx], targets={"q": consensus})),
                    Phase(CrossEntropy(), self.local)],
            upload=[Logits(proxy[next_idx])], keep=(MAIN,))

An FD client (per-label average logits of its training, and its label counts)::

    Program(models={MAIN: Model(client.arch, own)},
            phases=[Phase(loss, self.local, consts=teacher, track=LabelLogits(task.num_classes))],
            upload=[Tracked("train")], keep=(MAIN,))
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from kdfl import tree
from kdfl.losses import MAIN, Loss
from kdfl.rng import derive
from kdfl.train import LocalSGD, local_train, predict
from kdfl.types import Client, ClientState, ClientUpdate, KdflError, Payload, StateDict, Task, TensorData

DELTA = "delta."  # payload key prefix of a weight delta


@dataclass(frozen=True)
class Model:
    """A model of the program: its architecture and the weights it starts from."""

    arch: str
    weights: StateDict


@dataclass(frozen=True, eq=False)
class Data:
    """A phase's data: inputs, optional labels and per-sample targets (all (n, ...))."""

    x: Tensor
    y: Tensor | None = None
    targets: Mapping[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = self.x.shape[0]
        if self.y is not None and self.y.shape[0] != n:
            raise KdflError(f"phase data: y has {self.y.shape[0]} rows but x has {n}")
        for name, t in self.targets.items():
            if t.shape[0] != n:
                raise KdflError(f"phase data: target {name!r} has {t.shape[0]} rows but x has {n}")

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @staticmethod
    def private(data: TensorData) -> Data:
        return Data(data.x, data.y)


# ----------------------------------------------------------------------------- tracking
@dataclass(frozen=True)
class LabelStats:
    """Per-label logit sums and label counts, optionally with leading (client) axes.

    Args:
        sums: (..., C, C) float64; row l is the sum of the logit vectors of the label-l samples.
        counts: (..., C) int64; samples of each label.
    """

    sums: Tensor
    counts: Tensor

    @staticmethod
    def zeros(num_classes: int, *lead: int, device: torch.device | str | None = None) -> LabelStats:
        c = num_classes
        return LabelStats(torch.zeros(*lead, c, c, dtype=torch.float64, device=device),
                          torch.zeros(*lead, c, dtype=torch.int64, device=device))

    def __add__(self, other: LabelStats) -> LabelStats:
        dev = self.sums.device
        return LabelStats(self.sums + other.sums.to(dev, torch.float64), self.counts + other.counts.to(dev))

    def __getitem__(self, index: Any) -> LabelStats:
        """The stats of some clients (rows of the leading axis)."""
        return LabelStats(self.sums[index], self.counts[index])

    def averages(self) -> Tensor:
        """(..., C, C) float32 per-label average logits; rows of labels never seen are 0."""
        n = self.counts.to(torch.float64).unsqueeze(-1)
        return torch.where(n > 0, self.sums / n.clamp_min(1.0), torch.zeros_like(self.sums)).float()


@dataclass(frozen=True)
class LabelLogits:
    """``Phase.track``: accumulate per-label sums of ``model``'s training logits and the
    label counts over every batch of the phase (:class:`LabelStats`). The phase needs
    labelled data.

    Args:
        num_classes: C (the shapes are fixed before training: a client without a single
            step still has (C, C) sums).
        model: the tracked model (trained or frozen in the phase).
    """

    num_classes: int
    model: str = MAIN

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise KdflError(f"LabelLogits: num_classes must be >= 1, got {self.num_classes}")

    def start(self, *lead: int, device: torch.device | str | None = None) -> LabelStats:
        """Zero sums and counts (one set per client when ``lead`` = (clients,))."""
        return LabelStats.zeros(self.num_classes, *lead, device=device)

    def update(self, stats: LabelStats, logits: Tensor, y: Tensor, mask: Tensor | None = None) -> None:
        """Add one batch in place: ``logits`` (..., B, C), labels ``y`` (..., B), optional
        ``mask`` (..., B) of the real (not padded) rows. The same float64 matmul for one
        client (the reference runner) and for a stack of clients (the vectorized executor)."""
        if logits.shape[-1] != self.num_classes:
            raise KdflError(f"LabelLogits(num_classes={self.num_classes}) tracks a model with "
                            f"{logits.shape[-1]} outputs: declare num_classes={logits.shape[-1]}")
        with torch.no_grad():
            hit = y.unsqueeze(-1) == torch.arange(self.num_classes, device=y.device)  # (..., B, C)
            if mask is not None:
                hit = hit & mask.unsqueeze(-1)
            stats.sums.add_(hit.to(torch.float64).transpose(-1, -2) @ logits.detach().to(torch.float64))
            stats.counts.add_(hit.sum(-2))


Tracker = LabelLogits  # what ``Phase.track`` accepts (one kind so far)


class Trained(dict[str, nn.Module]):
    """The trained models by name, as uploads and ``keep_state`` receive them, plus what
    the phases tracked: ``tracked[phase name]`` (a :class:`LabelStats`)."""

    def __init__(self, models: Mapping[str, nn.Module], tracked: Mapping[str, LabelStats] | None = None) -> None:
        super().__init__(models)
        self.tracked: dict[str, LabelStats] = dict(tracked or {})


@dataclass(frozen=True, eq=False)
class Phase:
    """One stage of local training.

    Args:
        loss: the loss over the models' outputs (see :mod:`kdfl.losses`).
        local: length (epochs or steps), batch size and optimizer of the phase.
        train: the models whose parameters this phase updates (one optimizer over all).
        frozen: models run forward without training (teachers), in eval mode.
        data: the phase's data; None = the client's private data.
        consts: per-client constants the loss reads (tensors or state dicts).
        outputs: what the models return besides logits: "features", "activations".
        name: reported as ``<name>_loss`` in the client's metrics.
        track: statistics accumulated over the phase's batches (:class:`LabelLogits`),
            read by the :class:`Tracked` upload or ``keep_state`` under the phase's name.
        adapters: models of ``train`` or ``frozen`` that the runners do not run on the
            batch: the loss applies them itself (``out.apply(name, t)``), e.g. a learned
            projection between two models' feature spaces (FedKD).
    """

    loss: Loss
    local: LocalSGD
    train: tuple[str, ...] = (MAIN,)
    frozen: tuple[str, ...] = ()
    data: Data | None = None
    consts: Mapping[str, Any] = field(default_factory=dict)
    outputs: frozenset[str] = frozenset()
    name: str = "train"
    track: Tracker | None = None
    adapters: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        stray = [m for m in self.adapters if m not in self.train + self.frozen]
        if stray:
            raise KdflError(f"phase {self.name!r}: adapters {stray} must also be listed in train or frozen")
        if self.track is not None and self.track.model in self.adapters:
            raise KdflError(f"phase {self.name!r} tracks adapter {self.track.model!r}, which never sees the batch")

    @property
    def forward(self) -> tuple[str, ...]:
        """Every model of the phase (trained and frozen, adapters included)."""
        return self.train + self.frozen

    @property
    def on_batch(self) -> tuple[str, ...]:
        """The models the runners run on the batch: all but the adapters."""
        return tuple(m for m in self.forward if m not in self.adapters)


# ----------------------------------------------------------------------------- uploads
@dataclass(frozen=True, eq=False)
class Delta:
    """``{"delta.<name>": w_trained - start}`` of model ``model``."""

    start: StateDict
    model: str = MAIN

    def make(self, models: Mapping[str, nn.Module]) -> Payload:
        trained = {k: v.detach() for k, v in models[self.model].state_dict().items()}
        return {DELTA + k: v for k, v in tree.sub(trained, self.start).items()}  # sub makes new tensors

    @staticmethod
    def make_stacked(uploads: Sequence[Delta], state: StateDict) -> list[Payload]:
        """:meth:`make` for many clients at once: ``state`` holds their trained states
        stacked on a leading client axis (row i: ``uploads[i]``). The same numbers, one
        subtraction per tensor for all clients; payload tensors are rows of the result."""
        first = uploads[0].start
        shared = all(u.start is first for u in uploads)
        delta: StateDict = {}
        for k, v in state.items():
            if not v.is_floating_point():
                delta[k] = v.clone()
            elif shared:
                delta[k] = v - first[k].to(v.device)
            else:
                delta[k] = v - torch.stack([u.start[k] for u in uploads]).to(v.device)
        rows = {k: v.unbind(0) for k, v in delta.items()}
        return [{DELTA + k: r[i] for k, r in rows.items()} for i in range(len(uploads))]


@dataclass(frozen=True, eq=False)
class Logits:
    """Logits of ``model`` in eval mode on ``x``: ``{key: (n, C) float32}``."""

    x: Tensor
    model: str = MAIN
    key: str = "logits"

    def make(self, models: Mapping[str, nn.Module]) -> Payload:
        return {self.key: predict(models[self.model], self.x)}


@dataclass(frozen=True, eq=False)
class Const:
    """Tensors known before training (label counts, ...), uploaded as they are."""

    payload: Payload

    def make(self, models: Mapping[str, nn.Module]) -> Payload:
        return dict(self.payload)


@dataclass(frozen=True, eq=False)
class Custom:
    """Anything computed from the trained models: ``fn(models) -> Payload``. ``fn``
    must not keep the models (the runner reuses them)."""

    fn: Callable[[Mapping[str, nn.Module]], Payload]

    def make(self, models: Mapping[str, nn.Module]) -> Payload:
        return self.fn(models)


@dataclass(frozen=True, eq=False)
class Tracked:
    """What phase ``phase`` tracked (``Phase(track=LabelLogits(C))``) as payload entries:
    ``{key: (C, C) float32 per-label average logits (rows of labels never seen: 0),
    counts_key: (C,) int64 label counts}``.

    Args:
        phase: the name of the tracking phase.
        key: the payload entry of the averages.
        counts_key: the payload entry of the counts ("" = averages only).
        start: sums and counts added before averaging: a tracker that persists across
            rounds (client state) or starts from pseudo-counts (FedGen's counts of 1).
    """

    phase: str = "train"
    key: str = "label_logits"
    counts_key: str = "label_counts"
    start: LabelStats | None = None

    def stats(self, models: Mapping[str, nn.Module]) -> LabelStats:
        """The phase's statistics (plus ``start``) from the runner's :class:`Trained` mapping."""
        tracked = getattr(models, "tracked", None)
        if tracked is None or self.phase not in tracked:
            raise KdflError(f"upload Tracked({self.phase!r}): no tracked statistics of phase {self.phase!r} "
                            "(run the program with kdfl's runners, which pass them on the trained models)")
        got: LabelStats = tracked[self.phase]
        return got if self.start is None else self.start + got

    def make(self, models: Mapping[str, nn.Module]) -> Payload:
        stats = self.stats(models)
        out: Payload = {self.key: stats.averages().cpu()}
        if self.counts_key:
            out[self.counts_key] = stats.counts.cpu().clone()
        return out


Upload = Delta | Logits | Const | Custom | Tracked


@dataclass(frozen=True, eq=False)
class Program:
    """What one client trains in one round (see the module docstring).

    Args:
        models: name -> :class:`Model`.
        phases: run in order; phase i draws its batch order from ``client.generator(i)``.
        upload: payload parts, merged in order.
        keep: models whose trained weights the client keeps (``ClientState.models``).
        keep_state: for clients that keep more than weights: ``keep_state(models, kept)``
            returns the client's state (a typed subclass of :class:`ClientState`) from the
            trained models (a :class:`Trained` mapping: ``models.tracked`` holds what the
            phases tracked) and the ``ClientState`` made of the ``keep`` models. It must
            copy what it keeps from the models.
        batchable: "" when the program may be batched with others of the same structure;
            otherwise the reason it may not (e.g. randomness inside the loss).
    """

    models: Mapping[str, Model]
    phases: Sequence[Phase]
    upload: Sequence[Upload] = ()
    keep: tuple[str, ...] = ()
    keep_state: Callable[[Mapping[str, nn.Module], ClientState], ClientState] | None = None
    batchable: str = ""

    def __post_init__(self) -> None:
        declared = self.models
        for ph in self.phases:
            unknown = [m for m in ph.train + ph.frozen if m not in declared]
            if unknown:
                raise KdflError(f"phase {ph.name!r} uses models {unknown} that the program does not declare "
                                f"(declared: {sorted(declared)})")
        missing = [m for m in self.keep if m not in declared]
        if missing:
            raise KdflError(f"program keeps models {missing} that it does not declare")
        tracking: set[str] = set()
        for ph in self.phases:
            if ph.track is None:
                continue
            if ph.track.model not in ph.forward:
                raise KdflError(f"phase {ph.name!r} tracks model {ph.track.model!r} but does not run it "
                                f"(add it to the phase's train or frozen models)")
            if ph.data is not None and ph.data.y is None:
                raise KdflError(f"phase {ph.name!r} tracks per-label logits on data without labels: give "
                                "its Data labels (y) or drop track")
            if ph.name in tracking:
                raise KdflError(f"two tracking phases are named {ph.name!r}: give them distinct names "
                                "(Tracked uploads find them by name)")
            tracking.add(ph.name)
        for up in self.upload:
            if isinstance(up, Tracked) and up.phase not in tracking:
                raise KdflError(f"upload Tracked({up.phase!r}) names no tracking phase (tracking phases: "
                                f"{sorted(tracking)}); set track= on that phase")


def fresh_weights(task: Task, client_id: int, arch: str) -> StateDict:
    """Weights of ``arch`` drawn for one client from (run seed, client id): a stateful
    client's model before its first round."""
    return tree.state_of(task.new_model(arch, seed=derive(task.seed, "client-init", client_id)))


def phase_data(phase: Phase, client: Client) -> Data:
    return phase.data if phase.data is not None else Data.private(client.data)


def client_metrics(per_phase: Sequence[dict[str, float]]) -> dict[str, float]:
    """Merged phase metrics plus ``steps``, the total over the phases."""
    out: dict[str, float] = {}
    steps = 0.0
    for m in per_phase:
        steps += m.pop("steps")
        out.update(m)
    out["steps"] = steps
    return out


def finish(program: Program, client: Client, models: Mapping[str, nn.Module],
           metrics: dict[str, float]) -> ClientUpdate:
    """The client's update from its trained models (a :class:`Trained` mapping when phases
    tracked statistics): the uploads and the kept state."""
    payload: Payload = {}
    for up in program.upload:
        payload.update(up.make(models))
    state = ClientState({m: tree.state_of(models[m]) for m in program.keep}) if program.keep else None
    if program.keep_state is not None:
        state = program.keep_state(models, state or ClientState())
    return ClientUpdate(client.id, len(client.data), payload, metrics, state)


def run_program(task: Task, client: Client, program: Program) -> ClientUpdate:
    """The reference runner: build the models, run the phases (accumulating what they
    track), make the update.

    Raises:
        KdflError: when a phase diverges (NaN or infinite loss).
    """
    models: dict[str, nn.Module] = {}
    try:
        for name, m in program.models.items():
            module = task.borrow_model(m.arch)
            models[name] = module
            module.load_state_dict(m.weights)
        tracked: dict[str, LabelStats] = {}
        per_phase = []
        for i, ph in enumerate(program.phases):
            stats = None
            if ph.track is not None:
                stats = tracked[ph.name] = ph.track.start(device=task.device)
            per_phase.append(local_train(models, ph, phase_data(ph, client), client.generator(i), stats))
        return finish(program, client, Trained(models, tracked), client_metrics(per_phase))
    finally:
        for name, module in models.items():  # nothing keeps them (uploads and state are copies)
            task.return_model(program.models[name].arch, module)


def at_round(program: Program, client: Client) -> Program:
    """``program`` with each phase's learning rate decayed for the client's round
    (``LocalSGD.lr_decay``; engine rounds are 1-based, so round 1 trains at ``lr``); the
    program itself when no phase decays."""
    if all(ph.local.lr_decay == 1 for ph in program.phases):
        return program
    phases = [replace(ph, local=ph.local.at_round(client.round - 1)) for ph in program.phases]
    return replace(program, phases=phases)


def run_client(algorithm: Any, task: Task, downlink: Payload, client: Client) -> ClientUpdate:
    """One client's round: the algorithm's program, run by the reference runner."""
    return run_program(task, client, at_round(algorithm.client_program(task, downlink, client), client))
