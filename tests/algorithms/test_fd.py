"""FD: payload and bytes, the tracker and the loss by hand, the server's per-label
aggregate (exclude_own, counts weighting, median) by hand, validation, Byzantine
attacks on per-label logits, executors, learning."""

from __future__ import annotations

import dataclasses
import functools
import math

import pytest
import torch
from torch import nn

from kdfl import models, wire
from kdfl.algorithms import FD
from kdfl.algorithms.fd import FDLoss
from kdfl.algorithms.program import run_program
from kdfl.losses import Batch, Outputs
from kdfl.rng import derive
from kdfl.simulation.executors import Sequential
from kdfl.simulation.parallel import Parallel
from kdfl.simulation.vectorized import Vectorized
from kdfl.threat import Threat
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

ONE_STEP = LocalSGD(epochs=1, batch_size=8, lr=0.1)
W0 = torch.tensor([[1.0, 2.0], [0.0, 1.0]])  # logits of x = [a, b]: [a + 2b, b]


def linear(arch: str) -> nn.Module:
    return nn.Linear(2, 2, bias=False)


def hand_task() -> Task:
    # x = [1, 0] -> logits [1, 0]; [0, 2] -> [4, 2]; [3, 1] -> [5, 1]
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 1.0]])
    data = TensorData(x, torch.tensor([0, 1, 0]))
    return Task(train=data, test=data, proxy=None, val=None, num_classes=2, input_shape=(2,), server_arch="linear",
                client_archs=["linear"], build_model=linear)


def hand_client(task: Task, weights=W0) -> Client:
    return Client(0, task.train, "linear", 1, seed=0, state=ClientState({"model": {"weight": weights.clone()}}))


def nbytes(payload) -> int:
    return len(wire.encode(pack(payload, None)))


def test_payload_tracker_and_bytes_by_hand():
    task = hand_task()
    alg = FD(local=ONE_STEP)
    u = run_program(task, hand_client(task), alg.client_program(task, {}, hand_client(task)))
    # one batch of all three samples, logits before the step: label 0 -> [1, 0] + [5, 1], label 1 -> [4, 2]
    torch.testing.assert_close(u.payload["label_logits"], torch.tensor([[3.0, 0.5], [4.0, 2.0]]))
    assert u.payload["label_counts"].tolist() == [2, 1] and u.payload["label_counts"].dtype == torch.int64
    assert u.payload["label_logits"].dtype == torch.float32 and list(u.payload) == ["label_logits", "label_counts"]
    # wire: 9 header bytes; per entry 2 + name + 2 + 4·ndim + data
    assert nbytes(u.payload) == 9 + (2 + 12 + 2 + 8 + 2 * 2 * 4) + (2 + 12 + 2 + 4 + 2 * 8)
    assert u.client_state is not None and not torch.equal(u.client_state.models["model"]["weight"], W0)  # kept, trained
    # C = 10 (MNIST-like): a (10, 10) float32 matrix and 10 int64 counts: 533 bytes up
    ten = {"label_logits": torch.zeros(10, 10), "label_counts": torch.zeros(10, dtype=torch.int64)}
    assert nbytes(ten) == 533
    assert nbytes({"label_logits": torch.zeros(10, 10), "label_holders": torch.zeros(10, dtype=torch.int64)}) == 534


def test_loss_by_hand():
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([0, 1])
    consts = {"teacher": torch.tensor([[2.0, 0.0], [0.0, 0.0]]), "present": torch.tensor([1.0, 0.0])}
    out, batch = Outputs({"model": {"logits": z}}, {}, None), Batch(torch.zeros(2, 2), y, torch.arange(2))
    e, lse = math.e, math.log(math.e + 1)  # log-sum-exp of [1, 0]
    q0 = e**2 / (e**2 + 1)  # softmax([2, 0])[0]
    ce = lse - 1  # both samples: logit 1 on their label
    kd0 = -(q0 * (1 - lse) + (1 - q0) * (0 - lse))  # sample 1's label has no teacher: masked
    assert float(FDLoss(gamma=0.5)(out, batch, consts)) == pytest.approx(ce + 0.5 * kd0 / 2)
    # T = 2: softmax([1, 0]) for the teacher, log_softmax([0.5, 0]) for the student
    q0, lse2 = e / (e + 1), math.log(math.exp(0.5) + 1)
    kd0 = -(q0 * (0.5 - lse2) + (1 - q0) * (0 - lse2))
    assert float(FDLoss(gamma=1.0, temperature=2.0)(out, batch, consts)) == pytest.approx(ce + kd0 / 2)


