"""Per-client metrics (held-out split, the client's model, statistics), the `local`
baseline, and the client-state store that keeps 1,000 stateful clients out of memory."""

import json

import numpy as np
import pytest
import torch
from helpers import blob_task, tiny_task

from kdfl import config as config_mod
from kdfl import experiment
from kdfl.algorithms import Local
from kdfl.algorithms.program import Model, fresh_weights
from kdfl.data import hold_out
from kdfl.simulation.clients import ClientStore, client_stats, default_client_model, evaluate_client
from kdfl.simulation.engine import Engine, RunSettings
from kdfl.train import LocalSGD
from kdfl.types import Client, ClientState, KdflError, TensorData


# ----------------------------------------------------------------------------- held-out split
def test_hold_out_keeps_each_clients_label_mix_and_partitions_its_rows():
    labels = np.array([0] * 10 + [1] * 5 + [2] * 1 + [0] * 4)
    parts = [np.arange(16), np.arange(16, 20)]
    train, held = hold_out(labels, parts, 0.2, seed=1)
    for p, t, h in zip(parts, train, held, strict=True):
        assert sorted([*t, *h]) == list(p) and not set(t) & set(h)
    # client 0: 10 zeros -> 2 held, 5 ones -> 1 held, 1 two -> 0 held (never all of a label)
    assert np.bincount(labels[held[0]], minlength=3).tolist() == [2, 1, 0]
    assert np.bincount(labels[held[1]], minlength=3).tolist() == [1, 0, 0]  # round(0.8) = 1 of 4 zeros
    again = hold_out(labels, parts, 0.2, seed=1)
    assert all((a == b).all() for a, b in zip(held, again[1], strict=True))  # deterministic
    with pytest.raises(KdflError, match="client_holdout"):
        hold_out(labels, parts, 1.0, seed=1)


def test_config_holdout_removes_rows_from_training():
    base = ["data.name=digits", "data.num_clients=4", "partition.name=iid"]
    plain = experiment.build(config_mod.load(None, base))
    split = experiment.build(config_mod.load(None, [*base, "data.client_holdout=0.25"]))
    for p, t, h in zip(plain.partitions, split.partitions, split.holdouts, strict=True):
        assert sorted([*t, *h]) == list(p)
        assert abs(len(h) - 0.25 * len(p)) <= 10  # per label rounding, 10 labels
    assert plain.holdouts is None
    with pytest.raises(KdflError, match="client_holdout"):
        config_mod.load(None, [*base, "data.client_holdout=1.5"])


# ----------------------------------------------------------------------------- statistics
def test_client_stats_by_hand():
    vals = [0.9, 0.1, 0.5, 0.7, 0.3, 0.6, 0.8, 0.2, 0.4, 1.0, 0.0]  # 11 clients: worst 10 % = 2 clients
    s = client_stats(vals, "a")
    assert s["a_mean"] == pytest.approx(0.5) and s["a_best"] == 1.0
    assert s["a_worst10"] == pytest.approx(0.05)  # mean of 0.0 and 0.1
    assert s["a_std"] == pytest.approx(float(np.std(vals)))
    assert client_stats([0.4], "a")["a_worst10"] == 0.4 and client_stats([], "a") == {}


# ----------------------------------------------------------------------------- the client's model
def test_default_client_model_is_the_kept_model_else_full_global_weights():
    task, parts = blob_task()
    client = Client(0, task.train.subset(parts[0]), "mlp", 1, seed=0)
    global_w = fresh_weights(task, 99, "mlp")
    assert default_client_model(task, global_w, client).weights.keys() == global_w.keys()
    assert default_client_model(task, {"logits": torch.zeros(2)}, client) is None  # not weights: no model
    kept = fresh_weights(task, 0, "mlp")
    client.state = ClientState({"model": kept})
    assert default_client_model(task, global_w, client).weights is kept  # personal model first


