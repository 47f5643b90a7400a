"""FedDistill / FedDistill+: payload and bytes, the tracker by hand (cumulative vs reset),
the loss by hand, the server's average (and FedAvg) by hand, validation, executors,
learning."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from test_fd import LOCAL, ONE_STEP, W0, assert_same, hand_task, make_task, nbytes, round_two_jobs

from kdfl.algorithms import FedDistill
from kdfl.algorithms.feddistill import FedDistillClientState, FedDistillLoss, FedDistillState
from kdfl.algorithms.program import run_program
from kdfl.losses import Batch, Outputs
from kdfl.simulation.executors import Sequential
from kdfl.simulation.parallel import Parallel
from kdfl.simulation.vectorized import Vectorized
from kdfl.types import Client, ClientState, ClientUpdate, KdflError, PayloadError

TRACKED = torch.tensor([[6.0, 1.0], [4.0, 2.0]])  # hand_task's per-label logit sums under W0 (labels 0, 0, 1)


def client(task, round_num=1, state=None, weights=W0):
    state = state or ClientState({"model": {"weight": weights.clone()}})
    return Client(0, task.train, "linear", round_num, seed=0, state=state)


def test_tracker_counts_from_one_cumulative_and_reset():
    task = hand_task()
    alg = FedDistill(local=ONE_STEP, share_params=True)  # every round starts from the downlink's W0
    down = {"w.weight": W0}
    u1 = run_program(task, client(task), alg.client_program(task, down, client(task)))
    # counts start at 1: label 0 -> [6, 1] / 3, label 1 -> [4, 2] / 2
    torch.testing.assert_close(u1.payload["label_logits"], torch.tensor([[2.0, 1 / 3], [2.0, 1.0]]))
    state = u1.client_state
    assert isinstance(state, FedDistillClientState) and state.models == {}
    torch.testing.assert_close(state.tracker.sums, TRACKED.double())
    assert state.tracker.counts.tolist() == [3, 2]
    # round 2 (a teacher now; the tracked logits are the pre-step ones of W0 again)
    down2 = {**down, "label_logits": torch.zeros(2, 2)}
    c2 = client(task, 2, state)
    u2 = run_program(task, c2, alg.client_program(task, down2, c2))
    torch.testing.assert_close(u2.payload["label_logits"], torch.tensor([[12 / 5, 2 / 5], [8 / 3, 4 / 3]]))
    assert u2.client_state.tracker.counts.tolist() == [5, 3]
    reset = dataclasses.replace(alg, cumulative_tracker=False)
    u3 = run_program(task, c2, reset.client_program(task, down2, c2))
    torch.testing.assert_close(u3.payload["label_logits"], u1.payload["label_logits"])
    assert u3.client_state is None  # nothing to keep: the weights come from the server, the tracker restarts


def test_payload_and_bytes():
    task = hand_task()
    u = run_program(task, client(task), FedDistill(local=ONE_STEP).client_program(task, {}, client(task)))
    assert list(u.payload) == ["label_logits"] and u.payload["label_logits"].shape == (2, 2)
    assert nbytes(u.payload) == 9 + (2 + 12 + 2 + 8 + 2 * 2 * 4)
    assert isinstance(u.client_state, FedDistillClientState) and "model" in u.client_state.models  # its own model
    assert nbytes({"label_logits": torch.zeros(10, 10)}) == 433  # C = 10
    plus = FedDistill(local=ONE_STEP, share_params=True)
    u = run_program(task, client(task), plus.client_program(task, {"w.weight": W0}, client(task)))
    assert list(u.payload) == ["delta.weight", "label_logits"]
    assert nbytes(u.payload) == 9 + (2 + 12 + 2 + 8 + 16) + (2 + 12 + 2 + 8 + 16)


def test_loss_by_hand():
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([0, 1])
    g = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])  # label 0 -> q = [.75, .25]; label 1 -> [.5, .5]
    out, batch = Outputs({"model": {"logits": z}}, {}, None), Batch(torch.zeros(2, 2), y, torch.arange(2))
    lse = math.log(math.e + 1)
    p0 = [1 - lse, -lse]  # log_softmax([1, 0]); sample 1 is its mirror image
    kl0 = 0.75 * (math.log(0.75) - p0[0]) + 0.25 * (math.log(0.25) - p0[1])
    kl1 = 0.5 * (math.log(0.5) - p0[1]) + 0.5 * (math.log(0.5) - p0[0])
    expected = (lse - 1) + 2.0 * (kl0 + kl1) / 2
    assert float(FedDistillLoss(alpha=2.0)(out, batch, {"teacher": g})) == pytest.approx(expected)
    ref = torch.nn.functional.kl_div(torch.log_softmax(z, -1), torch.softmax(g[y], -1), reduction="batchmean")
    assert (kl0 + kl1) / 2 == pytest.approx(float(ref))  # the reference's nn.KLDivLoss(batchmean)


def test_server_average_and_fedavg_by_hand():
    task = hand_task()
    alg = FedDistill()
    state = alg.init(task)
    assert state.params == {} and alg.configure(task, state, client(task).info) == {}
    ups = [ClientUpdate(0, 1, {"label_logits": torch.tensor([[1.0, 2.0], [0.0, 0.0]])}),
           ClientUpdate(1, 3, {"label_logits": torch.tensor([[3.0, 0.0], [4.0, 2.0]])})]
    new, _ = alg.server_update(task, state, ups)
    # the plain average over the round's clients, a label a client never saw (zeros) included
    torch.testing.assert_close(new.teacher, torch.tensor([[2.0, 1.0], [2.0, 1.0]]))
    assert torch.equal(alg.configure(task, new, client(task).info)["label_logits"], new.teacher)
    median = FedDistill(aggregator="median")
    ups3 = [*ups, ClientUpdate(2, 1, {"label_logits": torch.tensor([[9.0, 9.0], [9.0, 9.0]])})]
    torch.testing.assert_close(median.server_update(task, state, ups3)[0].teacher,
                               torch.tensor([[3.0, 2.0], [4.0, 2.0]]))

    plus = FedDistill(share_params=True)
    state = FedDistillState({"weight": torch.ones(2, 2)}, 0)
    down = plus.configure(task, state, client(task).info)
    assert list(down) == ["w.weight"]
    ups = [ClientUpdate(0, 1, {**ups[0].payload, "delta.weight": torch.full((2, 2), 4.0)}),
           ClientUpdate(1, 3, {**ups[1].payload, "delta.weight": torch.zeros(2, 2)})]
    new, _ = plus.server_update(task, state, ups)
    torch.testing.assert_close(new.params["weight"], torch.full((2, 2), 2.0))  # 1 + (1·4 + 3·0) / 4
    assert list(plus.configure(task, new, client(task).info)) == ["w.weight", "label_logits"]


def test_share_params_needs_one_architecture():
    task = hand_task()
    task.client_archs = ["linear", "other"]
    with pytest.raises(KdflError, match=r"FedDistill\+ .*share_params.*every client needs the server's"):
        FedDistill(share_params=True).init(task)
    assert FedDistill().init(task).params == {}  # FedDistill itself takes any mix


def test_validate_rejects_each_malformed_payload():
    task = hand_task()
    alg = FedDistill()
    state = alg.init(task)
    alg.validate(task, state, ClientUpdate(0, 1, {"label_logits": torch.zeros(2, 2)}))
    for payload, why in (({}, "no 'label_logits'"), ({"label_logits": torch.zeros(2, 3)}, r"expected \(2, 2\)"),
                         ({"label_logits": torch.zeros(2, 2, dtype=torch.int32)}, "int32")):
        with pytest.raises(PayloadError, match=why):
            alg.validate(task, state, ClientUpdate(0, 1, payload))
    plus = FedDistill(share_params=True)
    state = FedDistillState({"weight": torch.ones(2, 2)}, 0)
    plus.validate(task, state, ClientUpdate(0, 1, {"label_logits": torch.zeros(2, 2), "delta.weight": torch.ones(2, 2)}))
    with pytest.raises(PayloadError, match="delta keys"):
        plus.validate(task, state, ClientUpdate(0, 1, {"label_logits": torch.zeros(2, 2)}))


@pytest.mark.parametrize("alg", [FedDistill(local=LOCAL), FedDistill(local=LOCAL, share_params=True)],
                         ids=["feddistill", "feddistill+"])
def test_executors_agree_and_batch(alg):
    archs = ["mlp:hidden=16"] if alg.share_params else ["mlp:hidden=16", "cnn:width=4,hidden=8"]
    task, parts = make_task(archs)
    jobs = round_two_jobs(alg, task, parts)  # round 2: a teacher and round-1 trackers in the client states
    ref = Sequential().run(alg, task, jobs)
    vec = Vectorized()
    got = vec.run(alg, task, jobs)
    assert vec.batched == len(jobs) and not vec.reasons
    with Parallel(workers=2) as par:
        exact = par.run(alg, task, jobs)
    for a, b, c in zip(ref, got, exact, strict=True):
        for other, tol in ((b, 1e-5), (c, 0.0)):
            for k, v in a.payload.items():
                torch.testing.assert_close(other.payload[k], v, atol=tol, rtol=0, msg=k)
            torch.testing.assert_close(other.client_state.tracker.sums, a.client_state.tracker.sums, atol=tol * 100,
                                       rtol=0)
            assert torch.equal(other.client_state.tracker.counts, a.client_state.tracker.counts)
        assert a.client_state.tracker.counts.sum() == 2 * 2 * len(parts[a.client_id]) + 4  # 2 rounds × 2 epochs + 1s
    if not alg.share_params:
        assert_same(ref, got, exact=False)


def test_learns_on_digits():
    from kdfl import config as config_mod
    from kdfl import experiment

    base = ["run.seed=0", "run.threads=1", "data.name=digits", "data.num_clients=6", "partition.name=dirichlet",
            "partition.alpha=0.5", "model.arch=mlp:hidden=64", "local.epochs=2", "local.batch_size=16",
            "local.lr=0.05", "local.momentum=0.9", "run.rounds=4", "algorithm.name=feddistill",
            "data.client_holdout=0.2", "run.client_eval_every=2"]
    recs = experiment.run(config_mod.load(None, base)).records
    assert "accuracy" not in recs[-1] and recs[-1]["client_accuracy_mean"] > 0.85
    recs = experiment.run(config_mod.load(None, [*base, "algorithm.share_params=true"])).records
    assert recs[-1]["accuracy"] > 0.85 and recs[-1]["accuracy"] > recs[0]["accuracy"]
