"""The round loop. It never branches on the algorithm.

Per round: sample clients, build each downlink payload (``algorithm.configure``),
compress and encode it (bytes counted) and decode it on the client side, run the clients
through the executor, let Byzantine clients tamper with their uploads, compress and
encode every upload (bytes counted), decode and validate it (malformed payloads are rejected and logged), fold the
accepted updates into the server state, evaluate, log, checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from kdfl import metrics, wire
from kdfl.compression import Codec
from kdfl.rng import derive
from kdfl.simulation import checkpoint
from kdfl.simulation.executors import ClientFailure, Executor, Sequential
from kdfl.simulation.sampling import dropouts, sample_clients
from kdfl.train import evaluate
from kdfl.transport import pack, unpack
from kdfl.types import Algorithm, Client, ClientUpdate, KdflError, Payload, PayloadError, ServerState, Task

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunSettings:
    """Round-loop settings (the ``[run]`` config section).

    Args:
        rounds: communication rounds.
        clients_per_round: clients sampled per round (0 = all).
        eval_every: evaluate the global model every k rounds (and after the last).
        target_accuracy: accuracy for ``rounds_to_target`` (None: not reported).
        dropout: probability that a sampled client drops out before training.
        checkpoint_every: write a checkpoint every k rounds (0 = never).
    """

    rounds: int = 10
    clients_per_round: int = 0
    eval_every: int = 1
    target_accuracy: float | None = None
    dropout: float = 0.0
    checkpoint_every: int = 1

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.eval_every < 1 or self.clients_per_round < 0 or self.checkpoint_every < 0:
            raise KdflError("run: rounds and eval_every must be >= 1, clients_per_round and checkpoint_every >= 0")
        if not 0 <= self.dropout < 1:
            raise KdflError(f"run.dropout must be in [0, 1), got {self.dropout}")


class Threat(Protocol):
    """Byzantine behaviour, applied by the engine to the malicious clients."""

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


def evaluate_state(task: Task, state: ServerState) -> dict[str, float]:
    """Accuracy, NLL and ECE of the server model ``state.params`` on the test set."""
    model = task.new_model(task.server_arch)
    model.load_state_dict(state.params)
    return evaluate(model, task.test)


def _finite(payload: Payload) -> None:
    for k, v in payload.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise PayloadError(f"payload entry {k!r} holds NaN or infinite values")


def accept_upload(
    algorithm: Algorithm, task: Task, state: ServerState, update: ClientUpdate, payload: Payload
) -> ClientUpdate:
    """The update as the server received it (``payload`` decoded from the wire), checked:
    finite values and the algorithm's own ``validate``. Raises PayloadError."""
    _finite(payload)
    received = ClientUpdate(update.client_id, update.num_examples, payload, update.metrics, update.client_state)
    validate = getattr(algorithm, "validate", None)
    if validate is not None:
        validate(task, state, received)
    return received