def test_evaluate_client_on_holdout_and_test_by_hand():
    task, parts = tiny_task()  # a zero linear model predicts class 0 everywhere (argmax of ties)

    class Alg:
        def client_model(self, task, downlink, client):
            return Model("linear", {"weight": torch.zeros(2, 2)})

    client = Client(1, task.train.subset(parts[1]), "linear", 1, seed=0)
    holdout = TensorData(torch.tensor([[0.0, 2.0], [1.0, 0.0]]), torch.tensor([1, 0]))
    out = evaluate_client(Alg(), task, {}, client, holdout)
    assert out == {"test_accuracy": 0.25, "accuracy": 0.5}  # test: 1 of 4 labels is 0
    assert evaluate_client(type("NoModel", (), {"client_model": lambda *a: None})(), task, {}, client,
                           holdout) == {}


def test_identical_client_models_share_one_test_pass_and_give_the_same_metrics(monkeypatch):
    """The per-evaluation memo: clients holding the same weights are evaluated on the test
    set once; different weights are not confused; the numbers equal evaluating each."""
    import kdfl.simulation.clients as clients_mod

    task, parts = tiny_task()
    weights = {0: torch.zeros(2, 2), 1: torch.zeros(2, 2), 2: torch.tensor([[0.0, 0.0], [0.0, 1.0]])}

    class Alg:
        def client_model(self, task, downlink, client):
            return Model("linear", {"weight": weights[client.id].clone()})

    calls = []
    real = clients_mod.evaluate
    monkeypatch.setattr(clients_mod, "evaluate", lambda m, d: calls.append(len(d)) or real(m, d))
    cs = [Client(i, task.train.subset(parts[i % len(parts)]), "linear", 1, seed=0) for i in range(3)]
    plain = [evaluate_client(Alg(), task, {}, c, None) for c in cs]
    n_plain = len(calls)
    cache: dict = {}
    memo = [evaluate_client(Alg(), task, {}, c, None, cache) for c in cs]
    assert memo == plain and n_plain == 3
    assert len(calls) - n_plain == 2  # clients 0 and 1 hold the same weights
    assert plain[0]["test_accuracy"] != plain[2]["test_accuracy"]  # the third model differs and was not reused
    fp = clients_mod.weights_fingerprint
    assert fp("linear", {"weight": torch.zeros(2, 2)}) != fp("mlp", {"weight": torch.zeros(2, 2)})
    assert fp("linear", {"weight": torch.zeros(2, 2)}) != fp("linear", {"weight": torch.zeros(4)})
    assert fp("linear", {"weight": torch.zeros(2, 2)}) != fp("linear", {"w": torch.zeros(2, 2)})


def test_client_eval_metrics_hook_adds_per_client_metrics_everywhere():
    """An algorithm's ``client_eval_metrics`` runs on the same model and splits as the
    accuracies (keys as they are on the held-out split, ``test_`` on the test set), and
    its keys get the same per-client lists and statistics, down to the summary."""
    task, parts = tiny_task()

    class Alg:
        def client_model(self, task, downlink, client):
            return Model("linear", {"weight": torch.zeros(2, 2)})

        def client_eval_metrics(self, task, downlink, client, module, data):
            assert not module.weight.any()  # the client's model, loaded
            return {"rows": len(data)} if client.id == 1 or "all" in downlink else {}

    client = Client(1, task.train.subset(parts[1]), "linear", 1, seed=0)
    holdout = TensorData(torch.tensor([[0.0, 2.0], [1.0, 0.0]]), torch.tensor([1, 0]))
    out = evaluate_client(Alg(), task, {}, client, holdout)
    assert out == {"test_accuracy": 0.25, "test_rows": 4.0, "accuracy": 0.5, "rows": 2.0}
    assert evaluate_client(Alg(), task, {}, client, None) == {"test_accuracy": 0.25, "test_rows": 4.0}

    class Clash(Alg):
        def client_eval_metrics(self, task, downlink, client, module, data):
            return {"accuracy": 1.0}

    with pytest.raises(KdflError, match="reserved"):
        evaluate_client(Clash(), task, {}, client, holdout)

    class Transport:  # two clients; client 2 is Byzantine (listed, not in the statistics)
        def __init__(self, results):
            self.results = results

        def evaluate(self, round_num, jobs):
            return self.results

    from kdfl.algorithms import Local
    from kdfl.simulation.rounds import client_eval_record, summarize

    task.client_archs.append("linear")
    task.malicious = frozenset({2})
    results = [{"test_accuracy": 0.5, "rows": 2.0, "test_rows": 4.0, "once": 1.0},
               {"test_accuracy": 1.0, "rows": 4.0, "test_rows": 4.0}, {"test_accuracy": 0.0, "rows": 9.0}]
    alg = Local()
    rec = client_eval_record(alg, task, alg.init(task), 3, 3, Transport(results))
    per = rec["client_eval"]
    assert per["rows"] == [2.0, 4.0, 9.0] and per["test_accuracy"] == [0.5, 1.0, 0.0] and per["malicious"] == [2]
    assert "once" not in per and "test_rows" not in per  # keys some clients lack: no list, no statistics
    assert rec["client_rows_mean"] == 3.0 and rec["client_rows_worst10"] == 2.0 and rec["client_rows_best"] == 4.0
    assert "client_once_mean" not in rec and "client_accuracy_mean" not in rec
    summary = summarize([{"round": 3, "uplink_bytes_per_client": 0.0, "downlink_bytes_per_client": 0.0,
                          "uplink_bytes": 0, "downlink_bytes": 0, "wall_seconds": 0.0, "failed": [],
                          "rejected": [], **rec}], None)
    assert summary["client_rows_std"] == 1.0 and summary["client_test_accuracy_mean"] == 0.75
    assert summary["client_accuracy_mean"] is None  # the standard keys are always there


