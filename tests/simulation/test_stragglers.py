"""Stragglers ([run] deadline) and the upload size limit ([run] max_upload_bytes), in the
round driver: the same in every runtime."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from helpers import blob_task

from kdfl import config, wire
from kdfl.algorithms import FedAvg, FedEMADistill
from kdfl.simulation.engine import Engine, RunSettings
from kdfl.simulation.rounds import Exchange, Reply, local_work, run_round
from kdfl.simulation.sampling import client_speed, simulated_seconds
from kdfl.train import LocalSGD
from kdfl.types import KdflError, PayloadError, ServerState

LOCAL = LocalSGD(epochs=1, batch_size=16, lr=0.1)
SIZES = [10, 20, 40, 80]  # client i holds SIZES[i] rows


def uneven_blobs():
    task, _ = blob_task(num_clients=4, n=240)
    starts = [0, 10, 30, 70]
    return task, [list(range(a, a + n)) for a, n in zip(starts, SIZES, strict=True)]


SEEN: list[list[int]] = []


@dataclasses.dataclass(frozen=True)
class Spy(FedAvg):
    """FedAvg that records which clients reach ``server_update``."""

    def server_update(self, task, state, updates):
        SEEN.append([u.client_id for u in updates])
        return super().server_update(task, state, updates)


def strip(r):
    return {k: v for k, v in r.items() if k != "wall_seconds"}


def test_hand_computed_stragglers_never_reach_server_update():
    # equal speeds (spread 0), 1000 examples/s: client i needs epochs * SIZES[i] / 1000 s
    task, parts = uneven_blobs()
    SEEN.clear()
    s = RunSettings(rounds=2, deadline=0.05, speed_spread=0.0, examples_per_second=1000.0)
    hist = Engine(Spy(local=LOCAL), task, parts, s).run()
    for rec in hist.records:
        assert rec["late"] == [3]  # 0.08 s > 0.05 s; the others need 0.01, 0.02, 0.04 s
        assert rec["failed"] == [] and rec["rejected"] == []
        assert rec["sim_seconds"] == 0.05  # the server waited until the deadline
    assert SEEN == [[0, 1, 2], [0, 1, 2]]
    assert hist.summary["late_clients"] == 2
    # the late client's bytes were sent: counted like everyone's
    assert hist.records[0]["uplink_bytes"] == 4 * hist.records[0]["uplink_bytes_per_client"]

    # two epochs double the work: 0.02, 0.04, 0.08, 0.16 s
    SEEN.clear()
    two = dataclasses.replace(LOCAL, epochs=2)
    rec = Engine(Spy(local=two), task, parts, dataclasses.replace(s, rounds=1)).run().records[0]
    assert rec["late"] == [2, 3] and SEEN == [[0, 1]]
    # fixed steps: steps x min(batch, n) = 3 x 16 = 48 examples for clients 1-3, 3 x 10 for client 0
    SEEN.clear()
    steps = LocalSGD(steps=3, batch_size=16, lr=0.1)
    rec = Engine(Spy(local=steps), task, parts, dataclasses.replace(s, rounds=1, deadline=0.04)).run().records[0]
    assert rec["late"] == [1, 2, 3] and SEEN == [[0]] and rec["sim_seconds"] == 0.04


def test_no_late_client_round_time_is_the_slowest_on_time_client():
    task, parts = uneven_blobs()
    s = RunSettings(rounds=1, deadline=1.0, speed_spread=0.0, upload_bandwidth=1e5)
    rec = Engine(FedAvg(local=LOCAL), task, parts, s).run().records[0]
    up = rec["uplink_bytes_per_client"]
    assert rec["late"] == []
    assert math.isclose(rec["sim_seconds"], 80 / 1000 + up / 1e5)


def test_speeds_are_per_client_lognormal_and_deterministic():
    speeds = [client_speed(7, c, 0.5) for c in range(2000)]
    assert speeds[:5] == [client_speed(7, c, 0.5) for c in range(5)]  # once per run: no round in the key
    logs = torch.tensor(speeds).log()
    assert abs(float(logs.mean())) < 0.05 and abs(float(logs.std()) - 0.5) < 0.05
    assert client_speed(7, 3, 0.0) == 1.0
    assert simulated_seconds(100, 1000, 2.0, 10.0, 0.0) == 5.0
    assert simulated_seconds(100, 1000, 2.0, 10.0, 500.0) == 7.0
    assert local_work(FedAvg(local=LocalSGD(epochs=3)), 7) == 21
    assert local_work(object(), 7) == 7  # type: ignore[arg-type]


def test_deadline_zero_changes_nothing_but_the_new_fields():
    task, parts = uneven_blobs()
    base = Engine(FedAvg(local=LOCAL), task, parts, RunSettings(rounds=2, clients_per_round=3)).run()
    # no deadline: speeds and bandwidth only change the reported simulated time
    other = RunSettings(rounds=2, clients_per_round=3, speed_spread=3.0, upload_bandwidth=10.0)
    hist = Engine(FedAvg(local=LOCAL), task, parts, other).run()
    # a deadline nobody misses is no deadline either
    loose = Engine(FedAvg(local=LOCAL), task, parts, RunSettings(rounds=2, clients_per_round=3,
                                                                 deadline=1e9)).run()
    for h in (hist, loose):
        assert all(torch.equal(base.state.params[k], h.state.params[k]) for k in base.state.params)
        drop = lambda r: {k: v for k, v in strip(r).items() if k != "sim_seconds"}  # noqa: E731
        assert [drop(r) for r in base.records] == [drop(r) for r in h.records]
    assert all(r["late"] == [] and r["sim_seconds"] > 0 for r in base.records)
    assert base.summary["late_clients"] == 0


def test_resume_equals_straight_run_with_stragglers(tmp_path):
    task, parts = uneven_blobs()
    alg = FedAvg(local=LOCAL)
    s4 = RunSettings(rounds=4, clients_per_round=3, deadline=0.05, speed_spread=1.0)
    straight = Engine(alg, task, parts, s4, run_dir=tmp_path / "a").run()
    Engine(alg, task, parts, dataclasses.replace(s4, rounds=2), run_dir=tmp_path / "b").run()
    resumed = Engine(alg, task, parts, s4, run_dir=tmp_path / "b").run(resume=True)
    assert sum(len(r["late"]) for r in straight.records) > 0  # the test exercises stragglers
    for k in straight.state.params:
        assert torch.equal(straight.state.params[k], resumed.state.params[k])
    assert [strip(r) for r in straight.records] == [strip(r) for r in resumed.records]
    assert straight.summary["late_clients"] == resumed.summary["late_clients"]
    lines = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["late"] for r in lines] == [r["late"] for r in straight.records]


def test_a_late_client_keeps_what_it_trained():
    task, parts = uneven_blobs()
    alg = FedEMADistill(local=LOCAL, downlink="none", class_weighting=False)  # stateful clients
    engine = Engine(alg, task, parts, RunSettings(rounds=2, deadline=0.05, speed_spread=0.0))
    states: dict = {}
    state, rec = engine.round(alg.init(task), 1, states)
    assert rec["late"] == [3] and set(states) == {0, 1, 2, 3}
    first = {k: v.clone() for k, v in states[3].models["model"].items()}
    engine.round(state, 2, states)
    assert any(not torch.equal(first[k], v) for k, v in states[3].models["model"].items())


def test_bad_settings_name_the_key():
    for key, value in [("deadline", -1.0), ("speed_spread", float("nan")), ("speed_spread", 11.0), ("examples_per_second", 0.0),
                       ("upload_bandwidth", -5.0), ("max_upload_bytes", -1), ("deadline", float("inf"))]:
        with pytest.raises(KdflError, match=f"run.{key} must be"):
            RunSettings(**{key: value})
    with pytest.raises(KdflError, match="run.deadline must be a finite number >= 0"):
        config.load(None, ["run.deadline=-2"])
    cfg = config.load(None, ["run.deadline=3", "run.speed_spread=1", "run.max_upload_bytes=1000"])
    assert cfg["run"]["deadline"] == 3.0 and cfg["run"]["max_upload_bytes"] == 1000


# -- the upload limit -------------------------------------------------------------------


def test_oversized_uploads_rejected_before_decoding_round_goes_on(caplog):
    task, parts = uneven_blobs()
    up = len(wire.encode({"delta." + k: v for k, v in FedAvg(local=LOCAL).init(task).params.items()}))
    hist = Engine(FedAvg(local=LOCAL), task, parts, RunSettings(rounds=1, max_upload_bytes=up - 1)).run()
    rec = hist.records[0]
    assert rec["rejected"] == [0, 1, 2, 3] and rec["failed"] == [] and rec["uplink_bytes"] == 4 * up
    assert f"payload of {up} bytes exceeds the limit of {up - 1} bytes" in caplog.text
    assert hist.summary["rejected_payloads"] == 4
    ok = Engine(FedAvg(local=LOCAL), task, parts, RunSettings(rounds=1, max_upload_bytes=up)).run().records[0]
    assert ok["rejected"] == []


def test_decode_checks_the_size_before_parsing():
    garbage = b"not a payload at all" * 10
    with pytest.raises(PayloadError, match="payload of 200 bytes exceeds the limit of 100 bytes"):
        wire.decode(garbage, max_bytes=100)
    with pytest.raises(PayloadError, match="magic"):
        wire.decode(garbage, max_bytes=0)  # no limit: parsed (and refused for what it is)
    assert wire.upload_limit() == wire.DEFAULT_MAX_BYTES
    with wire.limit_uploads(5):
        assert wire.upload_limit() == 5
    assert wire.upload_limit() == wire.DEFAULT_MAX_BYTES


class FakeTransport:
    """A transport that decodes nothing (like Flower's: the payload arrives as arrays)."""

    def __init__(self, replies):
        self.replies = replies

    def exchange(self, round_num, jobs):
        assert [info.id for info, _ in jobs] == [r.client_id for r in self.replies]
        return Exchange([0] * len(jobs), self.replies)

    def evaluate(self, round_num, jobs):
        return [{} for _ in jobs]


def test_the_driver_applies_limit_and_deadline_whatever_the_transport():
    task, parts = uneven_blobs()
    alg = Spy(local=LOCAL)
    state = alg.init(task)
    payload = {"delta." + k: torch.zeros_like(v) for k, v in state.params.items()}
    replies = [Reply(0, 10, payload, up_bytes=100), Reply(1, 20, payload, up_bytes=5000),
               Reply(2, 80, payload, up_bytes=100), Reply(3, error="gone")]
    SEEN.clear()
    s = RunSettings(rounds=1, deadline=0.05, speed_spread=0.0, max_upload_bytes=1000)
    new, rec = run_round(alg, task, state, 1, s, 4, FakeTransport(replies))
    assert isinstance(new, ServerState)
    assert (rec["failed"], rec["late"], rec["rejected"]) == ([3], [2], [1])
    assert SEEN == [[0]] and rec["uplink_bytes"] == 5200 and rec["sim_seconds"] == 0.05


def test_flower_drops_the_same_stragglers_as_the_simulator(monkeypatch):
    """The deadline lives in the round driver: a Flower run (in-process grid) drops the same
    clients and ends with the same model as the simulator."""
    pytest.importorskip("flwr")
    from flower_grid import LocalGrid
    from flwr.supercore.task_identity import TaskIdentity

    from kdfl import experiment
    from kdfl.flower import load_config, server_app
    from kdfl.flower.client_app import make_client_app

    for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):  # what Flower's processes set
        monkeypatch.setattr(TaskIdentity, attr, value)
    path = Path(__file__).resolve().parents[2] / "examples" / "flower_app" / "fedema_mnist1d.toml"
    # 3 clients of ~530 examples x 2 epochs at speeds 0.57, 0.12, 0.64 (seed 0, spread 1): 1.9, 8.8, 1.7 s
    cfg = load_config(path, ["run.rounds=1", "algorithm.name=fedavg", "compression.uplink='fp32'",
                             "run.deadline=3.0", "run.speed_spread=1.0", "run.max_upload_bytes=1000000"])
    ref = experiment.run(cfg)
    flower = server_app.run(LocalGrid(make_client_app(), cfg["data"]["num_clients"]), cfg)
    assert ref.records[0]["late"] == flower.records[0]["late"] == [1]
    assert ref.records[0]["sim_seconds"] == flower.records[0]["sim_seconds"] == 3.0
    assert ref.summary["late_clients"] == flower.summary["late_clients"] == 1
    for key, value in ref.state.params.items():
        torch.testing.assert_close(flower.state.params[key], value, rtol=0, atol=0)
