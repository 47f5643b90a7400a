"""The simulator: the round driver of :mod:`kdfl.simulation.rounds` with an in-process
transport, plus the run loop (resume, metrics, checkpoints). It never branches on the
algorithm.

The in-process transport (:class:`LocalTransport`) does what the network and the
clients' machines do in a deployment: it compresses and encodes each downlink (bytes
counted) and decodes it on the client side, runs the clients through the executor, keeps
each client's state (a client keeps its state whenever its training finished, like a
Flower node does), lets Byzantine clients tamper with their uploads, compresses and
encodes every upload (bytes counted) and decodes it for the server. A client that
raises, or whose upload cannot be encoded, is a failed client; an upload that cannot be
decoded is rejected with a reason; the round goes on. With ``[privacy]`` mode "local" it
clips and noises every upload on the client side (after the executor, before any
tampering and encoding); mode "central" clips and noises the accepted uploads on the
server (:class:`kdfl.privacy.CentralDP`); the engine reports ε per round.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from kdfl import privacy as dp
from kdfl import tree, wire
from kdfl.compression import Codec
from kdfl.rng import derive
from kdfl.simulation import checkpoint
from kdfl.simulation.clients import ClientStore
from kdfl.simulation.executors import ClientFailure, Executor, Sequential
from kdfl.simulation.rounds import (  # noqa: F401  (re-exported: the engine's public names)
    Exchange,
    Reply,
    RunSettings,
    accept_upload,
    evaluate_state,
    final_client_eval,
    round_record,
    run_round,
    summarize,
)
from kdfl.transport import pack, unpack
from kdfl.types import (
    Algorithm,
    Client,
    ClientInfo,
    ClientState,
    ClientUpdate,
    KdflError,
    Payload,
    PayloadError,
    ServerState,
    Task,
    TensorData,
)

log = logging.getLogger(__name__)


class Threat(Protocol):
    """Byzantine behaviour, applied on the client side to the malicious clients."""

    def poison(self, client: Client, task: Task) -> Client: ...

    def tamper(
        self, updates: list[ClientUpdate], malicious: list[bool], round_num: int, task: Task
    ) -> list[ClientUpdate]: ...


@dataclass
class History:
    """What a run produced: one record per round plus the summary."""

    records: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    state: ServerState | None = None
    clients: dict[str, Any] = field(default_factory=dict)  # the final per-client metrics


def make_client(task: Task, rows: Tensor, info: ClientInfo, state: ClientState | None,
                threat: Threat | None) -> Client:
    """Client ``info.id`` for one round, exactly as every runtime builds it: its rows of
    the training pool, its seed from (run seed, round, id), its kept state, and its data
    poisoned when it is malicious under a data attack."""
    client = Client(
        id=info.id, data=task.train.subset(rows), arch=info.arch, round=info.round,
        seed=derive(task.seed, "client", info.round, info.id), state=state, malicious=info.id in task.malicious,
    )
    if client.malicious and threat is not None:
        client = threat.poison(client, task)
    return client


class LocalTransport:
    """The simulator's transport: codecs and wire in process, clients on an executor.

    ``states`` holds the stateful clients' :class:`ClientState` between rounds.
    """

    def __init__(self, algorithm: Algorithm, task: Task, partitions: Sequence[Tensor], executor: Executor,
                 threat: Threat | None = None, uplink_codec: Codec | None = None,
                 downlink_codec: Codec | None = None, states: MutableMapping[int, ClientState] | None = None,
                 holdouts: Sequence[Tensor] | None = None, privacy: dp.PrivacySettings | None = None) -> None:
        self.algorithm, self.task, self.partitions, self.executor = algorithm, task, partitions, executor
        self.privacy = privacy
        self.threat, self.uplink_codec, self.downlink_codec = threat, uplink_codec, downlink_codec
        self.states: MutableMapping[int, ClientState] = {} if states is None else states
        self.holdouts = holdouts

    def _downlinks(self, jobs: Sequence[tuple[ClientInfo, Payload]]) -> list[tuple[int, Payload]]:
        """(bytes, the client's decoding) of each job's downlink, encoded once per distinct payload."""
        cache: dict[int, tuple[int, Payload, Payload]] = {}
        out = []
        for _, payload in jobs:
            if id(payload) not in cache:
                buf = wire.encode(pack(payload, self.downlink_codec))
                decoded = tree.to_device(unpack(wire.decode(buf), self.downlink_codec), self.task.device)
                cache[id(payload)] = (len(buf), decoded, payload)  # keeps id alive
            nb, decoded, _ = cache[id(payload)]
            out.append((nb, decoded))
        return out

    def evaluate(self, round_num: int, jobs: Sequence[tuple[ClientInfo, Payload]]) -> list[dict[str, float]]:
        """Per-client metrics, each client evaluated in process (not counted as traffic)."""
        from kdfl.simulation.clients import evaluate_client

        results: list[dict[str, float]] = []
        test_cache: dict[bytes, float] = {}  # clients with identical models share one test pass
        for (info, _), (_, downlink) in zip(jobs, self._downlinks(jobs), strict=True):
            client = make_client(self.task, self.partitions[info.id], info, self.states.get(info.id), None)
            holdout = None if self.holdouts is None else self.task.train.subset(self.holdouts[info.id])
            try:
                results.append(evaluate_client(self.algorithm, self.task, downlink, client, holdout, test_cache))
            except KdflError as e:
                log.warning("round %d: client %d could not be evaluated: %s", round_num, info.id, e)
                results.append({})
        return results

    def exchange(self, round_num: int, jobs: Sequence[tuple[ClientInfo, Payload]]) -> Exchange:
        # downlink: encode once per distinct payload object, decode on the client side
        down_bytes, downlinks = [], []
        for (info, _), (nb, decoded) in zip(jobs, self._downlinks(jobs), strict=True):
            down_bytes.append(nb)
            downlinks.append((info, decoded))

        # a store that bounds the states in memory also bounds a round: clients are built and
        # run in chunks of that size, and each chunk's states go to the store before the next
        chunk = max(getattr(self.states, "in_memory", 0) or len(downlinks), 1)
        replies: dict[int, Reply] = {}
        updates = []
        for lo in range(0, len(downlinks), chunk):
            runs = [(make_client(self.task, self.partitions[info.id], info, self.states.get(info.id), self.threat),
                     decoded) for info, decoded in downlinks[lo:lo + chunk]]
            for r in self.executor.run(self.algorithm, self.task, runs):
                if isinstance(r, ClientFailure):
                    replies[r.client_id] = Reply(r.client_id, error=r.error)
                    continue
                if r.client_state is not None:  # the client keeps what it trained, whatever the server decides
                    self.states[r.client_id] = r.client_state
                    r = dataclasses.replace(r, client_state=None)
                updates.append(r)
            del runs
        record: dict[str, Any] = {}
        if self.privacy is not None and self.privacy.mode == "local" and updates:  # on the clients, before tampering
            updates, record = dp.local_noise(updates, self.privacy, self.task.seed, round_num)
        if self.threat is not None and updates:
            updates = self.threat.tamper(updates, [u.client_id in self.task.malicious for u in updates], round_num,
                                         self.task)

        # uplink: what crosses the wire is the encoding; the server sees its decoding
        for u in updates:
            try:
                buf = wire.encode(pack(u.payload, self.uplink_codec))
            except (KdflError, ValueError, RuntimeError) as e:  # e.g. fp16 overflow: the client cannot send
                replies[u.client_id] = Reply(u.client_id, error=f"cannot encode its upload: {e}")
                continue
            received: Payload | None
            try:
                received = tree.to_device(unpack(wire.decode(buf, wire.upload_limit()), self.uplink_codec),
                                          self.task.device)
                reject = None
            except PayloadError as e:
                received, reject = None, str(e)
            replies[u.client_id] = Reply(u.client_id, u.num_examples, received, u.metrics, len(buf), reject=reject)
        return Exchange(down_bytes, [replies[info.id] for info, _ in jobs], record)


class Engine:
    """Runs ``algorithm`` on ``task`` whose clients hold ``partitions`` of ``task.train``."""

    def __init__(
        self,
        algorithm: Algorithm,
        task: Task,
        partitions: Sequence[np.ndarray],
        settings: RunSettings,
        executor: Executor | None = None,
        threat: Threat | None = None,
        run_dir: Path | None = None,
        on_round: Callable[[dict[str, Any]], None] | None = None,
        uplink_codec: Codec | None = None,
        downlink_codec: Codec | None = None,
        holdouts: Sequence[np.ndarray] | None = None,
        privacy: dp.PrivacySettings | None = None,
    ) -> None:
        self.algorithm, self.task, self.settings = algorithm, task, settings
        self.privacy = privacy if privacy is not None and privacy.enabled else None
        dp.check_combination(algorithm, self.privacy)
        self.partitions = [torch.as_tensor(np.asarray(p), dtype=torch.long) for p in partitions]
        self.holdouts = None if holdouts is None else [torch.as_tensor(np.asarray(h), dtype=torch.long)
                                                         for h in holdouts]
        self.executor = executor or Sequential()
        self.threat = threat
        self.run_dir = run_dir
        self.on_round = on_round
        self.uplink_codec, self.downlink_codec = uplink_codec, downlink_codec
        if len(task.client_archs) != len(self.partitions):
            raise KdflError(f"{len(self.partitions)} partitions but {len(task.client_archs)} client architectures")

    def transport(self, states: MutableMapping[int, ClientState]) -> LocalTransport:
        return LocalTransport(self.algorithm, self.task, self.partitions, self.executor, self.threat,
                              self.uplink_codec, self.downlink_codec, states, self.holdouts, self.privacy)

    def holdout(self, cid: int) -> TensorData | None:
        """Client ``cid``'s held-out split (``data.client_holdout``), or None."""
        return None if self.holdouts is None else self.task.train.subset(self.holdouts[cid])

    def client(self, cid: int, round_num: int, state: ClientState | None = None) -> Client:
        """Client ``cid`` in ``round_num``, as the transport builds it."""
        info = ClientInfo(cid, self.task.client_archs[cid], round_num)
        return make_client(self.task, self.partitions[cid], info, state, self.threat)

    def round(self, state: ServerState, round_num: int,
              client_states: MutableMapping[int, ClientState]) -> tuple[ServerState, dict[str, Any]]:
        """One round (``client_states`` is updated in place with what clients keep)."""
        algorithm: Algorithm = self.algorithm
        if self.privacy is not None and self.privacy.mode == "central":  # the trusted server clips and noises
            algorithm = dp.CentralDP(self.algorithm, self.privacy)
        return run_round(algorithm, self.task, state, round_num, self.settings, len(self.partitions),
                         self.transport(client_states))

    def epsilon(self, records: Sequence[dict[str, Any]]) -> float:
        """ε at ``privacy.delta`` after ``records`` (see :func:`kdfl.privacy.run_epsilon`)."""
        assert self.privacy is not None
        return dp.run_epsilon(self.privacy, records, len(self.partitions), self.settings.clients_per_round)

    # -- the run ---------------------------------------------------------------------
    def run(self, resume: bool = False) -> History:
        """Run all rounds (continuing from the checkpoint when ``resume``)."""
        hist = History()
        in_memory = self.settings.client_states_in_memory
        store_dir = None if self.run_dir is None else self.run_dir / "client_states"
        client_states: MutableMapping[int, ClientState] = ClientStore(store_dir, in_memory) if in_memory else {}
        start = 1
        if resume:
            if self.run_dir is None:
                raise KdflError("resume needs a run directory (--out DIR)")
            ck = checkpoint.load(self.run_dir)
            state, hist.records = ck["state"], ck["records"]
            saved = ck["client_states"]
            if isinstance(saved, dict) and not in_memory:
                client_states = saved
            elif isinstance(saved, dict):  # states were in the checkpoint; keep them in files from now on
                client_states.update(saved)
            else:  # ("files", manifest): the states are in run_dir/client_states
                assert store_dir is not None
                client_states = ClientStore.open(store_dir, in_memory or 1, saved[1])
                if not in_memory:
                    client_states = dict(client_states.items())
            start = ck["round"] + 1
            log.info("resuming after round %d", ck["round"])
        else:
            state = self.algorithm.init(self.task)
        if self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with open(self.run_dir / "metrics.jsonl", "w") as f:  # rewritten so a resume leaves no duplicates
                for rec in hist.records:
                    f.write(json.dumps(rec) + "\n")
        for r in range(start, self.settings.rounds + 1):
            state, record = self.round(state, r, client_states)
            if self.privacy is not None:
                record["epsilon"] = self.epsilon([*hist.records, record])
            hist.records.append(record)
            if self.run_dir is not None:
                with open(self.run_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
                every = self.settings.checkpoint_every
                if every and (r % every == 0 or r == self.settings.rounds):
                    saved_states: Any = client_states
                    if isinstance(client_states, ClientStore):  # the files, by name (the checkpoint stays small)
                        saved_states = ("files", client_states.commit())
                    checkpoint.save(
                        self.run_dir,
                        {"round": r, "state": state, "client_states": saved_states, "records": hist.records},
                    )
            if self.on_round is not None:
                self.on_round(record)
        hist.state = state
        clients = final_client_eval(self.algorithm, self.task, state, hist.records, len(self.partitions),
                                    self.transport(client_states))
        hist.clients = clients
        hist.summary = summarize(hist.records, self.settings.target_accuracy, clients)
        if self.privacy is not None:
            hist.summary.update(epsilon=self.epsilon(hist.records), delta=self.privacy.delta,
                                privacy_mode=self.privacy.mode, noise_multiplier=self.privacy.noise_multiplier,
                                clip=self.privacy.clip)
        if self.run_dir is not None:
            (self.run_dir / "summary.json").write_text(json.dumps(hist.summary, indent=2) + "\n")
            (self.run_dir / "clients.json").write_text(json.dumps(clients) + "\n")
        return hist
