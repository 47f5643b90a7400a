"""The conformance suite: every registered algorithm, present and future, meets the contract.

Parametrized over ``kdfl.algorithms.ALGORITHMS`` (plus the test-only two-model toy in
``tests/core/toy_algorithms.py`` and the guide's ``examples/mini_fedmd.py``), so a new
algorithm is tested without editing this file:

- one round runs on every model family of the zoo that it supports;
- the fast executors equal the sequential reference: ``parallel`` bit for bit,
  ``vectorized`` within ``ATOL`` (1e-5, as tests/simulation/test_executors.py), and the
  vectorized executor either batched every client or recorded why not;
- a round through the Flower ClientApp/ServerApp (in-process grid) equals a simulator
  round bit for bit;
- 2 rounds + resume + 2 rounds equals 4 rounds straight;
- a malformed upload (wrong shape, NaN) is rejected with a reason while the round goes on.

An algorithm whose hyperparameters need other values to run on the tiny federation here
can declare ``conformance_overrides`` (a tuple of ``section.key=value`` strings) as a class
attribute; a nested ``distill`` table is shortened to a few steps automatically. One
that cannot run on some model families declares them in ``conformance_unsupported`` (a
tuple of registry keys, e.g. ``("mlp",)``): for those, a run must fail with a KdflError
that names the architecture.
"""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest
import torch

from kdfl import config as config_mod
from kdfl import experiment
from kdfl.algorithms import ALGORITHMS, nested_fields, resolve
from kdfl.algorithms.program import Custom
from kdfl.compression import unfactor
from kdfl.simulation.engine import Engine, RunSettings
from kdfl.simulation.executors import ClientFailure, Sequential
from kdfl.simulation.parallel import Parallel
from kdfl.simulation.vectorized import Vectorized
from kdfl.types import KdflError

ATOL = 1e-5
# the registry, the two-model toy and the guide's example (docs/writing-an-algorithm.md)
NAMES = [*ALGORITHMS, "toy_algorithms:ToyMutual", "mini_fedmd:MiniFedMD"]
FAMILIES = ["mlp:hidden=32", "cnn:width=4,hidden=16", "resnet8:width=4", "resnet8:norm=gn,width=4",
            "vgg9:width=4,hidden=16", "shufflenet:width=0.5"]
BASE = [
    "run.seed=3", "run.threads=1", "data.name=digits", "data.num_clients=4", "data.proxy=holdout",
    "data.proxy_size=40", "data.val_size=20", "partition.name=dirichlet", "partition.alpha=1.0",
    "model.arch=mlp:hidden=32", "local.epochs=1", "local.batch_size=32", "local.lr=0.05", "local.momentum=0.5",
    "run.checkpoint_every=1", "data.client_holdout=0.2",
]


def overrides(name: str, *extra: str) -> list[str]:
    cls = resolve(name)
    out = [*BASE, f"algorithm.name={name}"]
    if "distill" in nested_fields(cls):
        out.append("algorithm.distill.steps=5")
    return [*out, *getattr(cls, "conformance_overrides", ()), *extra]


def cfg_of(name: str, *extra: str) -> config_mod.Config:
    return config_mod.load(None, overrides(name, *extra))


def params_equal(a, b, exact: bool = True) -> None:
    assert a.keys() == b.keys()
    for k, v in a.items():
        torch.testing.assert_close(b[k], v, rtol=0, atol=0 if exact else ATOL, msg=k)


def strip(records):
    """Records without timings, as JSON text (NaN-safe equality)."""
    return [json.dumps({k: v for k, v in r.items() if k not in ("wall_seconds", "uplink_record_bytes")},
                       sort_keys=True) for r in records]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", NAMES)