def round_record(
    task: Task,
    state: ServerState,
    round_num: int,
    settings: RunSettings,
    *,
    sampled: Sequence[int],
    dropped: Iterable[int],
    failed: Sequence[int],
    rejected: Sequence[int],
    active: Sequence[int],
    up_bytes: Sequence[int],
    down_bytes: Sequence[int],
    accepted: Sequence[ClientUpdate],
) -> dict[str, Any]:
    """The per-round record (without ``wall_seconds``), evaluating ``state`` when due.

    Shared by the engine and the Flower ServerApp so both write the same records.
    """
    record: dict[str, Any] = {
        "round": round_num,
        "clients": sampled,
        "dropped": sorted(dropped),
        "failed": list(failed),
        "rejected": rejected,
        "malicious": [c for c in active if c in task.malicious],
        "uplink_bytes": int(sum(up_bytes)),
        "downlink_bytes": int(sum(down_bytes)),
        "uplink_bytes_per_client": float(np.mean(up_bytes)) if up_bytes else 0.0,
        "downlink_bytes_per_client": float(np.mean(down_bytes)) if down_bytes else 0.0,
        "train_loss": float(np.mean([u.metrics.get("train_loss", math.nan) for u in accepted]))
        if accepted
        else math.nan,
    }
    for key in sorted({k for u in accepted for k in u.metrics} - {"train_loss", "steps"}):
        record[key] = float(np.mean([u.metrics[key] for u in accepted if key in u.metrics]))
    for key, value in state.extra.get("metrics", {}).items():
        record[key] = value
    if round_num % settings.eval_every == 0 or round_num == settings.rounds:
        record.update(evaluate_state(task, state))
    return record


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
    ) -> None:
        self.algorithm, self.task, self.settings = algorithm, task, settings
        self.partitions = [torch.as_tensor(np.asarray(p), dtype=torch.long) for p in partitions]
        self.executor = executor or Sequential()
        self.threat = threat
        self.run_dir = run_dir
        self.on_round = on_round
        self.uplink_codec, self.downlink_codec = uplink_codec, downlink_codec
        if len(task.client_archs) != len(self.partitions):
            raise KdflError(f"{len(self.partitions)} partitions but {len(task.client_archs)} client architectures")

    # -- one round -------------------------------------------------------------------
    def _client(self, cid: int, round_num: int, client_states: dict[int, Any]) -> Client:
        client = Client(
            id=cid,
            data=self.task.train.subset(self.partitions[cid]),
            arch=self.task.client_archs[cid],
            round=round_num,
            seed=derive(self.task.seed, "client", round_num, cid),
            state=client_states.get(cid),
            malicious=cid in self.task.malicious,
        )
        if client.malicious and self.threat is not None:
            client = self.threat.poison(client, self.task)
        return client

    def round(
        self, state: ServerState, round_num: int, client_states: dict[int, Any]
    ) -> tuple[ServerState, dict[str, Any]]:
        s, task = self.settings, self.task
        t0 = time.perf_counter()
        n = len(self.partitions)
        sampled = sample_clients(n, s.clients_per_round or n, task.seed, round_num)
        dropped = dropouts(sampled, s.dropout, task.seed, round_num)
        active = [c for c in sampled if c not in dropped]

        # downlink: encode once per distinct payload object, decode on the client side
        jobs, down_bytes, cache = [], [], {}
        for cid in active:
            client = self._client(cid, round_num, client_states)
            payload = self.algorithm.configure(task, state, client)
            if id(payload) not in cache:
                buf = wire.encode(pack(payload, self.downlink_codec))
                cache[id(payload)] = (len(buf), unpack(wire.decode(buf), self.downlink_codec), payload)  # keep payload alive for id()
            nb, decoded, _ = cache[id(payload)]
            down_bytes.append(nb)
            jobs.append((client, decoded))

        results = self.executor.run(self.algorithm, task, jobs)
        failed = [r for r in results if isinstance(r, ClientFailure)]
        for f in failed:
            log.warning("round %d: client %d failed and is excluded: %s", round_num, f.client_id, f.error)
        updates = [r for r in results if isinstance(r, ClientUpdate)]
        if self.threat is not None and updates:
            updates = self.threat.tamper(updates, [u.client_id in task.malicious for u in updates], round_num, task)

        # uplink: what crosses the wire is the encoding; the server sees its decoding
        accepted, rejected, up_bytes = [], [], []
        for u in updates:
            buf = wire.encode(pack(u.payload, self.uplink_codec))
            up_bytes.append(len(buf))
            try:
                received = accept_upload(self.algorithm, task, state, u, unpack(wire.decode(buf), self.uplink_codec))
            except PayloadError as e:
                log.warning("round %d: payload of client %d rejected: %s", round_num, u.client_id, e)
                rejected.append(u.client_id)
                continue
            accepted.append(received)
            if u.client_state is not None:
                client_states[u.client_id] = u.client_state

        if accepted:
            state = self.algorithm.server_update(task, state, accepted)
        else:
            log.warning("round %d: no client update accepted; the server state is unchanged", round_num)
            state = ServerState(state.params, state.round + 1, state.extra)

        record = round_record(
            task, state, round_num, s, sampled=sampled, dropped=dropped, failed=[f.client_id for f in failed],
            rejected=rejected, active=active, up_bytes=up_bytes, down_bytes=down_bytes, accepted=accepted,
        )
        record["wall_seconds"] = time.perf_counter() - t0
        return state, record

    # -- the run ---------------------------------------------------------------------
    def run(self, resume: bool = False) -> History:
        """Run all rounds (continuing from the checkpoint when ``resume``)."""
        hist = History()
        client_states: dict[int, Any] = {}
        start = 1
        if resume:
            if self.run_dir is None:
                raise KdflError("resume needs a run directory (--out DIR)")
            ck = checkpoint.load(self.run_dir)
            state, client_states, hist.records = ck["state"], ck["client_states"], ck["records"]
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
            hist.records.append(record)
            if self.run_dir is not None:
                with open(self.run_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
                every = self.settings.checkpoint_every
                if every and (r % every == 0 or r == self.settings.rounds):
                    checkpoint.save(
                        self.run_dir,
                        {"round": r, "state": state, "client_states": client_states, "records": hist.records},
                    )
            if self.on_round is not None:
                self.on_round(record)
        hist.state = state
        hist.summary = summarize(hist.records, self.settings.target_accuracy)
        if self.run_dir is not None:
            (self.run_dir / "summary.json").write_text(json.dumps(hist.summary, indent=2) + "\n")
        return hist


def summarize(records: Sequence[dict[str, Any]], target: float | None) -> dict[str, Any]:
    """The run summary written to ``summary.json``."""
    evals = [r for r in records if "accuracy" in r]
    accs = [r["accuracy"] for r in evals]
    last = evals[-1] if evals else {}
    return {
        "rounds": len(records),
        "final_accuracy": last.get("accuracy"),
        "best_accuracy": max(accs) if accs else None,
        "final_nll": last.get("nll"),
        "final_ece": last.get("ece"),
        "target_accuracy": target,
        "rounds_to_target": metrics.rounds_to_target([r["round"] for r in evals], accs, target),
        "uplink_bytes_per_client_round": float(np.mean([r["uplink_bytes_per_client"] for r in records])),
        "downlink_bytes_per_client_round": float(np.mean([r["downlink_bytes_per_client"] for r in records])),
        "uplink_bytes_total": int(sum(r["uplink_bytes"] for r in records)),
        "downlink_bytes_total": int(sum(r["downlink_bytes"] for r in records)),
        "wall_seconds": float(sum(r["wall_seconds"] for r in records)),
        "failed_clients": sum(len(r["failed"]) for r in records),
        "rejected_payloads": sum(len(r["rejected"]) for r in records),
    }
