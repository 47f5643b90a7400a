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

Examples (FedAvg's and a FedMD-like client)::

    Program(models={MAIN: Model(client.arch, downlink)},
            phases=[Phase(CrossEntropy(), self.local)],
            upload=[Delta(downlink)])

    Program(models={MAIN: Model(client.arch, client.kept(MAIN) or fresh_weights(task, client))},
            phases=[Phase(L1Logits(), digest, data=Data(proxy[idx], targets={"q": consensus})),
                    Phase(CrossEntropy(), self.local)],
            upload=[Logits(proxy[next_idx])], keep=(MAIN,))
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
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
    """

    loss: Loss
    local: LocalSGD
    train: tuple[str, ...] = (MAIN,)
    frozen: tuple[str, ...] = ()
    data: Data | None = None
    consts: Mapping[str, Any] = field(default_factory=dict)
    outputs: frozenset[str] = frozenset()
    name: str = "train"

    @property
    def forward(self) -> tuple[str, ...]:
        return self.train + self.frozen


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


Upload = Delta | Logits | Const | Custom


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
            trained models and the ``ClientState`` made of the ``keep`` models. It must
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
    """The client's update from its trained models: the uploads and the kept state."""
    payload: Payload = {}
    for up in program.upload:
        payload.update(up.make(models))
    state = ClientState({m: tree.state_of(models[m]) for m in program.keep}) if program.keep else None
    if program.keep_state is not None:
        state = program.keep_state(models, state or ClientState())
    return ClientUpdate(client.id, len(client.data), payload, metrics, state)


def run_program(task: Task, client: Client, program: Program) -> ClientUpdate:
    """The reference runner: build the models, run the phases, make the update.

    Raises:
        KdflError: when a phase diverges (NaN or infinite loss).
    """
    models: dict[str, nn.Module] = {}
    try:
        for name, m in program.models.items():
            module = task.borrow_model(m.arch)
            models[name] = module
            module.load_state_dict(m.weights)
        per_phase = [local_train(models, ph, phase_data(ph, client), client.generator(i))
                     for i, ph in enumerate(program.phases)]
        return finish(program, client, models, client_metrics(per_phase))
    finally:
        for name, module in models.items():  # nothing keeps them (uploads and state are copies)
            task.return_model(program.models[name].arch, module)


def run_client(algorithm: Any, task: Task, downlink: Payload, client: Client) -> ClientUpdate:
    """One client's round: the algorithm's program, run by the reference runner."""
    return run_program(task, client, algorithm.client_program(task, downlink, client))