def test_one_round_on_every_model_family(name, family):
    arch = family.partition(":")[0]
    if arch in getattr(resolve(name), "conformance_unsupported", ()):  # declared: must fail clearly
        with pytest.raises(KdflError, match=arch):
            experiment.run(cfg_of(name, f"model.arch={family}", "run.rounds=1"))
        return
    hist = experiment.run(cfg_of(name, f"model.arch={family}", "run.rounds=1"))
    rec = hist.records[0]
    assert rec["failed"] == [] and rec["rejected"] == [], rec
    assert rec["uplink_bytes"] > 0
    if hist.state.params:  # a global model: evaluated every round
        assert 0.0 <= rec["accuracy"] <= 1.0 and rec["nll"] == rec["nll"]
    else:  # none (FedMD, FD, local): no global metrics
        assert "accuracy" not in rec and hist.summary["final_accuracy"] is None
    # per-client metrics after the last round, on every client's held-out split and the test set
    c, s = hist.clients, hist.summary
    assert c["client_eval"]["clients"], "no client has a model to evaluate"
    assert 0.0 <= s["client_accuracy_worst10"] <= s["client_accuracy_mean"] <= s["client_accuracy_best"] <= 1.0
    assert s["client_test_accuracy_mean"] == c["client_test_accuracy_mean"] and s["client_eval_round"] == 1


def round_jobs(name: str, *extra: str):
    fed = experiment.build(cfg_of(name, *extra))
    engine = Engine(fed.algorithm, fed.task, fed.partitions, RunSettings(rounds=1))
    state = fed.algorithm.init(fed.task)
    clients = [engine.client(c, 1) for c in range(len(fed.partitions))]
    return fed, [(c, fed.algorithm.configure(fed.task, state, c.info)) for c in clients]


def rebuilt(payload):
    """``payload`` with truncated-SVD entries (FedKD's uploads) replaced by the matrices
    they encode: singular vectors are ill-conditioned where singular values nearly tie, so
    training differences within ATOL move the factors by far more than the matrix."""
    return unfactor(payload)[0]


def assert_same_updates(ref, got, exact: bool) -> None:
    assert [type(r) for r in ref] == [type(r) for r in got]
    for a, b in zip(ref, got, strict=True):
        assert a.client_id == b.client_id
        if isinstance(a, ClientFailure):
            continue
        assert a.num_examples == b.num_examples
        if exact:
            assert a.payload.keys() == b.payload.keys()
            params_equal(a.payload, b.payload, exact)
        else:
            params_equal(rebuilt(a.payload), rebuilt(b.payload), exact)
        assert a.metrics.keys() == b.metrics.keys()
        for k, v in a.metrics.items():
            assert v == b.metrics[k] if exact else abs(v - b.metrics[k]) <= ATOL, k
        assert (a.client_state is None) == (b.client_state is None)
        if a.client_state is not None:
            assert a.client_state.models.keys() == b.client_state.models.keys()
            for m, w in a.client_state.models.items():
                params_equal(w, b.client_state.models[m], exact)


@pytest.mark.parametrize("name", NAMES)
def test_fast_executors_equal_sequential(name):
    # two client architectures where the algorithm allows them (stateful and heterogeneous
    # programs meet the executors too); weight-averaging algorithms refuse them at init
    try:
        fed, jobs = round_jobs(name, 'model.client_archs=["mlp:hidden=32", "cnn:width=4,hidden=16"]',
                               "data.num_clients=6", "local.epochs=2")
    except KdflError:
        fed, jobs = round_jobs(name, "data.num_clients=6", "local.epochs=2")
    task, alg = fed.task, fed.algorithm
    ref = Sequential().run(alg, task, jobs)
    assert not any(isinstance(r, ClientFailure) for r in ref), ref
    vec = Vectorized()
    assert_same_updates(ref, vec.run(alg, task, jobs), exact=False)
    assert vec.batched == len(jobs) or vec.reasons, "vectorized neither batched every client nor said why"
    if vec.batched < len(jobs):
        logging.getLogger(__name__).info("%s: sequential clients: %s", name, vec.reasons)
    with Parallel(workers=2) as par:
        assert_same_updates(ref, par.run(alg, task, jobs), exact=True)