def test_client_trains_the_loss_once_there_is_a_teacher():
    task = hand_task()
    alg = FD(local=ONE_STEP, gamma=2.0)
    down = {"label_logits": torch.tensor([[0.0, 1.0], [0.0, 0.0]]), "label_holders": torch.tensor([1, 0])}
    program = alg.client_program(task, down, hand_client(task))
    assert isinstance(program.phases[0].loss, FDLoss)
    u = run_program(task, hand_client(task), program)
    # the one step's loss on logits [1, 0], [4, 2], [5, 1] (labels 0, 1, 0); only label 0 has a teacher
    z = torch.tensor([[1.0, 0.0], [4.0, 2.0], [5.0, 1.0]])
    y = torch.tensor([0, 1, 0])
    ce = torch.nn.functional.cross_entropy(z, y)
    q = torch.softmax(torch.tensor([0.0, 1.0]), -1)
    kd = -(q * torch.log_softmax(z[[0, 2]], -1)).sum(-1).sum() / 3
    assert u.metrics["train_loss"] == pytest.approx(float(ce + 2.0 * kd), rel=1e-6)


def upd(cid, logits, counts):
    return ClientUpdate(cid, int(sum(counts)), {"label_logits": torch.tensor(logits),
                                                "label_counts": torch.tensor(counts)})


# three clients, three labels (each row constant across its C logits for readability)
UPDATES = [
    upd(0, [[1.0] * 3, [0.0] * 3, [0.0] * 3], [2, 0, 0]),  # label 0 only
    upd(1, [[3.0] * 3, [5.0] * 3, [7.0] * 3], [1, 3, 1]),  # the only holder of label 2
    upd(2, [[8.0] * 3, [1.0] * 3, [0.0] * 3], [1, 1, 0]),
]


def three_label_task() -> Task:
    data = TensorData(torch.zeros(1, 2), torch.zeros(1, dtype=torch.long))
    return Task(train=data, test=data, proxy=None, val=None, num_classes=3, input_shape=(2,), server_arch="linear",
                client_archs=["linear"] * 8, build_model=linear)


def teacher(alg, state, cid):
    down = alg.configure(three_label_task(), state, ClientInfo(cid, "linear", 2))
    return down["label_logits"][:, 0].tolist(), down["label_holders"].tolist()


def test_server_aggregate_by_hand():
    task = three_label_task()
    alg = FD()  # clients weighting, mean, exclude_own
    assert alg.configure(task, alg.init(task), ClientInfo(0, "linear", 1)) == {}  # round 1: nothing to send
    state, metrics = alg.server_update(task, alg.init(task), UPDATES)
    assert state.params == {} and state.ids == (0, 1, 2) and metrics == {"labels_with_teacher": 3.0}
    # over all holders: label 0 mean(1, 3, 8) = 4; label 1 mean(5, 1) = 3 (client 0 does not hold it); label 2: 7
    torch.testing.assert_close(state.teacher, torch.tensor([[4.0] * 3, [3.0] * 3, [7.0] * 3]))
    # exclude_own: client 0 -> label 0 mean(3, 8); client 1 -> mean(1, 8), 1, and no teacher for label 2
    assert teacher(alg, state, 0) == ([5.5, 3.0, 7.0], [2, 2, 1])
    assert teacher(alg, state, 1) == ([4.5, 1.0, 0.0], [2, 1, 0])
    assert teacher(alg, state, 5) == ([4.0, 3.0, 7.0], [3, 2, 1])  # no upload last round: everyone's average
    shared = dataclasses.replace(alg, exclude_own=False)
    assert teacher(shared, state, 1) == ([4.0, 3.0, 7.0], [3, 2, 1])

    counts = FD(weighting="counts")  # label 0: (2·1 + 1·3 + 1·8) / 4; label 1: (3·5 + 1·1) / 4
    state, _ = counts.server_update(task, counts.init(task), UPDATES)
    assert teacher(dataclasses.replace(counts, exclude_own=False), state, 0) == ([3.25, 4.0, 7.0], [3, 2, 1])
    t, holders = teacher(counts, state, 2)  # without client 2: (2·1 + 1·3) / 3 and 5
    assert t == pytest.approx([5 / 3, 5.0, 7.0]) and holders == [2, 1, 1]

    median = FD(aggregator="median")
    state, _ = median.server_update(task, median.init(task), UPDATES)
    # label 0: median(1, 3, 8) = 3; label 1: median(5, 1) = 3 (mean of the two middle values)
    assert teacher(dataclasses.replace(median, exclude_own=False), state, 0) == ([3.0, 3.0, 7.0], [3, 2, 1])
    assert teacher(median, state, 1) == ([4.5, 1.0, 0.0], [2, 1, 0])  # without client 1
    trimmed = FD(aggregator="trimmed_mean:beta=0.34")  # trims one of three per side: the middle value
    state, _ = trimmed.server_update(task, trimmed.init(task), UPDATES)
    assert teacher(dataclasses.replace(trimmed, exclude_own=False), state, 0)[0] == [3.0, 3.0, 7.0]


