"""FedProto: the loss by hand, the server's prototype aggregate by hand, the upload
(class means in eval mode), payload bytes and validation, the feature-width check,
executors, learning on digits."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from kdfl import models, wire
from kdfl.algorithms import ALGORITHMS, FedProto
from kdfl.algorithms.fedproto import FedProtoState, ProtoLoss, aggregate, class_means, nearest_prototype
from kdfl.algorithms.program import run_program
from kdfl.losses import Batch, Outputs
from kdfl.rng import derive
from kdfl.simulation.clients import evaluate_client
from kdfl.simulation.executors import Sequential
from kdfl.simulation.parallel import Parallel
from kdfl.simulation.vectorized import Vectorized
from kdfl.train import LocalSGD
from kdfl.transport import pack
from kdfl.types import (
    Client,
    ClientInfo,
    ClientState,
    ClientUpdate,
    KdflError,
    PayloadError,
    Task,
    TensorData,
)

SIZES = [7, 13, 20, 3, 16, 16, 1, 9]  # unequal, ragged last batches
LOCAL = LocalSGD(epochs=2, batch_size=5, lr=0.1, momentum=0.9, weight_decay=1e-3)


def nbytes(payload) -> int:
    return len(wire.encode(pack(payload, None)))


def make_task(archs, sizes=SIZES, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    n, shape = sum(sizes), (1, 8, 8)
    x, y = torch.randn(n, *shape, generator=g), torch.randint(0, classes, (n,), generator=g)
    data = TensorData(x, y)
    task = Task(train=data, test=data, proxy=None, val=None, num_classes=classes, input_shape=shape,
                server_arch=archs[0], client_archs=[archs[i % len(archs)] for i in range(len(sizes))],
                build_model=functools.partial(models.build, input_shape=shape, num_classes=classes), seed=seed)
    bounds = torch.tensor([0, *sizes]).cumsum(0).tolist()
    return task, [data.subset(range(bounds[i], bounds[i + 1])) for i in range(len(sizes))]


def test_registered():
    assert ALGORITHMS["fedproto"] is FedProto


# ----------------------------------------------------------------------------- the loss
def test_loss_by_hand():
    z = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 1.0], [3.0, 1.0, 2.0]])  # logits (B=3, C=3)
    f = torch.tensor([[1.0, 2.0], [0.0, -1.0], [2.0, 2.0]])  # features (B, D=2)
    y = torch.tensor([0, 1, 2])
    protos = torch.tensor([[0.0, 2.0], [5.0, 5.0], [1.0, 1.0]])
    present = torch.tensor([1.0, 0.0, 1.0])  # class 1 has no global prototype
    out = Outputs({"model": {"logits": z, "features": f}}, {}, None)
    got = ProtoLoss(lam=0.5)(out, Batch(torch.zeros(3, 1), y, torch.arange(3)), {"protos": protos, "present": present})
    # squared distances: sample 0: (1-0)^2 + (2-2)^2 = 1; sample 1 masked; sample 2: 1 + 1 = 2; over B*D = 6
    want = F.cross_entropy(z, y) + 0.5 * (1.0 + 2.0) / 6
    assert float(got) == pytest.approx(float(want), rel=1e-6)


def test_client_program_round_one_ce_then_proto_loss():
    task, parts = make_task(["mlp:hidden=8"], sizes=[12], classes=3)
    client = Client(0, parts[0], "mlp:hidden=8", 1, seed=0)
    alg = FedProto(local=LocalSGD(epochs=1, batch_size=64, lr=0.1), lam=2.0)
    p1 = alg.client_program(task, {}, client)
    assert "features" not in p1.phases[0].outputs and not isinstance(p1.phases[0].loss, ProtoLoss)
    protos = torch.randn(3, 8)
    down = {"protos": protos, "proto_holders": torch.tensor([2, 0, 1])}
    p2 = alg.client_program(task, down, client)
    assert isinstance(p2.phases[0].loss, ProtoLoss) and "features" in p2.phases[0].outputs
    # one full-batch step: the reported loss is the loss of the starting model, by hand
    model = task.new_model("mlp:hidden=8")
    model.load_state_dict(p2.models["model"].weights)
    model.train()
    with torch.no_grad():
        o = model(parts[0].x, features=True)
    y = parts[0].y
    mask = torch.tensor([1.0, 0.0, 1.0])[y]
    mse = (((o["features"] - protos[y]) ** 2) * mask[:, None]).sum() / o["features"].numel()
    want = F.cross_entropy(o["logits"], y) + 2.0 * mse
    u = run_program(task, client, p2)
    assert u.metrics["train_loss"] == pytest.approx(float(want), rel=1e-5)


# ----------------------------------------------------------------------------- upload
def test_upload_is_class_means_in_eval_mode_and_bytes():
    task, parts = make_task(["cnn:width=4,hidden=16"], sizes=[30], classes=5)
    data = TensorData(parts[0].x, parts[0].y.clamp_max(3))  # class 4 absent
    client = Client(0, data, "cnn:width=4,hidden=16", 1, seed=0)
    alg = FedProto(local=LocalSGD(epochs=1, batch_size=8, lr=0.05))
    u = run_program(task, client, alg.client_program(task, {}, client))
    assert set(u.payload) == {"protos", "label_counts"}
    p, n = u.payload["protos"], u.payload["label_counts"]
    assert p.shape == (5, 16) and p.dtype == torch.float32 and n.dtype == torch.int64
    assert n.tolist() == torch.bincount(data.y, minlength=5).tolist() and n[4] == 0
    assert torch.equal(p[4], torch.zeros(16))
    model = task.new_model("cnn:width=4,hidden=16")
    model.load_state_dict(u.client_state.models["model"])
    model.eval()
    with torch.no_grad():
        f = model.features(data.x)
    for c in range(4):
        torch.testing.assert_close(p[c], f[data.y == c].mean(0), atol=1e-5, rtol=1e-5)
    means, counts = class_means(model, data.x, data.y, 5, batch_size=7)  # batched: the same numbers
    torch.testing.assert_close(means, p, atol=1e-5, rtol=0)
    # 5 x 16 float32 + 5 int64 plus framing: a few hundred bytes
    size = nbytes(u.payload)
    assert 5 * 16 * 4 + 5 * 8 <= size < 5 * 16 * 4 + 5 * 8 + 300, size


# ----------------------------------------------------------------------------- server
def upd(cid, protos, counts):
    return ClientUpdate(cid, int(sum(counts)), {"protos": torch.tensor(protos), "label_counts": torch.tensor(counts)})


# three clients, three classes, D = 2
UPDATES = [
    upd(0, [[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]], [2, 0, 0]),  # class 0 only
    upd(1, [[3.0, 5.0], [5.0, 1.0], [7.0, 7.0]], [1, 3, 1]),  # the only holder of class 2
    upd(2, [[8.0, 0.0], [1.0, 3.0], [0.0, 0.0]], [1, 1, 0]),
]


def hand_task(archs=("mlp:hidden=2",)) -> Task:
    data = TensorData(torch.zeros(1, 2), torch.zeros(1, dtype=torch.long))
    return Task(train=data, test=data, proxy=None, val=None, num_classes=3, input_shape=(2,), server_arch=archs[0],
                client_archs=list(archs), build_model=functools.partial(models.build, input_shape=(2,), num_classes=3))


def test_server_aggregate_by_hand():
    task = hand_task()
    alg = FedProto()
    state = alg.init(task)
    assert isinstance(state, FedProtoState) and state.params == {} and state.dim == 2
    assert alg.configure(task, state, ClientInfo(0, "mlp:hidden=2", 1)) == {}
    for u in UPDATES:
        alg.validate(task, state, u)
    new, metrics = alg.server_update(task, state, UPDATES)
    down = alg.configure(task, new, ClientInfo(0, "mlp:hidden=2", 1))
    # unweighted over holders: class 0: (1,1), (3,5), (8,0) -> (4, 2); class 1: (5,1), (1,3) -> (3, 2); class 2: (7,7)
    torch.testing.assert_close(down["protos"], torch.tensor([[4.0, 2.0], [3.0, 2.0], [7.0, 7.0]]))
    assert down["proto_holders"].tolist() == [3, 2, 1] and metrics["classes_with_prototype"] == 3.0
    assert new.round == 1 and new.params == {}
    # the paper's count weighting: class 0: (2*(1,1) + (3,5) + (8,0)) / 4 = (13/4, 7/4); class 1: (3*(5,1) + (1,3)) / 4
    w, _ = aggregate(torch.stack([u.payload["protos"] for u in UPDATES]),
                     torch.stack([u.payload["label_counts"] for u in UPDATES]), "counts")
    torch.testing.assert_close(w, torch.tensor([[13 / 4, 7 / 4], [4.0, 1.5], [7.0, 7.0]]))
    # a class nobody holds: zero row, zero holders, masked out of the loss
    g, h = aggregate(torch.ones(2, 3, 2), torch.tensor([[1, 0, 0], [2, 0, 0]]))
    assert h.tolist() == [2, 0, 0] and torch.equal(g[1:], torch.zeros(2, 2))


def test_nearest_prototype_ignores_classes_without_one():
    protos = torch.tensor([[0.0, 0.0], [10.0, 10.0], [1.0, 1.0]])
    f = torch.tensor([[0.9, 0.9], [9.0, 9.0], [0.1, 0.0]])
    assert nearest_prototype(f, protos, torch.tensor([1, 1, 0])).tolist() == [0, 1, 0]
    assert nearest_prototype(f, protos, torch.tensor([1, 1, 1])).tolist() == [2, 1, 0]


def test_nearest_prototype_accuracy_as_per_client_metric_by_hand():
    """The kept model's features are relu(x) (identity hidden layer) and its zero head
    predicts class 0 everywhere; the global prototypes of classes 0 and 1 decide the
    nearest-prototype predictions (class 2 has none)."""
    task = hand_task()
    task = Task(train=task.train, test=TensorData(torch.tensor([[0.9, 0.9], [9.0, 9.0], [0.1, 0.0], [1.0, 1.0]]),
                                                  torch.tensor([0, 1, 0, 2])),
                proxy=None, val=None, num_classes=3, input_shape=(2,), server_arch=task.server_arch,
                client_archs=task.client_archs, build_model=task.build_model)
    kept = {"body.1.weight": torch.eye(2), "body.1.bias": torch.zeros(2), "classifier.weight": torch.zeros(3, 2),
            "classifier.bias": torch.zeros(3)}
    client = Client(0, task.train, "mlp:hidden=2", 3, seed=0, state=ClientState({"model": kept}))
    holdout = TensorData(torch.tensor([[0.9, 0.9], [9.0, 9.0], [-5.0, -5.0]]), torch.tensor([2, 1, 0]))
    down = {"protos": torch.tensor([[0.0, 0.0], [10.0, 10.0], [1.0, 1.0]]), "proto_holders": torch.tensor([2, 1, 0])}
    alg = FedProto()
    # test: prototypes predict 0, 1, 0, 0 (3 of 4 right), the head 0 everywhere (2 of 4);
    # held-out: prototypes 0, 1, 0 (2 of 3; [-5, -5] -> relu 0 -> class 0), the head 1 of 3
    assert evaluate_client(alg, task, down, client, holdout) == pytest.approx(
        {"test_accuracy": 0.5, "test_proto_accuracy": 0.75, "accuracy": 1 / 3, "proto_accuracy": 2 / 3})
    assert alg.client_eval_metrics(task, down, client, task.new_model("mlp:hidden=2"), holdout).keys() == {
        "proto_accuracy"}
    # before the first aggregate (empty downlink) or with no class held: local-head inference only
    assert evaluate_client(alg, task, {}, client, holdout) == pytest.approx({"test_accuracy": 0.5, "accuracy": 1 / 3})
    none_held = {**down, "proto_holders": torch.zeros(3, dtype=torch.long)}
    assert evaluate_client(alg, task, none_held, client, None) == {"test_accuracy": 0.5}
    # a client without a kept model (never trained): nothing at all
    assert evaluate_client(alg, task, down, Client(1, task.train, "mlp:hidden=2", 1, seed=0), holdout) == {}


@pytest.mark.parametrize(("payload", "reason"), [
    ({"protos": torch.zeros(3, 2)}, "expected entries"),
    ({"protos": torch.zeros(3, 2), "label_counts": torch.zeros(3, dtype=torch.long), "x": torch.ones(1)},
     "expected entries"),
    ({"protos": torch.zeros(3, 5), "label_counts": torch.zeros(3, dtype=torch.long)}, r"expected \(3, 2\)"),
    ({"protos": torch.zeros(3, 2, dtype=torch.long), "label_counts": torch.zeros(3, dtype=torch.long)}, "float"),
    ({"protos": torch.full((3, 2), float("nan")), "label_counts": torch.zeros(3, dtype=torch.long)}, "NaN"),
    ({"protos": torch.zeros(3, 2), "label_counts": torch.zeros(3)}, "integer label counts"),
    ({"protos": torch.zeros(3, 2), "label_counts": torch.zeros(4, dtype=torch.long)}, "integer label counts"),
    ({"protos": torch.zeros(3, 2), "label_counts": torch.tensor([1, -1, 0])}, "negative"),
])
def test_validate_rejects_each_malformed_payload(payload, reason):
    task = hand_task()
    alg = FedProto()
    with pytest.raises(PayloadError, match=reason):
        alg.validate(task, alg.init(task), ClientUpdate(0, 1, payload))


def test_options_and_feature_width_checked():
    with pytest.raises(KdflError, match="lam"):
        FedProto(lam=-1.0)
    with pytest.raises(KdflError, match="weighting"):
        FedProto(weighting="median")
    with pytest.raises(KdflError, match=r"mlp:hidden=4 \(4\).*mlp:hidden=8 \(8\).*hidden="):
        FedProto().init(hand_task(("mlp:hidden=4", "mlp:hidden=8")))
    task, _ = make_task(["mlp:hidden=16", "cnn:width=4,hidden=16"])
    assert FedProto().init(task).dim == 16  # two architectures, one width: fine
    task, _ = make_task(["mlp:hidden=16", "cnn:width=4,hidden=8"])
    with pytest.raises(KdflError, match="cnn:width=4,hidden=8"):
        FedProto().init(task)


# ----------------------------------------------------------------------------- executors
def round_two_jobs(alg, task, parts):
    clients = [Client(i, d, task.client_archs[i], 1, derive(0, 1, i)) for i, d in enumerate(parts)]
    state = alg.init(task)
    ups = Sequential().run(alg, task, [(c, alg.configure(task, state, c.info)) for c in clients])
    state, _ = alg.server_update(task, state, ups)
    clients = [Client(i, d, task.client_archs[i], 2, derive(0, 2, i), state=u.client_state)
               for (i, d), u in zip(enumerate(parts), ups, strict=True)]
    return [(c, alg.configure(task, state, c.info)) for c in clients]


def assert_same(ref, got, exact):
    for a, b in zip(ref, got, strict=True):
        assert a.payload.keys() == b.payload.keys()
        for k, v in a.payload.items():
            torch.testing.assert_close(b.payload[k], v, atol=0 if exact else 1e-5, rtol=0, msg=k)
        for k, v in a.client_state.models["model"].items():
            torch.testing.assert_close(b.client_state.models["model"][k], v, atol=0 if exact else 1e-5, rtol=0)
        assert a.metrics == b.metrics if exact else abs(a.metrics["train_loss"] - b.metrics["train_loss"]) < 1e-5


def test_executors_agree_and_batch_heterogeneous_clients():
    alg = FedProto(local=LOCAL, lam=0.5)
    task, parts = make_task(["mlp:hidden=16", "cnn:width=4,hidden=16"])
    jobs = round_two_jobs(alg, task, parts)
    assert all("protos" in down for _, down in jobs)
    ref = Sequential().run(alg, task, jobs)
    vec = Vectorized()
    assert_same(ref, vec.run(alg, task, jobs), exact=False)
    assert vec.batched == len(jobs) and not vec.reasons  # per-client prototypes in consts: batched
    with Parallel(workers=2) as par:
        assert_same(ref, par.run(alg, task, jobs), exact=True)


# ----------------------------------------------------------------------------- learning
def test_learns_on_digits(tmp_path):
    import json

    from kdfl import config as config_mod
    from kdfl import experiment

    cfg = config_mod.load(None, [
        "run.seed=0", "run.threads=1", "data.name=digits", "data.num_clients=6", "partition.name=dirichlet",
        "partition.alpha=0.5", 'model.client_archs=["mlp:hidden=64", "cnn:width=4,hidden=64"]',
        "local.epochs=2", "local.batch_size=16", "local.lr=0.05", "local.momentum=0.9", "run.rounds=4",
        "algorithm.name=fedproto", "data.client_holdout=0.2", "run.client_eval_every=2",
    ])
    hist = experiment.run(cfg, out=tmp_path)
    recs = hist.records
    assert "accuracy" not in recs[-1] and hist.state.params == {}
    assert recs[-1]["classes_with_prototype"] == 10
    assert recs[-1]["uplink_bytes_per_client"] == 2687  # (10, 64) float32 + (10,) int64 + framing
    assert recs[-1]["client_accuracy_mean"] > 0.8 and recs[-1]["client_accuracy_mean"] > recs[1]["client_accuracy_mean"]
    # both inferences per client: local head and nearest global prototype, in every place
    summary = json.loads((tmp_path / "summary.json").read_text())
    for split in ("", "test_"):
        for stat in ("mean", "std", "worst10", "best"):
            assert summary[f"client_{split}accuracy_{stat}"] is not None
            assert summary[f"client_{split}proto_accuracy_{stat}"] == recs[-1][f"client_{split}proto_accuracy_{stat}"]
    assert summary["client_proto_accuracy_mean"] > 0.5  # 10 classes: chance is 0.1
    per = json.loads((tmp_path / "clients.json").read_text())["client_eval"]
    assert len(per["proto_accuracy"]) == len(per["accuracy"]) == len(per["test_proto_accuracy"]) == 6
