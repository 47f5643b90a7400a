"""The one round driver, shared by the simulator engine and the Flower ServerApp.

Per round: sample clients, drop some, build each downlink (``algorithm.configure`` from
what the server knows of the client: :class:`~kdfl.types.ClientInfo`), hand the
downlinks to a :class:`Transport`, check what comes back (finite values and the
algorithm's ``validate``; malformed uploads are rejected with a reason), fold the
accepted updates into the server state, evaluate and record. It never branches on the
algorithm, and only the transport differs between runtimes: the simulator's
(:class:`kdfl.simulation.engine.LocalTransport`: executors, threat model and codecs in
process, bytes measured on :mod:`kdfl.wire` encodings) and Flower's
(:mod:`kdfl.flower.server_app`: messages to SuperNodes, bytes measured on the records).
Client state lives on the client side of the transport in both.

Stragglers (``[run] deadline``): every client has a speed drawn once per run
(:func:`~kdfl.simulation.sampling.client_speed`) and a simulated time per round, its
local work (training examples processed: ``num_examples x local.epochs``, or
``local.steps x batch size``) at that speed plus its upload at ``upload_bandwidth``. An
upload whose client needs longer than the deadline arrives late: it is counted (``late``;
its bytes were sent, so they count in ``uplink_bytes``) but never checked nor aggregated.
Late clients train as everyone else and keep what they trained, as a real client would.
Uploads larger than ``[run] max_upload_bytes`` are rejected before they are decoded.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from kdfl import wire
from kdfl.simulation.sampling import client_speed, dropouts, sample_clients, simulated_seconds
from kdfl.train import evaluate
from kdfl.types import (
    Algorithm,
    ClientInfo,
    ClientUpdate,
    KdflError,
    Payload,
    PayloadError,
    RoundMetrics,
    ServerState,
    Task,
)

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
        client_eval_every: also evaluate every client's model (per-client metrics) every k
            rounds, in the round's record (0 = never); the run always evaluates them after
            its last round, for the summary.
        client_states_in_memory: the simulator keeps at most this many stateful clients'
            states in memory and the rest in files (0 = all in memory).
        deadline: simulated seconds a round waits for uploads; clients whose simulated
            time exceeds it are stragglers: their uploads are dropped (``late``). 0 = no
            deadline.
        speed_spread: sigma of the lognormal client speeds (median 1; 0 = all equal; at most 10).
        examples_per_second: training examples a median-speed client processes per
            simulated second.
        upload_bandwidth: uplink bytes per simulated second, for every client (0 = uploads
            take no simulated time).
        max_upload_bytes: uploads larger than this are rejected before they are decoded
            (default 256 MiB; 0 = no limit).
    """

    rounds: int = 10
    clients_per_round: int = 0
    eval_every: int = 1
    target_accuracy: float | None = None
    dropout: float = 0.0
    checkpoint_every: int = 1
    client_eval_every: int = 0
    client_states_in_memory: int = 0
    deadline: float = 0.0
    speed_spread: float = 0.5
    examples_per_second: float = 1000.0
    upload_bandwidth: float = 0.0
    max_upload_bytes: int = wire.DEFAULT_MAX_BYTES

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.eval_every < 1 or self.clients_per_round < 0 or self.checkpoint_every < 0:
            raise KdflError("run: rounds and eval_every must be >= 1, clients_per_round and checkpoint_every >= 0")
        if self.client_eval_every < 0 or self.client_states_in_memory < 0:
            raise KdflError("run.client_eval_every and run.client_states_in_memory must be >= 0")
        if not 0 <= self.dropout < 1:
            raise KdflError(f"run.dropout must be in [0, 1), got {self.dropout}")
        ranges = {
            "deadline": (self.deadline >= 0, "a finite number >= 0 (simulated seconds; 0 = no deadline)"),
            "speed_spread": (0 <= self.speed_spread <= 10, "in [0, 10] (0 = all clients equally fast)"),
            "examples_per_second": (self.examples_per_second > 0, "a finite number > 0"),
            "upload_bandwidth": (self.upload_bandwidth >= 0, "a finite number >= 0 (bytes per simulated "
                                                             "second; 0 = uploads take no time)"),
            "max_upload_bytes": (self.max_upload_bytes >= 0, "an integer >= 0 (0 = no limit)"),
        }
        for key, (ok, allowed) in ranges.items():
            value = getattr(self, key)
            if not ok or not math.isfinite(value):
                raise KdflError(f"run.{key} must be {allowed}, got {value!r}")

    def client_eval_due(self, round_num: int) -> bool:
        """Per-client metrics in this round's record (the final ones go to the summary)."""
        return self.client_eval_every > 0 and round_num % self.client_eval_every == 0

    def client_seconds(self, algorithm: Algorithm, task: Task, reply: Reply) -> float:
        """The simulated time client ``reply.client_id`` took this round (see the module docstring)."""
        speed = client_speed(task.seed, reply.client_id, self.speed_spread)
        return simulated_seconds(local_work(algorithm, reply.num_examples), reply.up_bytes, speed,
                                 self.examples_per_second, self.upload_bandwidth)