def test_validate_rejects_each_malformed_payload():
    task = three_label_task()
    alg = FD()
    state = alg.init(task)
    good = {"label_logits": torch.zeros(3, 3), "label_counts": torch.tensor([1, 0, 2])}
    alg.validate(task, state, ClientUpdate(0, 1, good))
    bad = [
        ({"label_counts": good["label_counts"]}, "no 'label_logits'"),
        ({**good, "label_logits": torch.zeros(3, 2)}, r"\(3, 2\).*expected \(3, 3\)"),
        ({**good, "label_logits": torch.zeros(3, 3, dtype=torch.int64)}, "int64, expected"),
        ({"label_logits": good["label_logits"]}, "no 'label_counts'"),
        ({**good, "label_counts": torch.tensor([1.0, 0.0, 2.0])}, "label_counts.*float32, expected.*integer"),
        ({**good, "label_counts": torch.tensor([1, 0])}, r"label_counts is \(2,\)"),
        ({**good, "label_counts": torch.tensor([True, False, True])}, "torch.bool"),
        ({**good, "label_counts": torch.tensor([1, -1, 2])}, "negative"),
    ]
    for payload, why in bad:
        with pytest.raises(PayloadError, match=why):
            alg.validate(task, state, ClientUpdate(0, 1, payload))


def test_bad_options_rejected():
    for kw, why in (({"weighting": "samples"}, "weighting"), ({"aggregator": "krum:f=1"}, "per-label"),
                    ({"gamma": -1.0}, "gamma"), ({"temperature": 0.0}, "temperature"),
                    ({"aggregator": "median:beta=0.1"}, "beta")):
        with pytest.raises(KdflError, match=why):
            FD(**kw)


def test_byzantine_attacks_act_on_per_label_logits():
    threat = Threat("sign_flip", {}, 3)
    out = threat.tamper(list(UPDATES), [False, True, False], 1, three_label_task())
    torch.testing.assert_close(out[1].payload["label_logits"], -UPDATES[1].payload["label_logits"])
    assert torch.equal(out[1].payload["label_counts"], UPDATES[1].payload["label_counts"])  # integers untouched
    assert torch.equal(out[0].payload["label_logits"], UPDATES[0].payload["label_logits"])


# ----------------------------------------------------------------------------- executors
SIZES = [7, 13, 20, 3, 16, 16, 1, 9]  # unequal, ragged last batches
LOCAL = LocalSGD(epochs=2, batch_size=5, lr=0.1, momentum=0.9, weight_decay=1e-3)


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


def round_two_jobs(alg, task, parts):
    """Round 1 by the reference runner, then round 2's jobs (kept models, per-client teachers)."""
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
            if exact:
                assert torch.equal(v, b.payload[k]), k
            else:
                torch.testing.assert_close(b.payload[k], v, atol=1e-5, rtol=0, msg=k)
        for k, v in a.client_state.models["model"].items():
            torch.testing.assert_close(b.client_state.models["model"][k], v, atol=0 if exact else 1e-5, rtol=0)
        assert a.metrics == b.metrics if exact else abs(a.metrics["train_loss"] - b.metrics["train_loss"]) < 1e-5


@pytest.mark.parametrize("alg", [FD(local=LOCAL, gamma=0.5, temperature=2.0),
                                 FD(local=LOCAL, weighting="counts", aggregator="median")], ids=["mean", "median"])
def test_executors_agree_and_batch_fd(alg):
    task, parts = make_task(["mlp:hidden=16", "cnn:width=4,hidden=8"])
    jobs = round_two_jobs(alg, task, parts)
    assert all("label_logits" in down for _, down in jobs)
    ref = Sequential().run(alg, task, jobs)
    vec = Vectorized()
    assert_same(ref, vec.run(alg, task, jobs), exact=False)
    assert vec.batched == len(jobs) and not vec.reasons  # per-client teachers and trackers, batched
    with Parallel(workers=2) as par:
        assert_same(ref, par.run(alg, task, jobs), exact=True)


def test_learns_on_digits():
    from kdfl import config as config_mod
    from kdfl import experiment

    cfg = config_mod.load(None, [
        "run.seed=0", "run.threads=1", "data.name=digits", "data.num_clients=6", "partition.name=dirichlet",
        "partition.alpha=0.5", "model.arch=mlp:hidden=64", "local.epochs=2", "local.batch_size=16",
        "local.lr=0.05", "local.momentum=0.9", "run.rounds=4", "algorithm.name=fd", "data.client_holdout=0.2",
        "run.client_eval_every=2",
    ])
    hist = experiment.run(cfg)
    recs = hist.records
    assert "accuracy" not in recs[-1] and recs[-1]["uplink_bytes_per_client"] == 533  # 10 classes
    assert recs[-1]["client_accuracy_mean"] > 0.85 and recs[-1]["client_accuracy_mean"] > recs[1]["client_accuracy_mean"]
    assert recs[-1]["labels_with_teacher"] == 10