# ----------------------------------------------------------------------------- local
def test_local_uploads_nothing_keeps_its_model_and_has_no_global_model():
    task, parts = blob_task(num_clients=4)  # every client holds all three classes
    alg = Local(local=LocalSGD(epochs=2, batch_size=16, lr=0.1))
    engine = Engine(alg, task, parts, RunSettings(rounds=3, checkpoint_every=0), holdouts=None)
    hist = engine.run()
    rec = hist.records[-1]
    assert hist.state.params == {} and "accuracy" not in rec and hist.summary["final_accuracy"] is None
    assert rec["uplink_bytes_per_client"] == rec["downlink_bytes_per_client"]  # an empty payload each way
    assert rec["uplink_bytes_per_client"] < 16
    assert hist.summary["client_test_accuracy_mean"] > 0.8  # separable blobs: each client learns alone


def test_local_below_fedavg_on_skewed_clients_personal_metrics_reported():
    """The reference for personalised methods: on pathological label skew, each local
    model knows only its own classes (global test accuracy about 1/3 per client) while
    its held-out accuracy (own label mix) is high."""
    over = ["data.name=digits", "data.num_clients=6", "partition.name=shards", "partition.classes_per_client=2",
            "data.client_holdout=0.2", "run.rounds=3", "local.epochs=2", "local.lr=0.05", "model.arch=mlp:hidden=32"]
    local = experiment.run(config_mod.load(None, [*over, "algorithm.name=local"])).summary
    fedavg = experiment.run(config_mod.load(None, [*over, "algorithm.name=fedavg"])).summary
    assert local["client_accuracy_mean"] > 0.8  # own two classes
    assert local["client_test_accuracy_mean"] < 0.35  # 2 of 10 classes
    assert fedavg["client_test_accuracy_mean"] > local["client_test_accuracy_mean"]


# ----------------------------------------------------------------------------- store
def state_of(v: float) -> ClientState:
    return ClientState({"model": {"w": torch.full((3,), v)}})


def test_store_keeps_at_most_in_memory_states_and_reads_back_the_rest(tmp_path):
    store = ClientStore(tmp_path, in_memory=2)
    for cid in range(5):
        store[cid] = state_of(cid)
    assert len(store._mem) == 2 and len(store) == 5 and list(store) == [0, 1, 2, 3, 4]
    assert sorted(p.name.split("-")[0] for p in tmp_path.glob("*.pt")) == ["0", "1", "2"]
    for cid in range(5):
        assert store[cid].models["model"]["w"][0] == cid
    store[1] = state_of(10.0)  # replacing an evicted state deletes its uncommitted file
    assert store[1].models["model"]["w"][0] == 10.0
    assert len(store._mem) == 2


