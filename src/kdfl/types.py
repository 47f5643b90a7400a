"""Core types shared by every part of kdfl.

The vocabulary: a *client* trains in a *round* and sends an *update* whose *payload*
(named tensors) crosses the wire; the server turns the updates into a new *state*.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from kdfl.errors import KdflError as KdflError  # re-exported: defined without torch, for the CLI

StateDict = dict[str, Tensor]
Payload = dict[str, Tensor]  # named tensors that cross the wire: "delta", "logits", ...


class PayloadError(KdflError):
    """A payload that cannot be decoded or fails validation (NaN, wrong shape/dtype...)."""


@dataclass(frozen=True)
class TensorData:
    """An in-memory labelled data set. ``x``: (n, *input_shape) float32, ``y``: (n,) int64."""

    x: Tensor
    y: Tensor
    # (parent, row indices) when made by ``parent.subset``: lets a process pool that holds
    # the parent send the indices instead of the rows; never pickled, never compared
    origin: tuple[TensorData, Tensor] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.x.shape[0] != self.y.shape[0]:
            raise KdflError(f"x has {self.x.shape[0]} rows but y has {self.y.shape[0]}")

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def subset(self, index: Tensor | Sequence[int]) -> TensorData:
        idx = torch.as_tensor(index, dtype=torch.long)
        return TensorData(self.x[idx], self.y[idx], (self, idx))

    def __getstate__(self) -> dict[str, Any]:
        return {"x": self.x, "y": self.y}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for k, v in {**state, "origin": None}.items():
            object.__setattr__(self, k, v)


@dataclass(frozen=True)
class ClientState:
    """What a stateful client keeps between rounds; it never crosses the wire.

    ``models`` holds the weights of the programs' kept models by name (FedMD's own
    model, FedKD's mentor, a heterogeneous FedEMA-Distill client's model). Algorithms
    that keep more subclass it with typed fields. The runtime that holds the client
    (the simulator's client store, a Flower node's ``context.state``) stores it whenever
    the client's training finished, whatever the server does with its upload: a real
    client cannot know that its upload was rejected.
    """

    models: dict[str, StateDict] = field(default_factory=dict)


@dataclass(frozen=True)
class ClientUpdate:
    """What one client returns after a round.

    ``payload`` is all that crosses the wire (bytes are measured on its encoding).
    ``client_state`` stays on the client (see :class:`ClientState`).
    New algorithms add *keys* to ``payload``, never fields here.
    """

    client_id: int
    num_examples: int
    payload: Payload
    metrics: dict[str, float] = field(default_factory=dict)
    client_state: ClientState | None = None


@dataclass(frozen=True)
class ServerState:
    """The server's state after a round: the base of every algorithm's typed state.

    ``params`` are the weights of the evaluated global model (architecture
    ``task.server_arch``). Algorithms that keep more (server momentum, EMA weights,
    per-architecture prototypes, ...) declare a frozen subclass with typed fields, as
    fedjax's per-algorithm ``ServerState`` does; everything in it must be picklable with
    ``torch.save`` so that checkpoints can resume. Round metrics are returned beside the
    state by ``server_update``, never stored in it.
    """

    params: StateDict
    round: int = 0


@dataclass(frozen=True)
class ClientInfo:
    """What the server knows of a client when it builds the client's downlink: its id,
    architecture and the round. Never its data or its kept state, which live on the
    client (on Flower they are on another machine)."""

    id: int
    arch: str
    round: int


@dataclass
class Client:
    """One client as its program sees it in one round (on the client side: its data and kept state)."""

    id: int
    data: TensorData
    arch: str
    round: int
    seed: int  # derived from (run seed, round, client id); see ``kdfl.rng``
    state: ClientState | None = None
    malicious: bool = False

    @property
    def info(self) -> ClientInfo:
        return ClientInfo(self.id, self.arch, self.round)

    def kept(self, name: str) -> StateDict | None:
        """The weights of kept model ``name`` from an earlier round, or None."""
        return None if self.state is None else self.state.models.get(name)

    def generator(self, stream: int = 0) -> torch.Generator:
        """A fresh generator for this (round, client) and a named sub-stream."""
        from kdfl.rng import derive

        return torch.Generator().manual_seed(derive(self.seed, stream))


@dataclass
class Task:
    """Everything an algorithm needs besides its hyperparameters.

    Args:
        train: the whole training pool (clients hold index subsets of it).
        test: the global test set.
        proxy: unlabeled public inputs for distillation, (N, *input_shape), or None.
        val: optional labeled server validation slice.
        num_classes: C.
        input_shape: shape of one input, e.g. (1, 8, 8) or (40,).
        server_arch: architecture of the global (server) model.
        client_archs: architecture of each client, indexed by client id.
        build_model: ``build_model(arch_name) -> nn.Module`` with fresh random weights
            drawn from torch's current generator (callers seed it).
        seed: run seed.
        device: where training runs.
        malicious: ids of the Byzantine clients (fixed for the run).
        proxy_labels: (N,) labels of the proxy rows when the public set is labeled
            (``data.proxy = "holdout"``), else None.
    """

    train: TensorData
    test: TensorData
    proxy: Tensor | None
    val: TensorData | None
    num_classes: int
    input_shape: tuple[int, ...]
    server_arch: str
    client_archs: list[str]
    build_model: Callable[[str], nn.Module]
    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    malicious: frozenset[int] = frozenset()
    proxy_labels: Tensor | None = None
    _scratch: dict[str, list[nn.Module]] = field(default_factory=dict, init=False, repr=False, compare=False)

    def new_model(self, arch: str | None = None, seed: int | None = None) -> nn.Module:
        """Build ``arch`` (default: the server's) with weights drawn from ``seed``."""
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only (what fork_rng restores): torch.manual_seed would also
            # seed every accelerator backend, which costs ~1 ms per call even without one
            torch.default_generator.manual_seed(self.seed if seed is None else seed)
            model = self.build_model(arch or self.server_arch)
        return model.to(self.device)

    def borrow_model(self, arch: str) -> nn.Module:
        """A model of ``arch`` whose weights the caller overwrites (``load_state_dict``)
        before use: a reused scratch instance when one is free, else a new one. Give it
        back with :meth:`return_model` once nothing refers to it any more; building a
        model per client cost more than one client's training step for small models."""
        pool = self._scratch.get(arch)
        return pool.pop() if pool else self.new_model(arch)

    def return_model(self, arch: str, model: nn.Module) -> None:
        """Put a borrowed model back for reuse. Models whose state dict does not cover all
        their state (non-persistent buffers, which ``load_state_dict`` would not reset)
        are never reused."""
        reusable = getattr(model, "_kdfl_reusable", None)
        if reusable is None:  # checked once per model
            keys = model.state_dict().keys()
            reusable = all(name in keys for name, _ in model.named_buffers())
            model.__dict__["_kdfl_reusable"] = reusable
        if not reusable:
            return
        pool = self._scratch.setdefault(arch, [])
        for p in model.parameters():
            p.grad = None
        if len(pool) < 4:
            pool.append(model)

    def __getstate__(self) -> dict[str, Any]:  # scratch models stay in their process
        state = dict(self.__dict__)
        state["_scratch"] = {}
        return state


RoundMetrics = dict[str, float]


@runtime_checkable
class Algorithm(Protocol):
    """The contract every algorithm meets: pure halves, state in, state out.

    ``init`` makes the typed server state; ``configure`` says what the server sends one
    client (the downlink payload, measured in bytes like the uplink) from what the server
    knows of it (:class:`ClientInfo`); ``client_program`` declares what the client trains
    (:class:`kdfl.algorithms.program.Program`), which an executor runs;
    ``validate`` rejects a malformed upload (raise :class:`PayloadError`);
    ``server_update`` folds the accepted updates into a new state and returns the round's
    metrics beside it.
    """

    def init(self, task: Task) -> ServerState: ...

    def configure(self, task: Task, state: ServerState, client: ClientInfo) -> Payload: ...

    def client_program(self, task: Task, downlink: Payload, client: Client) -> Any: ...

    def validate(self, task: Task, state: ServerState, update: ClientUpdate) -> None: ...

    def server_update(
        self, task: Task, state: ServerState, updates: Sequence[ClientUpdate]
    ) -> tuple[ServerState, RoundMetrics]: ...