def local_work(algorithm: Algorithm, num_examples: int) -> int:
    """Training examples a client with ``num_examples`` processes in a round, from the
    algorithm's ``local`` settings (:class:`~kdfl.train.LocalSGD`): ``epochs x
    num_examples``, or ``steps x min(batch_size, num_examples)`` when ``steps`` is set;
    one pass for an algorithm without ``local``."""
    local = getattr(algorithm, "local", None)
    if local is None:
        return num_examples
    if local.steps:
        return int(local.steps * min(local.batch_size, num_examples))
    return int(local.epochs * num_examples)


@dataclass(frozen=True)
class Reply:
    """What the transport got back from one client.

    ``payload`` is the upload as the server decoded it. ``error`` marks a failed client
    (it raised, could not encode its upload, never answered); ``reject`` an upload that
    arrived but could not be decoded (the reason).
    """

    client_id: int
    num_examples: int = 0
    payload: Payload | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    up_bytes: int = 0
    error: str | None = None
    reject: str | None = None


@dataclass
class Exchange:
    """One round's traffic: downlink bytes per client (in job order), the replies (in
    job order) and transport-specific record fields."""

    down_bytes: list[int]
    replies: list[Reply]
    record: dict[str, Any] = field(default_factory=dict)


class Transport(Protocol):
    """Delivers the downlinks of a round and brings back the clients' replies; and, for
    per-client metrics, has every client evaluate the model it would use (the downlink
    of the job is what ``configure`` gives it for the next round)."""

    def exchange(self, round_num: int, jobs: Sequence[tuple[ClientInfo, Payload]]) -> Exchange: ...

    def evaluate(self, round_num: int, jobs: Sequence[tuple[ClientInfo, Payload]]) -> list[dict[str, float]]: ...


@dataclass
class RoundOutcome:
    """Who took part in a round and what happened to them."""

    sampled: list[int]
    dropped: set[int]
    active: list[int]
    down_bytes: list[int]
    up_bytes: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    rejected: list[int] = field(default_factory=list)
    accepted: list[ClientUpdate] = field(default_factory=list)
    late: list[int] = field(default_factory=list)
    sim_seconds: float = 0.0


def _finite(payload: Payload) -> None:
    for k, v in payload.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise PayloadError(f"payload entry {k!r} holds NaN or infinite values")


def accept_upload(algorithm: Algorithm, task: Task, state: ServerState, update: ClientUpdate) -> ClientUpdate:
    """``update`` (its payload as the server decoded it), checked: finite values and the
    algorithm's ``validate``. Raises PayloadError."""
    _finite(update.payload)
    algorithm.validate(task, state, update)
    return update


def evaluate_state(task: Task, state: ServerState) -> dict[str, float]:
    """Accuracy, NLL and ECE of the server model ``state.params`` on the test set, and as
    ``val_accuracy``, ``val_nll``, ``val_ece`` on the server's labelled validation slice
    (``data.val_size`` > 0: what hyperparameters are selected on, never the test set);
    nothing for an algorithm without a global model (empty ``params``: FedMD, FD, local
    training)."""
    if not state.params:
        return {}
    model = task.new_model(task.server_arch)
    model.load_state_dict(state.params)
    out = evaluate(model, task.test)
    if task.val is not None and len(task.val):
        out.update({f"val_{k}": v for k, v in evaluate(model, task.val).items()})
    return out


