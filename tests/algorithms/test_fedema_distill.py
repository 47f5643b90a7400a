"""FedEMA-Distill: hand-checked teacher and EMA step, validation, learning."""

import dataclasses
import math

import pytest
import torch
from helpers import blob_task, tiny_task

from kdfl.algorithms import FedEMADistill
from kdfl.algorithms.fedema_distill import FedEMAState
from kdfl.algorithms.kit.logits import to_probs, to_space
from kdfl.simulation.engine import Engine, RunSettings
from kdfl.train import LocalSGD
from kdfl.types import ClientUpdate, KdflError, PayloadError


def settings(**kw):
    """FedEMA-Distill's default distillation loop with some keys changed."""
    return dataclasses.replace(FedEMADistill().distill, **kw)


def upd(cid, logits, n=1):
    return ClientUpdate(cid, n, {"logits": torch.tensor(logits, dtype=torch.float32)})


def test_teacher_median_of_raw_logits_by_hand():
    alg = FedEMADistill(space="logits", aggregator="median", distill=settings(temperature=1.0), class_weighting=False)
    q = alg.teacher([upd(0, [[0.0, 0.0]]), upd(1, [[1.0, 0.0]]), upd(2, [[50.0, 0.0]])])
    # median of (0, 1, 50) = 1 and of (0, 0, 0) = 0 -> softmax([1, 0])
    e = math.e
    torch.testing.assert_close(q, torch.tensor([[e / (e + 1), 1 / (e + 1)]]))


def test_teacher_median_of_probabilities_by_hand():
    alg = FedEMADistill(space="probs", aggregator="median", distill=settings(temperature=1.0), class_weighting=False)
    # softmax rows: [.5, .5], [.75, .25], [.2, .8]; medians .5 and .5 -> [.5, .5]
    q = alg.teacher([upd(0, [[0.0, 0.0]]), upd(1, [[math.log(3), 0.0]]), upd(2, [[0.0, math.log(4)]])])
    torch.testing.assert_close(q, torch.tensor([[0.5, 0.5]]))


def test_teacher_mean_in_probs_space_with_temperature():
    alg = FedEMADistill(space="probs", aggregator="mean", distill=settings(temperature=2.0), class_weighting=False)
    # T=2: softmax([2 ln3, 0]/2) = [.75, .25]; softmax([0, 0]) = [.5, .5]; weights 1 and 3
    q = alg.teacher([upd(0, [[2 * math.log(3), 0.0]], n=1), upd(1, [[0.0, 0.0]], n=3)])
    torch.testing.assert_close(q, torch.tensor([[0.5625, 0.4375]]))


def test_spaces_are_shift_invariant_where_they_should_be():
    z = torch.randn(3, 5, 4)
    for space in ("centered", "standardized", "logprobs", "probs"):
        torch.testing.assert_close(to_space(z + 7.0, space, 2.0), to_space(z, space, 2.0), atol=1e-5, rtol=1e-5)
    q = to_probs(torch.tensor([[0.0, 0.0, 0.0]]), "probs", 1.0)  # a zero aggregate gives uniform
    torch.testing.assert_close(q, torch.full((1, 3), 1 / 3))


def test_ema_step_by_hand():
    task, _ = tiny_task()
    alg = FedEMADistill(distill=settings(steps=0), ema_decay=0.9, ema_warmup=True, class_weighting=False)
    ema = {"weight": torch.ones(2, 2)}
    student = {"weight": torch.zeros(2, 2)}
    state = FedEMAState(ema, 0, student)
    new, _ = alg.server_update(task, state, [upd(c, [[0.0, 1.0]] * 4) for c in range(2)])
    # round 1 with warm-up: beta_1 = min(0.9, 2/11) = 2/11; theta_e = 2/11 * 1 + 9/11 * 0
    torch.testing.assert_close(new.params["weight"], torch.full((2, 2), 2 / 11))
    no_warm, _ = dataclasses.replace(alg, ema_warmup=False).server_update(task, state, [upd(0, [[0.0, 1.0]] * 4)])
    torch.testing.assert_close(no_warm.params["weight"], torch.full((2, 2), 0.9))


def test_ema_step_after_distillation_by_hand():
    task, _ = tiny_task()
    alg = FedEMADistill(distill=settings(steps=5, temperature=1.0), ema_decay=0.5, ema_warmup=False, space="logits",
                        class_weighting=False)
    state = alg.init(task)
    new, metrics = alg.server_update(task, state, [upd(0, [[3.0, 0.0]] * 4), upd(1, [[3.0, 0.0]] * 4)])
    assert metrics["distill_steps"] == 5 and metrics["teacher_confidence"] > 0.9
    theta_s = new.student["weight"]
    assert not torch.equal(theta_s, state.params["weight"])  # the student moved
    torch.testing.assert_close(new.params["weight"], 0.5 * state.params["weight"] + 0.5 * theta_s)
    # the student moved towards the teacher: class 0 now has the larger logit on every proxy row
    logits = task.proxy @ theta_s.T
    assert (logits[:, 0] > logits[:, 1]).all()


