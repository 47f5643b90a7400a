"""The client half of any kdfl algorithm as a Flower ``ClientApp``.

Messages from :mod:`kdfl.flower.server_app`:

- ``query.kdfl_partition`` (the run's setup, once per node and run): content ``config``
  (ConfigRecord: ``kdfl-config`` = the resolved TOML, ``kdfl-config-sha256``); the node
  keeps the text in its context state and replies with its ``partition-id`` /
  ``num-partitions`` (from the SuperNode's ``--node-config``); kdfl client id = partition id.
- ``train``: content ``payload`` (ArrayRecord: the packed downlink) and ``config``
  (ConfigRecord: ``round``, ``client-id``, ``kdfl-config-sha256`` naming the config the
  node received in the setup; the text itself is not resent every round). The app
  builds the same federation as the simulator (cached per process), the same
  :class:`~kdfl.types.Client` (same seed derivation), runs the algorithm's client program
  and replies with ``payload`` (ArrayRecord: the packed upload, native dtypes),
  ``metrics`` (MetricRecord: ``num-examples`` and train metrics) and ``config``.
- ``evaluate``: the same content (the downlink the client would get next round); the app
  evaluates the client's model on its held-out split and the test set (per-client
  metrics) and replies with ``metrics``.

Stateful clients keep ``ClientUpdate.client_state`` in ``context.state``. A malicious
node (its id in the run's malicious set) poisons its labels (``label_flip``) or tampers
with its own upload (``sign_flip``, ``scaled``, ``gaussian``); omniscient attacks are refused.
With ``[privacy]`` mode "local" the node clips and noises its upload exactly as the
simulator does (:func:`privatize_local`), before tampering and the codec, and reports the
upload's norm before clipping (``dp-upload-norm`` in ``metrics``) for the round's diagnostics.
TRAIN messages of Flower's SecAgg+ protocol (a ``secaggplus_configs`` record; server side
``kdfl-secagg = true``) go to :func:`kdfl.flower.secagg.secagg_train`, which runs the same
client program (:func:`client_update`) inside Flower's ``secaggplus_mod``.
"""

from __future__ import annotations

import logging

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from kdfl import privacy as dp
from kdfl import tree
from kdfl.algorithms.program import run_client
from kdfl.flower.federation import Prepared, config_digest, prepare_text
from kdfl.flower.records import (
    STATE_KEY,
    load_client_state,
    payload_to_record,
    record_to_payload,
    save_client_state,
)
from kdfl.simulation.clients import evaluate_client
from kdfl.simulation.engine import make_client
from kdfl.transport import pack, unpack
from kdfl.types import ClientInfo, ClientUpdate, KdflError, Payload

log = logging.getLogger(__name__)

PARTITION_QUERY = "query.kdfl_partition"
CONFIG_STATE_KEY = "kdfl.config"  # context.state: the run's config text, from the setup query
CONFIG_TEXT, CONFIG_SHA = "kdfl-config", "kdfl-config-sha256"  # ConfigRecord keys of the messages
SECAGG_CONFIGS = "secaggplus_configs"  # the config record of Flower's SecAgg+ messages (secaggplus_constants)
DP_NORM_KEY = "dp-upload-norm"  # MetricRecord key: the upload's norm before clipping (privacy mode "local")


def node_partition(context: Context) -> tuple[int, int]:
    """(partition-id, num-partitions) from the node config, checked."""
    cfg = context.node_config
    missing = [k for k in ("partition-id", "num-partitions") if k not in cfg]
    if missing:
        raise KdflError(
            f"this SuperNode has no {' / '.join(missing)} in its node config: start it with "
            '--node-config "partition-id=<i> num-partitions=<n>" (kdfl client id = partition-id)'
        )
    try:
        pid, n = int(cfg["partition-id"]), int(cfg["num-partitions"])
    except (TypeError, ValueError):
        raise KdflError(f"node config partition-id / num-partitions must be integers, got {dict(cfg)}") from None
    if not 0 <= pid < n:
        raise KdflError(f"node config partition-id={pid} is out of range for num-partitions={n}")
    return pid, n


def check_partition(pid: int, n: int, p: Prepared) -> None:
    if n != p.num_clients:
        raise KdflError(
            f"node config num-partitions={n} but the kdfl config has data.num_clients={p.num_clients}: "
            "start one SuperNode per client with num-partitions equal to data.num_clients"
        )
    if not 0 <= pid < p.num_clients:
        raise KdflError(f"partition-id={pid} is out of range: the kdfl config has {p.num_clients} clients")


def query_partition(msg: Message, context: Context) -> Message:
    """The run's setup: keep the config text the server sent (once per node and run) and
    report this node's partition."""
    pid, n = node_partition(context)
    conf = msg.content.config_records.get("config")
    if conf is not None and CONFIG_TEXT in conf:
        text = str(conf[CONFIG_TEXT])
        context.state[CONFIG_STATE_KEY] = ConfigRecord({CONFIG_TEXT: text, CONFIG_SHA: config_digest(text)})
    return Message(RecordDict({"metrics": MetricRecord({"partition-id": pid, "num-partitions": n})}), reply_to=msg)