def round_record(task: Task, state: ServerState, metrics: RoundMetrics, outcome: RoundOutcome,
                 round_num: int, settings: RunSettings) -> dict[str, Any]:
    """The per-round record (without ``wall_seconds``), evaluating ``state`` when due."""
    o = outcome
    record: dict[str, Any] = {
        "round": round_num,
        "clients": o.sampled,
        "dropped": sorted(o.dropped),
        "failed": list(o.failed),
        "rejected": list(o.rejected),
        "late": list(o.late),
        "malicious": [c for c in o.active if c in task.malicious],
        "uplink_bytes": int(sum(o.up_bytes)),
        "downlink_bytes": int(sum(o.down_bytes)),
        "uplink_bytes_per_client": float(np.mean(o.up_bytes)) if o.up_bytes else 0.0,
        "downlink_bytes_per_client": float(np.mean(o.down_bytes)) if o.down_bytes else 0.0,
    }
    if not o.accepted or any("train_loss" in u.metrics for u in o.accepted):  # programs with a "train" phase
        losses = [u.metrics.get("train_loss", math.nan) for u in o.accepted]
        record["train_loss"] = float(np.mean(losses)) if losses else math.nan
    for key in sorted({k for u in o.accepted for k in u.metrics} - {"train_loss", "steps"}):
        record[key] = float(np.mean([u.metrics[key] for u in o.accepted if key in u.metrics]))
    record.update(metrics)
    if round_num % settings.eval_every == 0 or round_num == settings.rounds:
        record.update(evaluate_state(task, state))
    return record


def client_eval_record(algorithm: Algorithm, task: Task, state: ServerState, round_num: int, num_clients: int,
                       transport: Transport) -> dict[str, Any]:
    """Per-client metrics after ``round_num``: every client evaluates its model (see
    :mod:`kdfl.simulation.clients`). Statistics are over the honest clients (the
    Byzantine ones are listed but not counted): ``client_<key>_{mean,std,worst10,best}``
    for ``accuracy``, ``test_accuracy`` and the keys of the algorithm's optional
    ``client_eval_metrics``, each for a key every evaluated client reports."""
    from kdfl.simulation.clients import client_stats

    infos = [ClientInfo(c, task.client_archs[c], round_num + 1) for c in range(num_clients)]
    results = transport.evaluate(round_num, [(i, algorithm.configure(task, state, i)) for i in infos])
    ids = [i.id for i, r in zip(infos, results, strict=True) if r]
    per: dict[str, list[Any]] = {"clients": ids, "malicious": [c for c in ids if c in task.malicious]}
    base = ("accuracy", "test_accuracy")
    keys = [*base, *sorted({k for r in results for k in r} - set(base))]
    for key in keys:
        vals = [r[key] for r in results if r and key in r]
        if len(vals) == len(ids) and ids:
            per[key] = vals
    out: dict[str, Any] = {"client_eval": per}
    honest = [k for k, c in enumerate(ids) if c not in task.malicious]
    for key in keys:
        if key in per:
            out.update(client_stats([per[key][k] for k in honest], f"client_{key}"))
    return out


