"""Secure aggregation with Flower's SecAgg+ (``kdfl.flower.secagg``): mean-aggregated
algorithms end within the quantization of the simulator's run; rules that need each
upload are refused with the reason."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")

from flower_grid import LocalGrid  # noqa: E402

from kdfl import experiment  # noqa: E402
from kdfl.flower import load_config  # noqa: E402
from kdfl.types import KdflError  # noqa: E402

CONFIG = Path(__file__).resolve().parents[2] / "examples" / "flower_app" / "fedema_mnist1d.toml"
FEDAVG = ["algorithm.name=fedavg", "compression.uplink='fp32'"]
FEDEMA_MEAN = ["algorithm.space='logits'", "algorithm.aggregator='mean'"]  # fp16 logits, as in the example
# differ by construction: time, bytes (SecAgg+ sends masked integers, keys and shares) and the secagg fields
RUNTIME_KEYS = {"wall_seconds", "uplink_bytes", "downlink_bytes", "uplink_bytes_per_client",
                "downlink_bytes_per_client", "secure_aggregation", "secagg_clipping_range", "downlink_payload_bytes",
                "sim_seconds"}


class SerializingGrid(LocalGrid):
    """LocalGrid whose messages and replies are copies, as a real Grid serialises them
    (SecAgg+'s workflow sends one content object to every node, and its mod edits it)."""

    def send_and_receive(self, messages, *, timeout=None):
        return [copy.deepcopy(self.app(copy.deepcopy(m), self.contexts[m.metadata.dst_node_id])) for m in messages]


@pytest.fixture(autouse=True)
def _flower_process(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):  # what Flower's processes set
        monkeypatch.setattr(TaskIdentity, attr, value)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ClientApps train single-threaded; so does the reference
    yield
    torch.set_num_threads(threads)


def _secagg_run(cfg, **settings):
    from kdfl.flower import server_app
    from kdfl.flower.client_app import make_client_app
    from kdfl.flower.secagg import SecAggSettings

    return server_app.run(SerializingGrid(make_client_app(), cfg["data"]["num_clients"]), cfg,
                          secagg=SecAggSettings(**settings))


# One round of FedAvg is within SecAgg+'s quantization (step 2*8/2**22 = 3.8e-6 on the mean
# delta). Later rounds train from that model, and local SGD amplifies any perturbation: in
# the simulator alone, 3e-6 of random noise on the round-1 model of this federation moves
# the round-2 model by ~5e-4. So two rounds get a looser bound (measured over 6 runs: one round
# 2.9e-6..3.5e-6; two rounds of FedAvg up to 2.5e-5 (4 clients: 4.6e-4), under local DP 2e-4;
# FedEMA-Distill, whose server distils 30 Adam steps on the teacher, 4e-4..7e-3).
@pytest.mark.parametrize(("sets", "rounds", "atol"), [
    (FEDAVG, 1, 2e-5),
    (FEDAVG, 2, 2e-3),
    (FEDAVG + ["privacy.mode='local'", "privacy.noise_multiplier=0.5", "privacy.clip=0.5"], 2, 2e-3),
    (FEDEMA_MEAN, 2, 2e-2),  # logits: quantization step 2*64/2**22 = 3.1e-5
], ids=["fedavg-1", "fedavg-2", "fedavg-local-dp", "fedema_distill-mean"])
def test_secagg_run_ends_within_quantization_of_the_simulator(sets, rounds, atol):
    cfg = load_config(CONFIG, [f"run.rounds={rounds}", *sets])
    ref = experiment.run(cfg)
    sec = _secagg_run(cfg)
    for key, value in ref.state.params.items():
        torch.testing.assert_close(sec.state.params[key], value, rtol=0, atol=atol)
    assert len(sec.records) == rounds
    for a, b in zip(ref.records, sec.records, strict=True):
        assert b["secure_aggregation"] == "secagg+" and b["secagg_clipping_range"] > 0
        assert b["uplink_bytes"] > 0 and b["downlink_bytes"] >= b["downlink_payload_bytes"] > 0
        assert a.keys() - RUNTIME_KEYS == b.keys() - RUNTIME_KEYS
        for k in a.keys() - RUNTIME_KEYS:
            if isinstance(a[k], float):
                assert b[k] == pytest.approx(a[k], rel=1e-3, abs=1e-3), k
            else:
                assert b[k] == a[k], k  # clients, dropped, failed, malicious, ...
    if "privacy.mode='local'" in sets:
        assert sec.summary["epsilon"] == ref.summary["epsilon"] > 0


def test_secagg_with_sampling_and_dropout_runs_the_sampled_clients():
    cfg = load_config(CONFIG, ["run.rounds=2", "data.num_clients=4", "run.clients_per_round=3", *FEDAVG])
    ref = experiment.run(cfg)
    sec = _secagg_run(cfg)
    assert [r["clients"] for r in sec.records] == [r["clients"] for r in ref.records] == [[0, 1, 2], [0, 1, 3]]
    assert [r["malicious"] for r in sec.records] == [[], [3]]
    for key, value in ref.state.params.items():  # measured up to 4.6e-4 (see above)
        torch.testing.assert_close(sec.state.params[key], value, rtol=0, atol=5e-3)


@pytest.mark.parametrize(("sets", "match"), [
    ([], "secure aggregation .*median.* needs the individual uploads"),  # the example: median over probs
    (["algorithm.aggregator='mean'", "algorithm.space='logits'", "algorithm.class_weighting=true"],
     "class_weighting = true"),
    (FEDAVG[:1] + ["algorithm.aggregator='krum:f=1'"], "krum"),
    (["algorithm.name=feddf"], "FedDF"),
    (FEDAVG + ["privacy.mode='central'", "privacy.noise_multiplier=1.0"], "central"),
    (FEDAVG + ["run.clients_per_round=1"], "at least 2 clients"),
])
def test_secagg_refuses_what_needs_individual_uploads(sets, match):
    pytest.importorskip("dp_accounting")
    cfg = load_config(CONFIG, ["run.rounds=1", *sets])
    with pytest.raises(KdflError, match=match) as err:
        _secagg_run(cfg)
    assert "fedavg" in str(err.value) or "privacy.mode" in str(err.value) or "clients_per_round" in str(err.value)


def test_layout_round_trip_counters_in_the_clear_and_integers_refused():
    from kdfl.flower.secagg import flatten, unflatten

    a = {"w": torch.randn(2, 3), "h": torch.randn(4).half(), "bn.num_batches_tracked": torch.tensor(5)}
    b = {"w": torch.randn(2, 3), "h": torch.randn(4).half(), "bn.num_batches_tracked": torch.tensor(7)}
    (va, la), (vb, lb) = flatten(a), flatten(b)
    assert va.dtype.name == "float64" and va.size == 10
    mean = unflatten((va + vb) / 2, la, [la, lb])
    torch.testing.assert_close(mean["w"], (a["w"] + b["w"]) / 2)
    assert mean["h"].dtype == torch.float32  # the mean of fp16 uploads keeps its precision
    assert int(mean["bn.num_batches_tracked"]) == 7  # as FedAvg: the maximum of the counters
    with pytest.raises(KdflError, match="label_counts"):
        flatten({"logits": torch.randn(2, 2), "label_counts": torch.tensor([1, 2])})


def test_secagg_settings_from_the_run_config():
    from kdfl.flower.secagg import SecAggSettings

    s = SecAggSettings.from_run_config({"kdfl-secagg-clip": 4.0, "kdfl-secagg-shares": 3,
                                        "kdfl-secagg-threshold": "2"})
    assert (s.clipping_range, s.num_shares, s.reconstruction_threshold) == (4.0, 3, 2)
    with pytest.raises(KdflError, match="kdfl-secagg-clip"):
        SecAggSettings(clipping_range=-1.0)
    with pytest.raises(KdflError, match="SecAgg"):
        SecAggSettings(num_shares=3, reconstruction_threshold=3)


@pytest.mark.slow
def test_secagg_on_flower_simulation_engine():
    """The same through ``flwr run`` on Flower's Ray simulation engine (real messages;
    slow: Ray start-up)."""
    from kdfl.flower import simulate

    cfg = load_config(CONFIG, ["run.rounds=2", *FEDAVG])
    ref = experiment.run(cfg)
    sec = simulate(cfg, num_cpus=2, secagg=True)
    assert [r["secure_aggregation"] for r in sec.records] == ["secagg+", "secagg+"]
    for key, value in ref.state.params.items():
        torch.testing.assert_close(sec.state.params[key], value, rtol=0, atol=2e-3)


class FailingGrid(SerializingGrid):
    """A node whose ClientApp raises answers with an error reply, as a SuperNode does."""

    def send_and_receive(self, messages, *, timeout=None):
        from flwr.app import Error, Message

        out = []
        for m in messages:
            try:
                out.extend(super().send_and_receive([m], timeout=timeout))
            except Exception as e:  # noqa: BLE001
                out.append(Message(Error(code=0, reason=f"ClientApp raised: {e}"), reply_to=m))
        return out


def test_a_client_failing_mid_protocol_is_failed_and_the_others_are_aggregated(monkeypatch):
    """SecAgg+ recovers the masks of a client that dies after sharing its keys; the round
    aggregates the others (the FedAvg mean of clients 0 and 2) and records client 1 as failed."""
    from kdfl.flower import secagg, server_app
    from kdfl.flower.client_app import make_client_app

    real = secagg.client_update

    def flaky(p, context, cid, round_num, downlink):
        if cid == 1 and round_num == 1:
            raise RuntimeError("node 1 crashed")
        return real(p, context, cid, round_num, downlink)

    monkeypatch.setattr(secagg, "client_update", flaky)
    cfg = load_config(CONFIG, ["run.rounds=2", *FEDAVG])
    sec = server_app.run(FailingGrid(make_client_app(), 3), cfg, secagg=secagg.SecAggSettings())
    assert sec.records[0]["failed"] == [1] and sec.records[1]["failed"] == []
    assert sec.summary["failed_clients"] == 1
    assert all(torch.isfinite(v).all() for v in sec.state.params.values())
    assert sec.records[1]["accuracy"] > 0.2


@pytest.mark.slow
def test_secagg_on_superlink_and_three_supernodes(tmp_path):
    """SecAgg+ on Flower's deployment engine: a real SuperLink and three SuperNodes on
    127.0.0.1 (each message runs in a fresh ClientApp process, so the protocol's state
    lives in the node's context between stages), ``flwr run`` of a generated app with
    ``kdfl-secagg = true``, two rounds of FedAvg (slow: ~10 s per message phase here)."""
    import json

    from deploy import Deployment

    from kdfl import config as config_mod
    from kdfl.flower.simulation import descendants, write_app

    cfg = load_config(CONFIG, ["run.rounds=2", *FEDAVG])
    ref = experiment.run(cfg)
    (tmp_path / "kdfl.toml").write_text(config_mod.dumps(cfg))
    with Deployment(tmp_path, "kdfl-sa", 480) as d:
        app = write_app(tmp_path / "app", "kdfl.flower.server_app:app", "kdfl.flower.client_app:app",
                        {"kdfl-config": str(tmp_path / "kdfl.toml"), "kdfl-out": str(d.out), "kdfl-wait-s": 120,
                         "kdfl-secagg": True})
        d.superlink()
        d.supernodes(3)
        d.wait_summary(d.flwr_run(app))
    assert not any(descendants(p.pid) for p in d.processes.procs)
    out = d.out
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["round"], r["secure_aggregation"], r["failed"]) for r in records] == [
        (1, "secagg+", []), (2, "secagg+", [])]
    params = torch.load(out / "params.pt")
    for key, value in ref.state.params.items():
        torch.testing.assert_close(params[key], value, rtol=0, atol=2e-3)
