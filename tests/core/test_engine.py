"""Engine behaviour: byte accounting, failures, malformed payloads, resume."""

import dataclasses
import json

import pytest
import torch
from helpers import blob_task

from kdfl import wire
from kdfl.algorithms import FedAvg, FedEMADistill
from kdfl.algorithms.program import Custom, run_client
from kdfl.simulation.engine import Engine, RunSettings
from kdfl.train import LocalSGD
from kdfl.types import ClientInfo, PayloadError

LOCAL = LocalSGD(epochs=1, batch_size=16, lr=0.1)


def test_byte_counts_equal_encoded_payload_size():
    task, parts = blob_task()
    alg = FedAvg(local=LOCAL)
    hist = Engine(alg, task, parts, RunSettings(rounds=1)).run()
    params = alg.init(task).params
    down = len(wire.encode(params))
    up = len(wire.encode({"delta." + k: v for k, v in params.items()}))
    rec = hist.records[0]
    assert rec["downlink_bytes_per_client"] == down and rec["downlink_bytes"] == 4 * down
    assert rec["uplink_bytes_per_client"] == up and rec["uplink_bytes"] == 4 * up
    # the encoding is the raw fp32 data plus a small header
    assert 0 < up - 4 * sum(v.numel() for v in params.values()) < 200


@dataclasses.dataclass(frozen=True)
class Crashing(FedAvg):
    crash: int = 1

    def client_program(self, task, downlink, client):
        if client.id == self.crash:
            raise RuntimeError("disk on fire")
        return super().client_program(task, downlink, client)


@dataclasses.dataclass(frozen=True)
class Corrupting(FedAvg):
    """Client 0 sends NaN, client 1 a wrongly shaped delta, client 2 a missing key."""

    def client_program(self, task, downlink, client):
        program = super().client_program(task, downlink, client)
        delta = program.upload[0]

        def corrupt(models):
            p = delta.make(models)
            k0 = next(iter(p))
            if client.id == 0:
                p[k0] = p[k0] * float("nan")
            elif client.id == 1:
                p[k0] = torch.zeros(3, 3)
            elif client.id == 2:
                del p[k0]
            return p

        return dataclasses.replace(program, upload=[Custom(corrupt)])


def test_crashed_client_is_excluded_and_logged(caplog):
    task, parts = blob_task()
    hist = Engine(Crashing(local=LOCAL), task, parts, RunSettings(rounds=2)).run()
    assert all(r["failed"] == [1] for r in hist.records)
    assert "client 1 failed" in caplog.text and "disk on fire" in caplog.text
    assert hist.summary["final_accuracy"] > 0.5  # the run went on with the others


def test_malformed_payloads_rejected_round_completes(caplog):
    task, parts = blob_task()
    hist = Engine(Corrupting(local=LOCAL), task, parts, RunSettings(rounds=1)).run()
    rec = hist.records[0]
    assert rec["rejected"] == [0, 1, 2]
    assert "NaN" in caplog.text and "expected" in caplog.text and "missing" in caplog.text
    # only client 3 was averaged: the server moved exactly by client 3's own delta
    engine = Engine(FedAvg(local=LOCAL), task, parts, RunSettings(rounds=1))
    init = FedAvg(local=LOCAL).init(task).params
    u = run_client(FedAvg(local=LOCAL), task, init, engine.client(3, 1))
    for k in init:
        torch.testing.assert_close(hist.state.params[k], init[k] + u.payload["delta." + k], rtol=0, atol=1e-6)


def test_resume_is_bit_identical(tmp_path):
    task, parts = blob_task()
    alg = FedAvg(local=LOCAL)
    straight = Engine(alg, task, parts, RunSettings(rounds=4, clients_per_round=3), run_dir=tmp_path / "a").run()
    # "kill" after 2 rounds, then resume to 4
    Engine(alg, task, parts, RunSettings(rounds=2, clients_per_round=3), run_dir=tmp_path / "b").run()
    resumed = Engine(alg, task, parts, RunSettings(rounds=4, clients_per_round=3), run_dir=tmp_path / "b").run(
        resume=True
    )
    for k in straight.state.params:
        assert torch.equal(straight.state.params[k], resumed.state.params[k])
    strip = lambda r: {k: v for k, v in r.items() if k != "wall_seconds"}  # noqa: E731
    assert [strip(r) for r in straight.records] == [strip(r) for r in resumed.records]
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["round"] for x in lines] == [1, 2, 3, 4]