def run_round(algorithm: Algorithm, task: Task, state: ServerState, round_num: int, settings: RunSettings,
              num_clients: int, transport: Transport) -> tuple[ServerState, dict[str, Any]]:
    """One round through ``transport``; returns the new state and the round's record."""
    t0 = time.perf_counter()
    sampled = sample_clients(num_clients, settings.clients_per_round or num_clients, task.seed, round_num)
    dropped = dropouts(sampled, settings.dropout, task.seed, round_num)
    active = [c for c in sampled if c not in dropped]
    jobs = [(info, algorithm.configure(task, state, info))
            for info in (ClientInfo(c, task.client_archs[c], round_num) for c in active)]
    with wire.limit_uploads(settings.max_upload_bytes):  # what the transport decodes
        ex = transport.exchange(round_num, jobs)
    o = RoundOutcome(sampled, dropped, active, ex.down_bytes)
    for r in ex.replies:  # in job order, so aggregation sums in the same order in every runtime
        if r.error is not None:
            log.warning("round %d: client %d failed and is excluded: %s", round_num, r.client_id, r.error)
            o.failed.append(r.client_id)
            continue
        o.up_bytes.append(r.up_bytes)  # sent, whether it arrives in time or not
        seconds = settings.client_seconds(algorithm, task, r)
        if settings.deadline and seconds > settings.deadline:
            log.info("round %d: client %d is a straggler (%.3g simulated s > deadline %.3g s); its upload is "
                     "dropped", round_num, r.client_id, seconds, settings.deadline)
            o.late.append(r.client_id)
            continue
        o.sim_seconds = max(o.sim_seconds, seconds)
        try:
            wire.check_size(r.up_bytes, settings.max_upload_bytes)  # every runtime, whatever it decoded
            if r.reject is not None or r.payload is None:
                raise PayloadError(r.reject or "no payload")
            o.accepted.append(accept_upload(algorithm, task, state,
                                            ClientUpdate(r.client_id, r.num_examples, r.payload, r.metrics)))
        except PayloadError as e:
            log.warning("round %d: payload of client %d rejected: %s", round_num, r.client_id, e)
            o.rejected.append(r.client_id)
    if o.accepted:
        state, metrics = algorithm.server_update(task, state, o.accepted)
    else:
        log.warning("round %d: no client update accepted; the server state is unchanged", round_num)
        state, metrics = dataclasses.replace(state, round=state.round + 1), {}
    record = round_record(task, state, metrics, o, round_num, settings)
    record["sim_seconds"] = settings.deadline if o.late else o.sim_seconds  # the server waited until the deadline
    record.update(ex.record)
    if settings.client_eval_due(round_num):
        record.update(client_eval_record(algorithm, task, state, round_num, num_clients, transport))
    record["wall_seconds"] = time.perf_counter() - t0
    return state, record


def final_client_eval(algorithm: Algorithm, task: Task, state: ServerState, records: Sequence[dict[str, Any]],
                      num_clients: int, transport: Transport) -> dict[str, Any]:
    """Per-client metrics after the last round: the last record's when it has them, else
    evaluated now. Kept out of the records so that a run resumed to more rounds has the
    same records as a straight one."""
    last = records[-1] if records else {}
    if "client_eval" in last:
        return {k: v for k, v in last.items() if k == "client_eval" or k.startswith("client_")} | {
            "round": last["round"]}
    out = client_eval_record(algorithm, task, state, state.round, num_clients, transport)
    return {**out, "round": state.round}


def summarize(records: Sequence[dict[str, Any]], target: float | None,
              clients: dict[str, Any] | None = None) -> dict[str, Any]:
    """The run summary written to ``summary.json``; ``clients`` are the final per-client
    metrics (:func:`final_client_eval`)."""
    from kdfl import metrics

    evals = [r for r in records if "accuracy" in r]
    accs = [r["accuracy"] for r in evals]
    last = evals[-1] if evals else {}
    per_client: dict[str, Any] = clients or next((r for r in reversed(records) if "client_eval" in r), {})
    stats = ("_mean", "_std", "_worst10", "_best")
    client_keys = [f"{p}{s}" for p in ("client_accuracy", "client_test_accuracy") for s in stats]
    client_keys += [k for k in per_client if k.startswith("client_") and k.endswith(stats)  # client_eval_metrics
                    and k not in client_keys]
    return {
        "rounds": len(records),
        "final_accuracy": last.get("accuracy"),
        "best_accuracy": max(accs) if accs else None,
        "final_nll": last.get("nll"),
        "final_ece": last.get("ece"),
        "final_val_accuracy": last.get("val_accuracy"),  # the server's validation slice (data.val_size)
        "target_accuracy": target,
        "rounds_to_target": metrics.rounds_to_target([r["round"] for r in evals], accs, target),
        "uplink_bytes_per_client_round": float(np.mean([r["uplink_bytes_per_client"] for r in records])),
        "downlink_bytes_per_client_round": float(np.mean([r["downlink_bytes_per_client"] for r in records])),
        "uplink_bytes_total": int(sum(r["uplink_bytes"] for r in records)),
        "downlink_bytes_total": int(sum(r["downlink_bytes"] for r in records)),
        "wall_seconds": float(sum(r["wall_seconds"] for r in records)),
        "failed_clients": sum(len(r["failed"]) for r in records),
        "rejected_payloads": sum(len(r["rejected"]) for r in records),
        "late_clients": sum(len(r.get("late", ())) for r in records),
        **{k: per_client.get(k) for k in client_keys},
        "client_eval_round": per_client.get("round"),
    }