def test_store_commit_and_reopen(tmp_path):
    store = ClientStore(tmp_path, in_memory=2)
    for cid in range(4):
        store[cid] = state_of(cid)
    manifest = store.commit()
    assert sorted(manifest) == [0, 1, 2, 3] and len(list(tmp_path.glob("*.pt"))) == 4
    store[0] = state_of(7.0)  # a later round...
    for cid in (1, 2, 3):
        store[cid] = state_of(cid + 100)  # ...evicts and writes uncommitted files
    reopened = ClientStore.open(tmp_path, 2, manifest)  # a crash after the checkpoint: back to it
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == sorted(manifest.values())  # the rest removed
    assert [reopened[c].models["model"]["w"][0].item() for c in range(4)] == [0, 1, 2, 3]
    with pytest.raises(KdflError, match="missing"):
        ClientStore.open(tmp_path, 2, {9: "9-99.pt"})


def test_disk_store_run_equals_memory_run_and_resumes(tmp_path):
    base = ["data.name=digits", "data.num_clients=6", "partition.name=dirichlet", "partition.alpha=0.5",
            "algorithm.name=local", "model.client_archs=[\"mlp:hidden=16\", \"mlp:hidden=8\"]",
            "data.client_holdout=0.2", "local.epochs=1", "run.client_eval_every=2", "run.clients_per_round=3"]
    mem = experiment.run(config_mod.load(None, [*base, "run.rounds=4"]))
    disk = experiment.run(config_mod.load(None, [*base, "run.rounds=4", "run.client_states_in_memory=2"]),
                          out=tmp_path / "a")
    assert disk.records[-1]["client_eval"] == mem.records[-1]["client_eval"] and disk.clients == mem.clients
    assert len(list((tmp_path / "a" / "client_states").glob("*.pt"))) == 6  # every client's state, by name
    experiment.run(config_mod.load(None, [*base, "run.rounds=2", "run.client_states_in_memory=2"]),
                   out=tmp_path / "b")
    resumed = experiment.run(config_mod.load(None, [*base, "run.rounds=4", "run.client_states_in_memory=2"]),
                             out=tmp_path / "b", resume=True)
    assert resumed.records[-1]["client_eval"] == mem.records[-1]["client_eval"] and resumed.clients == mem.clients
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["client_accuracy_mean"] == mem.summary["client_accuracy_mean"]


STATEFUL = {
    "local": ["algorithm.name=local"],
    "fd": ["algorithm.name=fd"],
    "fedmd": ["algorithm.name=fedmd", "data.proxy=holdout", "data.proxy_size=60", "algorithm.alignment_size=20",
              "algorithm.transfer_epochs=1"],
    "fedema_distill_hetero": ["algorithm.name=fedema_distill", "data.proxy=holdout", "data.proxy_size=60",
                              "algorithm.distill.steps=3"],
}


@pytest.mark.parametrize("alg", list(STATEFUL))
def test_stateful_algorithms_with_states_in_files_equal_states_in_memory(alg, tmp_path):
    # what benchmarks/client_memory.py checks at 1,000 clients, at 12 (the default executor,
    # partial participation so that clients come back to states read from files)
    base = ["data.name=digits", "data.num_clients=12", "partition.name=iid", "data.client_holdout=0.2",
            "model.arch=mlp:hidden=16", "model.client_archs=[\"mlp:hidden=16\", \"mlp:hidden=8\"]",
            "local.epochs=1", "run.rounds=3", "run.clients_per_round=4", "run.client_eval_every=3", *STATEFUL[alg]]
    mem = experiment.run(config_mod.load(None, base))
    disk = experiment.run(config_mod.load(None, [*base, "run.client_states_in_memory=4"]), out=tmp_path)
    strip = [[{k: v for k, v in r.items() if k != "wall_seconds"} for r in h.records] for h in (mem, disk)]
    assert strip[0] == strip[1] and disk.clients == mem.clients
    assert disk.clients["client_eval"] and len(list((tmp_path / "client_states").glob("*.pt"))) >= 4