def test_sampling_and_dropout_are_deterministic():
    task, parts = blob_task(num_clients=8)
    s = RunSettings(rounds=3, clients_per_round=4, dropout=0.3)
    a = Engine(FedAvg(local=LOCAL), task, parts, s).run().records
    b = Engine(FedAvg(local=LOCAL), task, parts, s).run().records
    assert [(r["clients"], r["dropped"]) for r in a] == [(r["clients"], r["dropped"]) for r in b]
    assert all(len(r["clients"]) == 4 for r in a)


def test_all_clients_failing_keeps_state(caplog):
    task, parts = blob_task(num_clients=1)
    hist = Engine(Crashing(local=LOCAL, crash=0), task, parts, RunSettings(rounds=1)).run()
    init = FedAvg(local=LOCAL).init(task).params
    assert all(torch.equal(hist.state.params[k], init[k]) for k in init)
    assert "no client update accepted" in caplog.text


def test_bad_settings():
    with pytest.raises(Exception, match="dropout"):
        RunSettings(dropout=1.0)


@dataclasses.dataclass(frozen=True)
class RejectedStateful(FedEMADistill):
    """Stateful clients (downlink none); the server rejects client 0's upload every round."""

    def validate(self, task, state, update):
        super().validate(task, state, update)
        if update.client_id == 0:
            raise PayloadError("rejected by the test")


def test_a_client_keeps_its_state_when_its_upload_is_rejected():
    # a real client cannot know that the server rejected its upload: it keeps what it
    # trained (as a Flower node does), and continues from it next round
    task, parts = blob_task()
    alg = RejectedStateful(local=LOCAL, downlink="none", class_weighting=False)
    engine = Engine(alg, task, parts, RunSettings(rounds=2))
    states = {}
    state = alg.init(task)
    state, rec = engine.round(state, 1, states)
    assert rec["rejected"] == [0] and set(states) == {0, 1, 2, 3}
    first = {k: v.clone() for k, v in states[0].models["model"].items()}
    engine.round(state, 2, states)
    assert any(not torch.equal(first[k], v) for k, v in states[0].models["model"].items())  # trained on from it


@dataclasses.dataclass(frozen=True)
class SeesOnlyInfo(FedAvg):
    def configure(self, task, state, client):
        assert type(client) is ClientInfo  # no data, no kept state: those live on the client
        assert not hasattr(client, "data") and not hasattr(client, "state")
        return super().configure(task, state, client)


def test_configure_sees_what_the_server_knows():
    task, parts = blob_task()
    hist = Engine(SeesOnlyInfo(local=LOCAL), task, parts, RunSettings(rounds=1)).run()
    assert hist.records[0]["failed"] == [] and hist.summary["final_accuracy"] > 0


@dataclasses.dataclass(frozen=True)
class Overflowing(FedAvg):
    """Client 0's delta is too large for the fp16 uplink codec."""

    def client_program(self, task, downlink, client):
        program = super().client_program(task, downlink, client)
        if client.id != 0:
            return program
        delta = program.upload[0]
        return dataclasses.replace(program, upload=[Custom(lambda models: {
            k: v * 1e9 if v.is_floating_point() else v for k, v in delta.make(models).items()})])


def test_a_client_that_cannot_encode_its_upload_is_a_failed_client(caplog):
    from kdfl.transport import codec_of

    task, parts = blob_task()
    hist = Engine(Overflowing(local=LOCAL), task, parts, RunSettings(rounds=1), uplink_codec=codec_of("fp16")).run()
    rec = hist.records[0]
    assert rec["failed"] == [0] and rec["rejected"] == []  # the run went on with the others
    assert "cannot encode its upload" in caplog.text and "float16" in caplog.text
