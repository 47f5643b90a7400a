"""Secure aggregation of kdfl uploads with Flower's SecAgg+ (``kdfl-secagg = true``).

With SecAgg+ (Bell et al., CCS 2020; Flower's ``SecAggPlusWorkflow`` and
``secaggplus_mod``) the server learns only the (weighted) mean of the round's uploads,
never one client's upload. That is enough exactly for the (algorithm, rule) combinations
whose server update depends on the uploads through their mean alone, the list central DP
uses (:data:`kdfl.privacy.MEAN_AGGREGATED`): ``fedavg``, ``fedprox``, ``fedavgm``,
``fedntd``, ``fedssd``, ``fml`` with ``aggregator = "mean"`` (the deltas, weighted by
examples); ``fedema_distill`` with ``aggregator = "mean"``, ``class_weighting = false``,
``space = "logits"`` or ``"centered"``, ``clip = 0`` (the proxy logits, weighted by
examples); ``dsfl`` with ``aggregator = "mean"``, ``upload = "probs"`` (the soft labels,
uniform). Everything else (median, trimmed mean, Krum, class weighting, non-linear
spaces, algorithms that use each upload) is refused by :func:`check_secagg`.

How a round runs. Flower 1.41's SecAgg+ exists only in the legacy Strategy world: the
workflow calls ``Strategy.configure_fit``, runs its four stages (setup, share keys,
collect masked vectors, unmask) with TRAIN messages, and hands the unmasked aggregate to
``Strategy.aggregate_fit`` in place of every client's ``FitRes.parameters``. So one kdfl
round here is one call of ``SecAggPlusWorkflow`` with a :class:`RoundStrategy`:

1. ``configure_fit`` samples and drops clients as the simulator does, builds each active
   client's downlink with ``algorithm.configure``, packs it (downlink codec) and sends it as
   ``FitIns.parameters`` (the arrays in payload order; their names, the round, the client
   id and the config's digest in ``FitIns.config``).
2. On the node, ``secaggplus_mod`` runs the protocol and, in the masking stage, calls
   :func:`secagg_train` (the kdfl ClientApp dispatches SecAgg+ messages to it): the same
   client program as :func:`kdfl.flower.client_app.train` (local DP, tampering of a
   malicious node included), the upload passed through the uplink codec's round trip,
   its float entries flattened in payload order into ONE float64 vector, returned as
   ``FitRes.parameters`` with ``num_examples`` = the client's example count (algorithms
   that weigh by examples) or 1 (DS-FL; and every client under local DP, whose uploads
   weigh 1). The mod clips each coordinate (times the weight ratio) to
   ±``clipping_range``, quantizes it stochastically to ``quantization_range`` levels, masks
   it and sends only the masked integers.
3. The workflow unmasks the sum and divides by the total weight: the weighted mean upload.
   ``aggregate_fit`` rebuilds it as ONE :class:`~kdfl.types.ClientUpdate` (the entries'
   names, shapes and dtypes from the layout every client reports in the clear; half
   precision entries come back as float32), checks it with the algorithm's ``validate``
   and calls ``server_update`` with it: the same update as the simulator's for these
   rules, up to the quantization.

Precision: each coordinate of a client's weighted upload is rounded to a grid of step
``2 · clipping_range / quantization_range`` (2**22 levels), so the mean is off by at most
that step divided by the mean weight ratio (``num_examples / max_weight``, ``max_weight``
the largest partition; 1 for uniform weights): 3.8e-6 for deltas (range ±8), 3.1e-5
for logits (±64), 4.8e-7 for soft labels (±1). Values beyond the range are clipped (the
node logs a warning; nobody else learns it): the default range per payload kind
(:data:`DEFAULT_CLIPPING_RANGE`, widened to C·(1 + 6σ) under local DP) or
``kdfl-secagg-clip``.

What the server still sees in the clear (as with Flower's own SecAgg+): each client's
``num_examples`` (its weight), its training metrics (``train_loss``...), the layout of its
upload (names, shapes, dtypes) and BatchNorm step counters (``*num_batches_tracked``,
aggregated with a maximum as FedAvg does); under local DP each upload's norm before
clipping (``dp_upload_norm``). Other integer entries cannot be summed securely and stop the
client with an error.

Records: the simulator's fields per round. ``uplink_bytes`` / ``downlink_bytes`` count every
message of the round's four SecAgg+ stages to and from each client (Flower's
``count_bytes`` of the records: masked vector, public keys, encrypted key shares, the
FitIns arrays), not the transport's framing; ``downlink_payload_bytes`` is the kdfl
downlink's array data alone (as ``downlink_bytes`` of a plain Flower run);
``secagg_clipping_range`` is the range used. Not measured: protobuf / HTTP framing and TLS.
A round whose protocol halts (fewer live clients than the reconstruction threshold) lists
its active clients as ``failed`` and leaves the server state unchanged. Not supported:
``run.deadline`` (stragglers are a simulator model) and ``[privacy]`` mode "central" (the
server would have to clip each upload, which it never sees; use mode "local").
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import (
    Code,
    FitIns,
    FitRes,
    Parameters,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.logger import log as flog
from flwr.compat.common import recorddict_compat as compat
from flwr.server import ServerConfig
from flwr.server.client_manager import ClientManager, SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from kdfl import privacy as dp
from kdfl.flower.client_app import CONFIG_SHA, DP_NORM_KEY, client_update, run_config
from kdfl.flower.federation import Prepared, reply_timeout
from kdfl.simulation.rounds import Reply, RoundOutcome, accept_upload, client_eval_record, round_record
from kdfl.simulation.sampling import dropouts, sample_clients
from kdfl.transport import pack, unpack
from kdfl.types import ClientInfo, ClientUpdate, KdflError, Payload, PayloadError, ServerState

log = logging.getLogger(__name__)

SECAGG_KEY = "kdfl-secagg"  # run-config key: true = secure aggregation with SecAgg+
CLIP_KEY = "kdfl-secagg-clip"  # run-config key: SecAgg+'s clipping range (default: per payload kind)
SHARES_KEY = "kdfl-secagg-shares"  # run-config key: SecAgg+'s num_shares
THRESHOLD_KEY = "kdfl-secagg-threshold"  # run-config key: SecAgg+'s reconstruction_threshold
KEYS_KEY, ROUND_KEY, CLIENT_KEY, WEIGHT_KEY = "kdfl-keys", "round", "client-id", "max-weight"  # FitIns.config
LAYOUT_KEY = "kdfl-layout"  # FitRes.metrics key: the upload's layout (JSON), in the clear
DEFAULT_CLIPPING_RANGE = {"deltas": 8.0, "logits": 64.0, "probs": 1.0}


@dataclass(frozen=True)
class SecAggSettings:
    """SecAgg+'s parameters (see Flower's ``SecAggPlusWorkflow``).

    Args:
        clipping_range: every coordinate of a (weighted) upload is clipped to ± this before
            quantization; None: :data:`DEFAULT_CLIPPING_RANGE` of the payload kind.
        num_shares: shares of each client's secret: an int > 2, or a float in (0, 1], the
            fraction of the round's clients (1.0: every client is every client's
            neighbour; fine for small federations, quadratic cost for large ones).
        reconstruction_threshold: shares needed to reconstruct a secret (an int, or a
            float fraction of ``num_shares``; at least 2): more means more privacy
            against colluding clients and less tolerance of dropouts.
        quantization_range: quantization levels (default 2**22).
    """

    clipping_range: float | None = None
    num_shares: int | float = 1.0
    reconstruction_threshold: int | float = 0.5
    quantization_range: int = 2**22

    def __post_init__(self) -> None:
        c = self.clipping_range
        if c is not None and (not isinstance(c, (int, float)) or not math.isfinite(c) or c <= 0):
            raise KdflError(f"{CLIP_KEY} must be a finite number > 0 (SecAgg+ clips every upload coordinate to "
                            f"± it), got {c!r}")
        try:
            self.workflow(1.0, 1.0, None)  # Flower's own checks
        except (TypeError, ValueError) as e:
            raise KdflError(f"invalid SecAgg+ settings ({SHARES_KEY}={self.num_shares!r}, {THRESHOLD_KEY}="
                            f"{self.reconstruction_threshold!r}): {e}; e.g. {SHARES_KEY}=1.0 {THRESHOLD_KEY}=0.5"
                            ) from None

    def workflow(self, clipping_range: float, max_weight: float, timeout: float | None) -> SecAggPlusWorkflow:
        return SecAggPlusWorkflow(self.num_shares, self.reconstruction_threshold, max_weight=max_weight,
                                  clipping_range=clipping_range, quantization_range=self.quantization_range,
                                  timeout=timeout)

    @classmethod
    def from_run_config(cls, rc: Mapping[str, Any]) -> SecAggSettings:
        """The settings from the Flower run config (``kdfl-secagg-clip`` / ``-shares`` / ``-threshold``)."""
        def number(key: str, default: Any) -> Any:
            value = rc.get(key, default)
            if value is None or value == "":
                return default
            try:
                return int(value) if isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()) \
                    else float(value)
            except (TypeError, ValueError):
                raise KdflError(f"{key} must be a number, got {value!r}") from None

        return cls(number(CLIP_KEY, None), number(SHARES_KEY, 1.0), number(THRESHOLD_KEY, 0.5))


# -- which combinations ----------------------------------------------------------------------
def payload_kind(algorithm: Any) -> str:
    """"deltas", "logits" or "probs": what a mean-aggregated algorithm uploads."""
    from kdfl.algorithms.dsfl import DSFL
    from kdfl.algorithms.fedema_distill import FedEMADistill

    if isinstance(algorithm, DSFL):
        return "probs"
    if isinstance(algorithm, FedEMADistill):
        return "logits"
    return "deltas"


def weighs_by_examples(algorithm: Any) -> bool:
    """Whether the algorithm's mean weighs each upload by its ``num_examples`` (FedAvg's
    family, FML, FedEMA-Distill) rather than uniformly (DS-FL)."""
    from kdfl.algorithms.dsfl import DSFL

    return not isinstance(algorithm, DSFL)


def check_secagg(p: Prepared) -> None:
    """Refuse, naming the reason and what works, a run secure aggregation cannot do."""
    alg = p.fed.algorithm
    name = type(alg).__name__
    why = dp.mean_aggregation_refusal(alg)
    if why is not None:
        raise KdflError(
            f"secure aggregation ({SECAGG_KEY}) cannot run {name}: {why}. With SecAgg+ the server sees only the "
            f"(weighted) mean of the uploads, which is enough for {dp.MEAN_AGGREGATED}. Choose one of these, or "
            f"set {SECAGG_KEY} = false"
        )
    s = p.engine.privacy
    if s is not None and s.mode == "central":
        raise KdflError(f"privacy.mode = \"central\" with secure aggregation ({SECAGG_KEY}): the server would "
                        "clip each upload, which it never sees; use privacy.mode = \"local\" (the clients clip and "
                        f"noise before masking) or set {SECAGG_KEY} = false")
    settings = p.engine.settings
    if settings.deadline:
        raise KdflError(f"run.deadline = {settings.deadline} (simulated stragglers) is not supported with secure "
                        f"aggregation ({SECAGG_KEY}); set run.deadline = 0")
    m = min(settings.clients_per_round or p.num_clients, p.num_clients)
    if m < 2:
        raise KdflError(f"secure aggregation ({SECAGG_KEY}) needs at least 2 clients per round (SecAgg+ refuses "
                        f"fewer), got {m}: raise run.clients_per_round / data.num_clients")


def clipping_range(p: Prepared, settings: SecAggSettings) -> float:
    """The clipping range used: the setting, else the payload kind's default, widened to
    C·(1 + 6σ) under local DP (the noise of a clipped upload stays inside)."""
    if settings.clipping_range is not None:
        return float(settings.clipping_range)
    c = DEFAULT_CLIPPING_RANGE[payload_kind(p.fed.algorithm)]
    s = p.engine.privacy
    if s is not None and s.mode == "local":
        c = max(c, s.clip * (1 + 6 * s.noise_multiplier))
    return c


def max_weight(p: Prepared) -> float:
    """SecAgg+'s ``max_weight``: the largest partition when the algorithm weighs by examples
    (no client's weight exceeds it), else 1 (uniform weights, and every upload under local DP)."""
    s = p.engine.privacy
    if not weighs_by_examples(p.fed.algorithm) or (s is not None and s.mode == "local"):
        return 1.0
    return float(max(max(len(x) for x in p.fed.partitions), 1))


# -- the client ------------------------------------------------------------------------------
def flatten(payload: Payload) -> tuple[np.ndarray, list[list[Any]]]:
    """The float entries of ``payload`` as one float64 vector (payload order) and the
    layout ``[name, shape, dtype, clear values or None]`` of every entry. BatchNorm step
    counters travel in the clear; any other non-float entry raises KdflError."""
    parts, layout = [], []
    for k, v in payload.items():
        if v.is_floating_point():
            parts.append(v.detach().double().reshape(-1).numpy())
            layout.append([k, list(v.shape), str(v.dtype).removeprefix("torch."), None])
        elif k.endswith(dp.EXEMPT_SUFFIX):
            layout.append([k, list(v.shape), str(v.dtype).removeprefix("torch."), v.reshape(-1).tolist()])
        else:
            raise KdflError(
                f"secure aggregation: the upload entry {k!r} is {v.dtype}; SecAgg+ sums float entries only (label "
                "counts and indices cannot be averaged securely): set algorithm.class_weighting = false where the "
                f"algorithm has it, or set {SECAGG_KEY} = false"
            )
    vec = np.concatenate(parts) if parts else np.zeros(0)
    return vec, layout


def unflatten(vec: np.ndarray, layout: Sequence[Sequence[Any]], clear: Iterable[Sequence[Sequence[Any]]]) -> Payload:
    """Inverse of :func:`flatten` for the mean vector; half precision entries come back as
    float32 (the mean keeps its precision); clear entries take the maximum over the
    clients' ``clear`` layouts (as FedAvg aggregates BatchNorm step counters)."""
    out: Payload = {}
    pos = 0
    layouts = list(clear)
    for i, (k, shape, dtype, values) in enumerate(layout):
        numel = int(np.prod(shape, dtype=np.int64))
        dt = getattr(torch, dtype)
        if values is None:
            t = torch.from_numpy(np.array(vec[pos:pos + numel], copy=True)).reshape(shape)
            out[k] = t.to(torch.float32 if dt in (torch.float16, torch.bfloat16) else dt)
            pos += numel
        else:
            stacked = torch.tensor([list(lay[i][3]) for lay in layouts], dtype=dt)
            out[k] = stacked.max(0).values.reshape(shape)
    if pos != vec.size:
        raise PayloadError(f"the aggregate has {vec.size} values, the uploads' layout {pos}")
    return out


def _fit(msg: Message, context: Context) -> Message:
    """The kdfl client program in SecAgg+'s masking stage: FitIns in, the flat upload out."""
    torch.set_num_threads(1)
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    conf = fitins.config
    p = run_config(ConfigRecord({CONFIG_SHA: str(conf[CONFIG_SHA])}), context)
    cid, round_num = int(conf[CLIENT_KEY]), int(conf[ROUND_KEY])
    keys = json.loads(str(conf[KEYS_KEY]))
    arrays = parameters_to_ndarrays(fitins.parameters)
    downlink = unpack({k: torch.from_numpy(np.array(a, copy=True)) for k, a in zip(keys, arrays, strict=True)},
                      p.downlink_codec)
    update, norm = client_update(p, context, cid, round_num, downlink)
    payload = unpack(pack(update.payload, p.uplink_codec), p.uplink_codec)  # what the codec would deliver
    vec, layout = flatten(payload)
    clip = float(conf[CLIP_KEY])  # type: ignore[arg-type]
    weight = int(update.num_examples) if weighs_by_examples(p.fed.algorithm) else 1
    outside = int((np.abs(vec * weight / float(conf[WEIGHT_KEY])) > clip).sum())  # type: ignore[arg-type]
    if outside:
        flog(logging.WARNING, "kdfl secure aggregation, round %d: %d of %d upload values of client %d exceed the "
             "clipping range ±%g and are clipped (set %s)", round_num, outside, vec.size, cid, clip, CLIP_KEY)
    metrics: dict[str, Any] = {LAYOUT_KEY: json.dumps(layout)}
    metrics.update({f"m.{k}": float(v) for k, v in update.metrics.items()})
    if norm is not None:
        metrics[DP_NORM_KEY] = norm
    fitres = FitRes(Status(Code.OK, "OK"), ndarrays_to_parameters([vec]), weight, metrics)
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


def secagg_train(msg: Message, context: Context) -> Message:
    """A SecAgg+ stage on the node: Flower's ``secaggplus_mod`` around the kdfl client
    program (the kdfl ClientApp's ``train`` dispatches SecAgg+ messages here)."""
    from flwr.client.mod import secaggplus_mod

    return secaggplus_mod(msg, context, _fit)


# -- the server ------------------------------------------------------------------------------
def _record_bytes(rec: Any) -> int:
    try:
        return int(rec.count_bytes())
    except IndexError:  # Flower 1.41's ConfigRecord.count_bytes fails on an empty list value
        return int(ConfigRecord({k: v for k, v in rec.items() if not (isinstance(v, list) and not v)}).count_bytes())


def _content_bytes(content: RecordDict) -> int:
    return sum(_record_bytes(rec) for rec in content.values())


class CountingGrid:
    """A Grid that counts the bytes of every message's records, per node and direction."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self.down: dict[int, int] = defaultdict(int)
        self.up: dict[int, int] = defaultdict(int)
        self.errors: dict[int, str] = {}  # node -> the reason of its last error reply

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        for m in messages:
            self.down[m.metadata.dst_node_id] += _content_bytes(m.content)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        for r in replies:
            if r.has_content():
                self.up[r.metadata.src_node_id] += _content_bytes(r.content)
            elif r.has_error():
                self.errors[r.metadata.src_node_id] = str(r.error.reason)
        return replies


class RoundStrategy(Strategy):
    """The legacy Strategy SecAgg+ drives for ONE kdfl round (see the module docstring)."""

    def __init__(self, p: Prepared, nodes: Mapping[int, int], state: ServerState, round_num: int,
                 clip: float, weight_cap: float) -> None:
        self.p, self.nodes, self.state, self.round_num = p, nodes, state, round_num
        self.clip, self.weight_cap = clip, weight_cap
        self.cids = {nid: cid for cid, nid in nodes.items()}
        settings = p.engine.settings
        seed = p.fed.task.seed
        self.sampled = sample_clients(p.num_clients, settings.clients_per_round or p.num_clients, seed, round_num)
        self.dropped = dropouts(self.sampled, settings.dropout, seed, round_num)
        self.active = [c for c in self.sampled if c not in self.dropped]
        self.payload_bytes: dict[int, int] = {}
        self.results: dict[int, FitRes] = {}
        self.reject: str | None = None
        self.metrics: dict[str, float] = {}
        self.aggregated = False

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return None

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        p, task = self.p, self.p.fed.task
        proxies = {c.node_id: c for c in client_manager.all().values()}
        out, cache = [], {}
        for cid in self.active:
            payload = p.fed.algorithm.configure(task, self.state, ClientInfo(cid, task.client_archs[cid],
                                                                             self.round_num))
            if id(payload) not in cache:
                packed = pack(payload, p.downlink_codec)
                arrays = [t.detach().cpu().contiguous().numpy() for t in packed.values()]
                cache[id(payload)] = (list(packed), ndarrays_to_parameters(arrays),
                                      sum(a.nbytes for a in arrays), payload)
            keys, params, nbytes, _ = cache[id(payload)]
            self.payload_bytes[cid] = nbytes
            config = {ROUND_KEY: self.round_num, CLIENT_KEY: cid, CONFIG_SHA: p.digest, KEYS_KEY: json.dumps(keys),
                      CLIP_KEY: self.clip, WEIGHT_KEY: self.weight_cap}
            out.append((proxies[self.nodes[cid]], FitIns(params, config)))  # type: ignore[arg-type]
        return out

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[tuple[ClientProxy, FitRes] | BaseException]) -> tuple[Parameters | None,
                                                                                            dict[str, Any]]:
        p, task = self.p, self.p.fed.task
        self.aggregated = True
        got = {self.cids[proxy.node_id]: res for proxy, res in results}
        self.results = {c: got[c] for c in self.active if c in got}  # job order
        if not self.results:
            return None, {}
        try:
            layouts = [json.loads(str(r.metrics[LAYOUT_KEY])) for r in self.results.values()]
            shape = [[k, s, d] for k, s, d, _ in layouts[0]]
            if any([[k, s, d] for k, s, d, _ in lay] != shape for lay in layouts):
                raise PayloadError("the clients' uploads have different layouts; their sum means nothing")
            (vec,) = parameters_to_ndarrays(next(iter(self.results.values())).parameters)
            payload = unflatten(vec, layouts[0], layouts)
            total = int(sum(r.num_examples for r in self.results.values()))
            mean = accept_upload(p.fed.algorithm, task, self.state, ClientUpdate(-1, max(total, 1), payload))
        except (PayloadError, KeyError, ValueError) as e:
            self.reject = f"{type(e).__name__}: {e}" if not isinstance(e, PayloadError) else str(e)
            return None, {}
        self.state, self.metrics = p.fed.algorithm.server_update(task, self.state, [mean])
        return None, {}

    def configure_evaluate(self, server_round: int, parameters: Parameters,
                           client_manager: ClientManager) -> list[tuple[ClientProxy, Any]]:
        return []

    def aggregate_evaluate(self, server_round: int, results: Any, failures: Any) -> tuple[float | None,
                                                                                         dict[str, Any]]:
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Any]] | None:
        return None


def run_round(grid: Grid, p: Prepared, nodes: Mapping[int, int], state: ServerState, round_num: int,
              timeout: Any = None, settings: SecAggSettings | None = None) -> tuple[ServerState, dict[str, Any]]:
    """One kdfl round with SecAgg+ (see the module docstring); returns the new state and
    the round's record (the simulator's fields)."""
    from kdfl.flower.server_app import FlowerTransport

    t0 = time.perf_counter()
    settings = settings or SecAggSettings()
    clip, cap = clipping_range(p, settings), max_weight(p)
    strategy = RoundStrategy(p, nodes, state, round_num, clip, cap)
    manager = SimpleClientManager()
    for nid in nodes.values():
        manager.register(GridClientProxy(nid, grid, 0))
    base = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={})
    context = LegacyContext(base, ServerConfig(num_rounds=round_num), strategy, manager)
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
        {WorkflowKey.CURRENT_ROUND: round_num, WorkflowKey.START_TIME: time.time()})
    context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
    counting = CountingGrid(grid)
    if len(strategy.active) >= 2:
        settings.workflow(clip, cap, reply_timeout(timeout))(counting, context)  # type: ignore[arg-type]
    else:
        flog(logging.WARNING, "kdfl round %d: %d active client(s); SecAgg+ needs at least 2", round_num,
             len(strategy.active))

    task, run_settings, alg = p.fed.task, p.engine.settings, p.fed.algorithm
    o = RoundOutcome(strategy.sampled, strategy.dropped, strategy.active,
                     [counting.down.get(nodes[c], 0) for c in strategy.active])
    for cid in strategy.active:
        res = strategy.results.get(cid)
        if res is None:
            why = counting.errors.get(nodes[cid]) or ("the SecAgg+ protocol halted (too few live clients)"
                                                       if not strategy.aggregated else "no masked upload")
            log.warning("round %d: client %d failed under secure aggregation: %s", round_num, cid, why)
            o.failed.append(cid)
            continue
        up = counting.up.get(nodes[cid], 0)
        o.up_bytes.append(up)
        metrics = {k[2:]: float(v) for k, v in res.metrics.items() if k.startswith("m.")}  # type: ignore[arg-type]
        o.sim_seconds = max(o.sim_seconds, run_settings.client_seconds(alg, task, Reply(cid, res.num_examples,
                                                                                         up_bytes=up)))
        if strategy.reject is None:
            o.accepted.append(ClientUpdate(cid, res.num_examples, {}, metrics))  # metrics only: for the record
        else:
            o.rejected.append(cid)
    if strategy.reject is not None:
        log.warning("round %d: the securely aggregated upload is rejected: %s", round_num, strategy.reject)
    if strategy.state is state:  # nothing aggregated
        new_state, metrics = dataclasses.replace(state, round=state.round + 1), {}
    else:
        new_state, metrics = strategy.state, strategy.metrics
    record = round_record(task, new_state, metrics, o, round_num, run_settings)
    record["sim_seconds"] = o.sim_seconds
    norms = [float(strategy.results[c].metrics[DP_NORM_KEY]) for c in strategy.results  # type: ignore[arg-type]
             if DP_NORM_KEY in strategy.results[c].metrics]
    s = p.engine.privacy
    if s is not None and s.mode == "local":
        record.update(dp.diagnostics(norms, s.clip))
    record.update(secure_aggregation="secagg+", secagg_clipping_range=clip,
                  downlink_payload_bytes=int(sum(strategy.payload_bytes.values())))
    if run_settings.client_eval_due(round_num):
        record.update(client_eval_record(alg, task, new_state, round_num, p.num_clients,
                                         FlowerTransport(grid, p, nodes, timeout)))
    record["wall_seconds"] = time.perf_counter() - t0
    return new_state, record


__all__ = ["SECAGG_KEY", "SecAggSettings", "check_secagg", "run_round", "secagg_train"]
