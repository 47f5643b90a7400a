"""FedSSD: credibility weights and the loss by hand, weight = 0 is FedAvg exactly, options, learning."""

from __future__ import annotations

import math

import pytest
import torch

from kdfl import config as config_mod
from kdfl import experiment
from kdfl.algorithms import ALGORITHMS, FedSSD
from kdfl.algorithms.fedssd import SSDLoss, class_credibility, sample_credibility, ssd_weights
from kdfl.losses import Batch, Outputs
from kdfl.types import KdflError

# two samples, three classes; labels 0 and 2
Y = torch.tensor([0, 2])
LOCAL = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 3.0]])
GLOBAL = torch.tensor([[math.log(6.0), 0.0, 0.0], [0.0, 0.0, math.log(30.0)]])  # p_g(y|x) = 3/4 and 15/16
S = [1 - math.sqrt(1 / 4), 1 - math.sqrt(1 / 16)]  # sample credibility: 1/2 and 3/4
CRED = torch.tensor([0.8, 0.1, 1.0])  # class credibility
# M = relu(1 · c · s − 0.1): class 1 falls under the threshold for both samples
M = [[0.5 * 0.8 - 0.1, 0.0, 0.5 * 1.0 - 0.1], [0.75 * 0.8 - 0.1, 0.0, 0.75 * 1.0 - 0.1]]  # [.3, 0, .4], [.5, 0, .65]
DIFF = [[math.log(6.0) - 2, -1.0, 0.0], [0.0, -1.0, math.log(30.0) - 3]]  # z_g − z
MSE = sum((M[i][k] * DIFF[i][k]) ** 2 for i in range(2) for k in range(3)) / 2
LSE = [math.log(math.e**2 + math.e + 1), math.log(1 + math.e + math.e**3)]
CE = ((LSE[0] - 2) + (LSE[1] - 3)) / 2
Q = [[6 / 8, 1 / 8, 1 / 8], [1 / 32, 1 / 32, 30 / 32]]
LOG_P = [[2 - LSE[0], 1 - LSE[0], -LSE[0]], [-LSE[1], 1 - LSE[1], 3 - LSE[1]]]
KL = sum(M[i][k] * Q[i][k] * (math.log(Q[i][k]) - LOG_P[i][k]) for i in range(2) for k in range(3)) / 2


def outputs(local=LOCAL, glob=GLOBAL):
    out = Outputs({"model": {"logits": local}, "global": {"logits": glob}}, {}, None)
    return out, Batch(torch.zeros(2, 1), Y, torch.arange(2))


def test_credibility_weights_by_hand():
    torch.testing.assert_close(sample_credibility(GLOBAL, Y), torch.tensor(S))
    torch.testing.assert_close(ssd_weights(GLOBAL, Y, CRED, 1.0, 0.1), torch.tensor(M))
    # m_max scales before the threshold
    torch.testing.assert_close(ssd_weights(GLOBAL, Y, CRED, 2.0, 0.1),
                               torch.tensor([[0.7, 0.0, 0.9], [1.1, 0.05, 1.4]]))


def test_class_credibility_by_hand():
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    pred = torch.tensor([0, 1, 1, 1, 2, 0])
    # rates j→k: row 0 [1/2, 1/2, 0], row 1 [0, 1, 0], row 2 [1/2, 0, 1/2]; class 3 has no samples
    # c_k = recall_k · (1 − max_{j≠k} rate[j, k])
    torch.testing.assert_close(class_credibility(pred, y, 4), torch.tensor([0.5 * 0.5, 1 * 0.5, 0.5 * 1, 0.0]))


def test_loss_by_hand():
    out, batch = outputs()
    consts = {"credibility": CRED}
    assert float(SSDLoss(weight=1.0)(out, batch, consts)) == pytest.approx(CE + MSE)
    assert float(SSDLoss(weight=0.3)(out, batch, consts)) == pytest.approx(CE + 0.3 * MSE)
    assert float(SSDLoss(weight=0.0)(out, batch, consts)) == pytest.approx(CE)
    assert float(SSDLoss(divergence="kl")(out, batch, consts)) == pytest.approx(CE + KL)
    # zero credibility: no distillation at all
    assert float(SSDLoss()(out, batch, {"credibility": torch.zeros(3)})) == pytest.approx(CE)


