"""Flower runs that survive faults, on the in-process Flower path (Flower's own Message
objects and the real ClientApp, no Ray, no network): a silent node is a failed client of
the round after a finite reply timeout, the config text crosses the wire once per node,
and a checkpointed run resumes to the same records as a straight one."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")

from flower_grid import LocalGrid  # noqa: E402

from kdfl.flower import load_config  # noqa: E402
from kdfl.flower.records import nbytes  # noqa: E402
from kdfl.types import KdflError  # noqa: E402

CONFIG = Path(__file__).resolve().parents[2] / "examples" / "flower_app" / "fedema_mnist1d.toml"
FEDAVG = ["algorithm.name=fedavg", "compression.uplink='fp32'", "local.epochs=1"]


@pytest.fixture(autouse=True)
def flower_identity(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):  # what Flower's processes set
        monkeypatch.setattr(TaskIdentity, attr, value)


class FaultyGrid(LocalGrid):
    """A LocalGrid whose ``dead`` nodes never answer (as a killed SuperNode), and which
    records every message sent and every timeout asked for."""

    def __init__(self, client_app, num_nodes):
        super().__init__(client_app, num_nodes)
        self.dead: set[int] = set()
        self.broken: set[int] = set()  # answer with an error (a ClientApp that raised)
        self.sent: list = []
        self.timeouts: list = []

    def send_and_receive(self, messages, *, timeout=None):
        from flwr.app import Error, Message

        messages = list(messages)
        self.sent.extend(messages)
        self.timeouts.append(timeout)
        live = [m for m in messages if m.metadata.dst_node_id not in self.dead | self.broken]
        errors = [Message(Error(code=0, reason="ClientApp raised: boom"), reply_to=m) for m in messages
                  if m.metadata.dst_node_id in self.broken and m.metadata.dst_node_id not in self.dead]
        return list(super().send_and_receive(live, timeout=timeout)) + errors


def _grid(cfg):
    from kdfl.flower.client_app import make_client_app

    return FaultyGrid(make_client_app(), cfg["data"]["num_clients"])


def test_reply_timeout_is_always_finite():
    from kdfl.flower.federation import DEFAULT_REPLY_TIMEOUT_S, reply_timeout

    assert reply_timeout(None) == reply_timeout("") == DEFAULT_REPLY_TIMEOUT_S
    assert math.isfinite(DEFAULT_REPLY_TIMEOUT_S) and DEFAULT_REPLY_TIMEOUT_S > 0
    assert reply_timeout("30") == reply_timeout(30) == 30.0
    for bad in (0, -1, math.inf, math.nan, "soon"):
        with pytest.raises(KdflError, match="kdfl-timeout-s"):
            reply_timeout(bad)


def test_silent_node_is_a_failed_client_and_the_run_completes(tmp_path):
    from kdfl.flower import server_app

    cfg = load_config(CONFIG, ["run.rounds=3", *FEDAVG])
    grid = _grid(cfg)
    node_of_client_1 = 2  # LocalGrid: node i + 1 holds partition i

    def kill_after_round_1(record):
        if record["round"] == 1:
            grid.dead.add(node_of_client_1)

    hist = server_app.run(grid, cfg, tmp_path, on_round=kill_after_round_1, timeout=7.5)
    assert [r["failed"] for r in hist.records] == [[], [1], [1]]
    assert [r["clients"] for r in hist.records] == [[0, 1, 2]] * 3
    assert hist.summary["failed_clients"] == 2 and hist.summary["rounds"] == 3
    assert hist.records[2]["accuracy"] > 0.1  # the two live clients carried the rounds
    assert hist.records[1]["uplink_bytes"] == 2 * hist.records[0]["uplink_bytes"] / 3  # nothing from the dead one
    # every send_and_receive had a finite timeout: the setup's wait, then the reply timeout
    assert all(t is not None and math.isfinite(t) for t in grid.timeouts)
    assert grid.timeouts[1:] == [7.5] * (len(grid.timeouts) - 1)
    assert all(m.metadata.ttl == 7.5 for m in grid.sent[3:])  # a late node does not work on stale messages
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["failed"] for r in lines] == [[], [1], [1]]
    assert hist.clients["client_eval"]["clients"] == [0, 2]  # the dead node reports no evaluation either


def test_error_reply_is_a_failed_client_with_its_reason(caplog):
    from kdfl.flower import server_app

    cfg = load_config(CONFIG, ["run.rounds=1", *FEDAVG])
    grid = _grid(cfg)

    grid.broken.add(3)  # client 2's ClientApp raises from the first TRAIN message on
    real = grid.send_and_receive

    def send_and_receive(messages, *, timeout=None):  # the setup query still gets an answer
        messages = list(messages)
        if messages and messages[0].metadata.message_type == "query.kdfl_partition":
            return LocalGrid.send_and_receive(grid, messages, timeout=timeout)
        return real(messages, timeout=timeout)

    grid.send_and_receive = send_and_receive
    with caplog.at_level("WARNING"):
        hist = server_app.run(grid, cfg)
    assert hist.records[0]["failed"] == [2] and hist.records[0]["clients"] == [0, 1, 2]
    assert "error reply: ClientApp raised: boom" in caplog.text


def test_default_timeout_is_used_when_none_is_given():
    from kdfl.flower.federation import DEFAULT_REPLY_TIMEOUT_S, prepare
    from kdfl.flower.server_app import FlowerTransport

    cfg = load_config(CONFIG, ["run.rounds=1", *FEDAVG])
    transport = FlowerTransport(_grid(cfg), prepare(cfg), {0: 1, 1: 2, 2: 3}, None)
    assert transport.timeout == DEFAULT_REPLY_TIMEOUT_S


def test_config_is_sent_once_and_downlink_bytes_are_what_is_sent():
    from flwr.app import MessageType

    from kdfl.flower import server_app
    from kdfl.flower.client_app import PARTITION_QUERY
    from kdfl.flower.federation import prepare

    cfg = load_config(CONFIG, ["run.rounds=2", *FEDAVG])
    text = prepare(cfg).text
    grid = _grid(cfg)
    hist = server_app.run(grid, cfg)
    setup = [m for m in grid.sent if m.metadata.message_type == PARTITION_QUERY]
    assert len(setup) == 3 and all(m.content.config_records["config"]["kdfl-config"] == text for m in setup)
    assert hist.summary["setup_downlink_bytes"] == 3 * len(text.encode())
    for rec in hist.records:
        train = [m for m in grid.sent
                 if m.metadata.message_type == MessageType.TRAIN and m.metadata.group_id == str(rec["round"])]
        assert len(train) == 3
        assert rec["downlink_bytes"] == sum(nbytes(m.content.array_records["payload"]) for m in train)
        assert rec["downlink_record_bytes"] == sum(m.content.array_records["payload"].count_bytes() for m in train)
        for m in train:  # besides the arrays: round, client id and the config digest, nothing else
            conf = m.content.config_records["config"]
            assert set(conf) == {"round", "client-id", "kdfl-config-sha256"}
            assert set(m.content) == {"payload", "config"}


def test_node_that_missed_the_setup_fails_with_a_clear_error():
    from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

    from kdfl.flower.client_app import train
    from kdfl.flower.records import payload_to_record

    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 3}, state=RecordDict(),
                  run_config={})
    msg = Message(RecordDict({"payload": payload_to_record({"x": torch.zeros(1)}),
                              "config": ConfigRecord({"round": 1, "client-id": 0, "kdfl-config-sha256": "ab" * 32})}),
                  dst_node_id=1, message_type=MessageType.TRAIN)
    with pytest.raises(KdflError, match="setup query"):
        train(msg, ctx)


def test_flower_run_resumed_from_checkpoint_equals_a_straight_run(tmp_path):
    from kdfl.flower import server_app

    straight = server_app.run(_grid(cfg4 := load_config(CONFIG, ["run.rounds=4", *FEDAVG])), cfg4, tmp_path / "a")
    out = tmp_path / "b"
    first = server_app.run(_grid(cfg2 := load_config(CONFIG, ["run.rounds=2", *FEDAVG])), cfg2, out)
    assert (out / "checkpoint.pt").exists() and len(first.records) == 2
    resumed = server_app.run(_grid(cfg4), cfg4, out, resume=True)  # a new Flower run: fresh node contexts

    def strip(records):
        return [{k: v for k, v in r.items() if k != "wall_seconds"} for r in records]

    assert [r["round"] for r in resumed.records] == [1, 2, 3, 4]
    assert strip(resumed.records) == strip(straight.records)
    for key, value in straight.state.params.items():
        torch.testing.assert_close(resumed.state.params[key], value, rtol=0, atol=0)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in lines] == [1, 2, 3, 4]
    assert {k: v for k, v in resumed.summary.items() if k != "wall_seconds"} == {
        k: v for k, v in straight.summary.items() if k != "wall_seconds"}

    with pytest.raises(KdflError, match="differs"):  # only run.rounds may change on resume
        server_app.run(_grid(cfg4), load_config(CONFIG, ["run.rounds=4", "local.lr=0.5", *FEDAVG[:2]]), out,
                       resume=True)
    # no checkpoint yet: the run starts from round 0 there, as `kdfl run --resume` does
    fresh = server_app.run(_grid(cfg2), cfg2, tmp_path / "none", resume=True)
    assert strip(fresh.records) == strip(first.records)