def test_validate_rejects_malformed_logits():
    task, _ = tiny_task()
    alg = FedEMADistill(class_weighting=False)
    state = alg.init(task)
    alg.validate(task, state, upd(0, [[0.0, 1.0]] * 4))
    with pytest.raises(PayloadError, match=r"expected \(4, 2\)"):
        alg.validate(task, state, upd(0, [[0.0, 1.0]] * 3))
    with pytest.raises(PayloadError, match="no 'logits'"):
        alg.validate(task, state, ClientUpdate(0, 1, {}))


def test_bad_options_rejected():
    with pytest.raises(KdflError, match="space"):
        FedEMADistill(space="softmax")
    with pytest.raises(KdflError, match="trimmed_mean|beta"):
        FedEMADistill(aggregator="trimmed_mean:beta=0.7")


@dataclasses.dataclass(frozen=True)
class OneBadClient(FedEMADistill):
    def client_program(self, task, downlink, client):
        program = super().client_program(task, downlink, client)
        if client.id == 0:  # logits on one proxy row too few
            logits = program.upload[0]
            program = dataclasses.replace(program, upload=[dataclasses.replace(logits, x=logits.x[:-1])])
        return program


def test_malformed_payload_rejected_round_completes(caplog):
    task, parts = blob_task()
    alg = OneBadClient(local=LocalSGD(epochs=2, batch_size=16, lr=0.1), distill=settings(steps=20))
    hist = Engine(alg, task, parts, RunSettings(rounds=1)).run()
    assert hist.records[0]["rejected"] == [0]
    assert "expected (60, 3)" in caplog.text  # the reason is logged
    assert hist.records[0]["accuracy"] > 0


def test_learns_on_blobs_homogeneous_and_heterogeneous():
    task, parts = blob_task()
    local = LocalSGD(epochs=3, batch_size=16, lr=0.1)
    hist = Engine(FedEMADistill(local=local, distill=settings(steps=100)), task, parts, RunSettings(rounds=4)).run()
    assert hist.summary["final_accuracy"] > 0.9
    # heterogeneous: every client keeps its own model (downlink none)
    hist = Engine(FedEMADistill(local=local, distill=settings(steps=100), downlink="none"), task, parts,
                  RunSettings(rounds=3)).run()
    assert hist.summary["final_accuracy"] > 0.9
    assert hist.records[-1]["downlink_bytes"] < 100  # nothing model-sized went down


def test_class_weighted_median_by_hand():
    from kdfl.algorithms.kit.logits import class_shares, class_weighted_median

    # 4 clients, 1 sample, 2 classes. Column 0 values 1, 2, 3, 10; column 1 values 4, 3, 2, 1.
    x = torch.tensor([[[1.0, 4.0]], [[2.0, 3.0]], [[3.0, 2.0]], [[10.0, 1.0]]])
    counts = torch.tensor([[0, 10], [0, 10], [5, 5], [30, 0]])
    shares = class_shares(counts)  # class-0 shares 0, 0, .5, 1; class-1 shares 1, 1, .5, 0
    # column 0: sorted 1(0), 2(0), 3(.5), 10(1): half of 1.5 reached at 10
    # column 1: sorted 1(0), 2(.5), 3(1), 4(1): half of 2.5 reached at 3
    torch.testing.assert_close(class_weighted_median(x, shares), torch.tensor([[10.0, 3.0]]), atol=1e-4, rtol=0)


def test_class_weighting_needs_mean_or_median():
    with pytest.raises(KdflError, match="class_weighting"):
        FedEMADistill(class_weighting=True, aggregator="krum:f=1")


def test_class_weighted_trimmed_mean_by_hand():
    from kdfl.algorithms.kit.logits import class_weighted_mean, class_weighted_trimmed_mean

    x = torch.tensor([1.0, 2.0, 3.0, 10.0]).reshape(4, 1, 1)
    shares = torch.full((4, 1), 0.25, dtype=torch.float64)
    # beta = 0.25 drops exactly the lowest and the highest client: mean(2, 3)
    torch.testing.assert_close(class_weighted_trimmed_mean(x, shares, 0.25), torch.tensor([[2.5]]))
    # beta = 0.125 keeps half of each boundary client: (0.5*1 + 2 + 3 + 0.5*10) / 3
    torch.testing.assert_close(class_weighted_trimmed_mean(x, shares, 0.125), torch.tensor([[10.5 / 3]]))
    w = torch.tensor([[0.1], [0.2], [0.3], [0.4]], dtype=torch.float64)
    torch.testing.assert_close(class_weighted_trimmed_mean(x, w, 0.0), class_weighted_mean(x, w))


def test_validate_checks_label_counts_when_class_weighting():
    task, _ = tiny_task()
    alg = FedEMADistill(class_weighting=True)
    state = alg.init(task)
    good = ClientUpdate(0, 1, {"logits": torch.zeros(4, 2), "label_counts": torch.tensor([3, 1])})
    alg.validate(task, state, good)
    for bad in ({"logits": torch.zeros(4, 2)},
                {"logits": torch.zeros(4, 2), "label_counts": torch.tensor([3.0, 1.0])},
                {"logits": torch.zeros(4, 2), "label_counts": torch.tensor([-1, 1])}):
        with pytest.raises(PayloadError, match="label_counts"):
            alg.validate(task, state, ClientUpdate(0, 1, bad))