def test_weights_carry_no_gradient():
    z = LOCAL.clone().requires_grad_(True)
    zg = GLOBAL.clone().requires_grad_(True)
    out, batch = outputs(z, zg)
    SSDLoss()(out, batch, {"credibility": CRED}).backward()
    assert zg.grad is None or torch.count_nonzero(zg.grad) == 0
    m = torch.tensor(M)
    expected = (torch.softmax(LOCAL, -1) - torch.nn.functional.one_hot(Y, 3)) / 2 - m * m * (GLOBAL - LOCAL)
    torch.testing.assert_close(z.grad, expected)


def test_defaults_and_bad_options():
    assert ALGORITHMS["fedssd"] is FedSSD
    alg = FedSSD()
    assert (alg.weight, alg.m_max, alg.threshold, alg.divergence) == (1.0, 1.0, 0.1, "mse")
    assert alg.loss() == SSDLoss(1.0, 1.0, 0.1, "mse", 1.0, False)
    for bad, match in [({"weight": -1.0}, "weight"), ({"m_max": -1.0}, "m_max"),
                       ({"divergence": "l1"}, "divergence"), ({"temperature": 0.0}, "temperature")]:
        with pytest.raises(KdflError, match=match):
            FedSSD(**bad)


BASE = ["run.seed=3", "run.threads=1", "data.name=digits", "data.num_clients=4", "data.val_size=60",
        "partition.name=dirichlet", "partition.alpha=0.5", "model.arch=mlp:hidden=32", "local.epochs=1",
        "local.batch_size=32", "local.lr=0.05", "local.momentum=0.5"]


def run(*extra: str):
    return experiment.run(config_mod.load(None, [*BASE, *extra]))


def test_weight_zero_round_equals_fedavg_exactly():
    ref = run("algorithm.name=fedavg", "run.rounds=2").state.params
    got = run("algorithm.name=fedssd", "algorithm.weight=0", "run.rounds=2").state.params
    assert ref.keys() == got.keys()
    for k, v in ref.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=0, msg=k)
    # the term is active (early on c · s rarely passes the 0.1 threshold at m_max = 1) and changes the round
    ssd = run("algorithm.name=fedssd", "algorithm.m_max=10", "algorithm.threshold=0", "run.rounds=2").state.params
    assert any(not torch.equal(ssd[k], v) for k, v in ref.items())


def test_learns_on_digits():
    hist = run("algorithm.name=fedssd", "run.rounds=4", "local.epochs=2", "local.lr=0.1")
    accs = [r["accuracy"] for r in hist.records]
    assert hist.records[-1]["failed"] == [] and hist.records[-1]["rejected"] == []
    assert accs[-1] > 0.75 and accs[-1] > accs[0], accs
    assert 0 <= hist.records[-1]["credibility_mean"] <= 1


def test_class_credibility_needs_the_validation_slice():
    no_val = [k for k in BASE if not k.startswith("data.val_size")]
    with pytest.raises(KdflError, match=r"set data.val_size > 0 .* algorithm.class_level = false"):
        experiment.run(config_mod.load(None, [*no_val, "algorithm.name=fedssd", "run.rounds=1"]))
    # explicitly off: every class credibility is 1 (only the sample level selects)
    off = experiment.run(config_mod.load(None, [*no_val, "algorithm.name=fedssd", "algorithm.class_level=false",
                                                "run.rounds=1"]))
    assert off.records[-1]["credibility_mean"] == 1.0
    # with the slice the class level is on: the credibility of a 1-round model is below 1
    assert run("algorithm.name=fedssd", "run.rounds=1").records[-1]["credibility_mean"] < 1.0