def run_config(conf: ConfigRecord, context: Context) -> Prepared:
    """The kdfl config a TRAIN / EVALUATE message refers to: its text when the message
    carries it, else the text this node kept from the run's setup query (checked against
    the digest the message names)."""
    if CONFIG_TEXT in conf:  # a server that sends the text with every message
        return prepare_text(str(conf[CONFIG_TEXT]))
    want = str(conf.get(CONFIG_SHA, ""))
    kept = context.state.get(CONFIG_STATE_KEY)
    if not isinstance(kept, ConfigRecord) or str(kept[CONFIG_SHA]) != want:
        raise KdflError(
            f"this node holds no kdfl config with digest {want[:12]}... for this run "
            f"({'none kept' if not isinstance(kept, ConfigRecord) else 'it kept ' + str(kept[CONFIG_SHA])[:12] + '...'}): the config is "
            f"sent once per run in the setup query ({PARTITION_QUERY}), which this node did not get (it joined "
            "after the ServerApp started?); restart the run with every SuperNode connected"
        )
    return prepare_text(str(kept[CONFIG_TEXT]))


def privatize_local(p: Prepared, update: ClientUpdate, round_num: int) -> tuple[ClientUpdate, float | None]:
    """``[privacy]`` mode "local" on this node, exactly as the simulator's transport does it
    (:func:`kdfl.privacy.local_noise`: clipped to C, noised from (run seed, round, client),
    weighted 1), after training and before any tampering and the codec. Returns the
    update and its norm before clipping (None without local privacy); the server turns
    the norms of a round into ``dp_upload_norm`` / ``dp_clipped_fraction``."""
    s = p.engine.privacy
    if s is None or s.mode != "local":
        return update, None
    (noisy,), diag = dp.local_noise([update], s, p.fed.task.seed, round_num)
    return noisy, diag["dp_upload_norm"]


def client_update(p: Prepared, context: Context, cid: int, round_num: int,
                  downlink: Payload) -> tuple[ClientUpdate, float | None]:
    """What node ``cid`` uploads in ``round_num`` for its (decoded) ``downlink``: the
    algorithm's client program on the same Client as the simulator builds, local privacy,
    the node's own tampering when it is malicious; the client state is kept in
    ``context.state``. Returns the update and its norm before DP clipping (or None)."""
    pid, n = node_partition(context)
    check_partition(pid, n, p)
    if cid != pid:
        raise KdflError(f"the server addressed client {cid} but this node holds partition-id={pid}")
    task = p.fed.task
    stored = load_client_state(context.state.get(STATE_KEY))
    client = p.engine.client(cid, round_num, stored)  # as the simulator builds it (poisoned labels too)
    update = run_client(p.fed.algorithm, task, downlink, client)
    update, norm = privatize_local(p, update, round_num)
    if client.malicious and p.threat is not None:
        update = p.threat.tamper([update], [True], round_num, task)[0]  # own upload only
    if update.client_state is not None:
        context.state[STATE_KEY] = save_client_state(update.client_state)
    return update, norm


def train(msg: Message, context: Context) -> Message:
    if SECAGG_CONFIGS in msg.content.config_records:  # a stage of Flower's SecAgg+ protocol
        from kdfl.flower.secagg import secagg_train

        return secagg_train(msg, context)
    torch.set_num_threads(1)  # several ClientApps share the machine's cores
    conf = msg.content.config_records["config"]
    p = run_config(conf, context)
    cid, round_num = int(conf["client-id"]), int(conf["round"])  # type: ignore[arg-type]
    downlink = tree.to_device(unpack(record_to_payload(msg.content.array_records["payload"]), p.downlink_codec),
                              p.fed.task.device)
    update, norm = client_update(p, context, cid, round_num, downlink)
    metrics: dict[str, int | float] = {"num-examples": int(update.num_examples)}
    if norm is not None:
        metrics[DP_NORM_KEY] = norm
    metrics.update({f"m.{k}": float(v) for k, v in update.metrics.items()})
    content = RecordDict({
        "payload": payload_to_record(pack(update.payload, p.uplink_codec)),
        "metrics": MetricRecord(metrics),  # type: ignore[arg-type]
        "config": ConfigRecord({"client-id": cid, "round": round_num}),
    })
    return Message(content, reply_to=msg)


def evaluate(msg: Message, context: Context) -> Message:
    """Per-client metrics: this node's model (what the algorithm's ``client_model`` makes
    of the downlink and the kept state) on its held-out split and on the test set."""
    torch.set_num_threads(1)
    conf = msg.content.config_records["config"]
    p = run_config(conf, context)
    pid, n = node_partition(context)
    check_partition(pid, n, p)
    cid, round_num = int(conf["client-id"]), int(conf["round"])  # type: ignore[arg-type]
    if cid != pid:
        raise KdflError(f"the server addressed client {cid} but this node holds partition-id={pid}")
    stored = load_client_state(context.state.get(STATE_KEY))
    info = ClientInfo(cid, p.fed.task.client_archs[cid], round_num)
    client = make_client(p.fed.task, p.engine.partitions[cid], info, stored, None)
    downlink = tree.to_device(unpack(record_to_payload(msg.content.array_records["payload"]), p.downlink_codec),
                              p.fed.task.device)
    result = evaluate_client(p.fed.algorithm, p.fed.task, downlink, client, p.engine.holdout(cid))
    return Message(RecordDict({"metrics": MetricRecord({f"m.{k}": float(v) for k, v in result.items()})}),
                   reply_to=msg)


def make_client_app() -> ClientApp:
    """A ClientApp running the client half of the algorithm named in the server's config."""
    app = ClientApp()
    app.train()(train)
    app.evaluate()(evaluate)
    app.query("kdfl_partition")(query_partition)
    return app


app = make_client_app()