@pytest.mark.parametrize("name", NAMES)
def test_flower_round_equals_simulator_round(name, monkeypatch):
    pytest.importorskip("flwr")
    from flower_grid import LocalGrid
    from flwr.supercore.task_identity import TaskIdentity

    from kdfl.flower import server_app
    from kdfl.flower.client_app import make_client_app

    for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):  # what Flower's processes set
        monkeypatch.setattr(TaskIdentity, attr, value)
    cfg = cfg_of(name, "run.rounds=2")  # two rounds: kept client state is used in round 2
    ref = experiment.run(cfg_of(name, "run.rounds=2", "run.executor=sequential"))  # the bit-exact reference
    flower = server_app.run(LocalGrid(make_client_app(), cfg["data"]["num_clients"]), cfg)
    params_equal(ref.state.params, flower.state.params, exact=True)
    assert len(ref.records) == len(flower.records)
    for a, b in zip(ref.records, flower.records, strict=True):
        assert a.get("accuracy") == b.get("accuracy") and a["rejected"] == b["rejected"] and a["failed"] == b["failed"]
    assert ref.clients == flower.clients and ref.clients["client_eval"]["clients"]  # evaluated on the nodes


@pytest.mark.parametrize("name", NAMES)
def test_resume_equals_straight_run(name, tmp_path):
    # per-client metrics in the records every 2 rounds, and after the last round in the summary
    straight = experiment.run(cfg_of(name, "run.rounds=4", "run.client_eval_every=2"), out=tmp_path / "a")
    experiment.run(cfg_of(name, "run.rounds=2", "run.client_eval_every=2"), out=tmp_path / "b")
    resumed = experiment.run(cfg_of(name, "run.rounds=4", "run.client_eval_every=2"), out=tmp_path / "b",
                             resume=True)
    params_equal(straight.state.params, resumed.state.params, exact=True)
    assert type(straight.state) is type(resumed.state)
    assert strip(straight.records) == strip(resumed.records)
    assert straight.clients == resumed.clients


@dataclasses.dataclass(frozen=True)
class Corrupted:
    """Any algorithm whose client 0 uploads a mis-shaped first entry and client 1 NaNs."""

    inner: object

    def __getattr__(self, attr):
        return getattr(self.inner, attr)

    def client_program(self, task, downlink, client):
        program = self.inner.client_program(task, downlink, client)
        if client.id > 1:
            return program

        def corrupt(models, uploads=tuple(program.upload), cid=client.id):
            payload = {}
            for up in uploads:
                payload.update(up.make(models))
            key = next((k for k, v in payload.items() if v.is_floating_point()), None)
            if key is None:  # an algorithm that uploads no float entry (local training): send one anyway
                key, payload["extra"] = "extra", torch.ones(2)
            payload[key] = torch.zeros(3, 1, 7) if cid == 0 else payload[key] * float("nan")
            return payload

        return dataclasses.replace(program, upload=[Custom(corrupt)])


@pytest.mark.parametrize("name", NAMES)
def test_malformed_upload_rejected_round_goes_on(name, caplog):
    fed = experiment.build(cfg_of(name, "run.rounds=1"))
    alg = Corrupted(fed.algorithm)
    hist = Engine(alg, fed.task, fed.partitions, RunSettings(rounds=1)).run()  # type: ignore[arg-type]
    rec = hist.records[0]
    assert rec["rejected"] == [0, 1] and rec["failed"] == []
    assert "payload of client 0 rejected" in caplog.text and "payload of client 1 rejected" in caplog.text
    assert "NaN" in caplog.text
    assert 0.0 <= rec.get("accuracy", 0.0) <= 1.0 and len(hist.records) == 1  # the round went on with clients 2 and 3
