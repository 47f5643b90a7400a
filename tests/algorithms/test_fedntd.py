"""FedNTD: the not-true KL by hand, beta = 0 is FedAvg exactly, options, learning."""

from __future__ import annotations

import math

import pytest
import torch

from kdfl import config as config_mod
from kdfl import experiment
from kdfl.algorithms import ALGORITHMS, FedNTD
from kdfl.algorithms.fedntd import NTDLoss, not_true, ntd_kl
from kdfl.losses import Batch, Outputs
from kdfl.types import KdflError

# two samples, three classes; labels 0 and 2
Y = torch.tensor([0, 2])
LOCAL = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 3.0]])  # not-true: [1, 0] and [0, 1]
GLOBAL = torch.tensor([[5.0, 0.0, 0.0], [math.log(3.0), 0.0, 9.0]])  # not-true: [0, 0] and [ln 3, 0]
LSE = math.log(math.e + 1)  # log(e^1 + e^0)
# q̃_g: [1/2, 1/2] and [3/4, 1/4]; log p̃_l: [1 - LSE, -LSE] and [-LSE, 1 - LSE]
KL0 = 0.5 * (math.log(0.5) - (1 - LSE)) + 0.5 * (math.log(0.5) + LSE)
KL1 = 0.75 * (math.log(0.75) + LSE) + 0.25 * (math.log(0.25) - (1 - LSE))
KL = (KL0 + KL1) / 2
CE = ((math.log(math.e**2 + math.e + 1) - 2) + (math.log(1 + math.e + math.e**3) - 3)) / 2


def outputs(local=LOCAL, glob=GLOBAL):
    return Outputs({"model": {"logits": local}, "global": {"logits": glob}}, {}, None), Batch(torch.zeros(2, 1), Y,
                                                                                              torch.arange(2))


def test_not_true_drops_the_label_column():
    torch.testing.assert_close(not_true(LOCAL, Y), torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    torch.testing.assert_close(not_true(GLOBAL, Y), torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]]))


def test_not_true_kl_by_hand():
    assert KL0 == pytest.approx(math.log(0.5) + LSE - 0.5)
    assert float(ntd_kl(LOCAL, GLOBAL, Y, 1.0)) == pytest.approx(KL)
    out, batch = outputs()
    assert float(NTDLoss(beta=1.0)(out, batch, {})) == pytest.approx(CE + KL)
    assert float(NTDLoss(beta=0.3)(out, batch, {})) == pytest.approx(CE + 0.3 * KL)
    assert float(NTDLoss(beta=0.0)(out, batch, {})) == pytest.approx(CE)
    # the true-class logits do not matter (the teacher's 5 and 9, the student's 2 and 3)
    moved = outputs(LOCAL + torch.tensor([[7.0, 0, 0], [0, 0, -4.0]]), GLOBAL * torch.tensor([[0.0, 1, 1], [1, 1, 0]]))
    assert float(ntd_kl(moved[0].logits("model"), moved[0].logits("global"), Y, 1.0)) == pytest.approx(KL)


def test_temperature_and_t2_against_a_masking_reference():
    t = 2.0
    keep = torch.ones(2, 3, dtype=torch.bool)
    keep[torch.arange(2), Y] = False  # the official code's refine_as_not_true, by boolean indexing
    ref = torch.nn.functional.kl_div(torch.log_softmax(LOCAL[keep].view(2, 2) / t, -1),
                                     torch.softmax(GLOBAL[keep].view(2, 2) / t, -1), reduction="batchmean")
    assert float(ntd_kl(LOCAL, GLOBAL, Y, t)) == pytest.approx(float(ref))
    out, batch = outputs()
    assert float(NTDLoss(1.0, t, t2=False)(out, batch, {})) == pytest.approx(CE + float(ref))
    # the default: the official NTD_Loss multiplies by tau squared
    assert float(NTDLoss(1.0, t)(out, batch, {})) == pytest.approx(CE + t * t * float(ref))


def test_defaults_and_bad_options():
    assert ALGORITHMS["fedntd"] is FedNTD
    alg = FedNTD()
    # the official config/fedntd.json (tau = beta = 1) and criterion.py (tau^2 · KL)
    assert (alg.beta, alg.temperature, alg.t2) == (1.0, 1.0, True)
    assert alg.loss() == NTDLoss(1.0, 1.0, True)
    with pytest.raises(KdflError, match="beta"):
        FedNTD(beta=-1.0)
    with pytest.raises(KdflError, match="temperature"):
        FedNTD(temperature=0.0)


BASE = ["run.seed=3", "run.threads=1", "data.name=digits", "data.num_clients=4", "data.val_size=20",
        "partition.name=dirichlet", "partition.alpha=0.5", "model.arch=mlp:hidden=32", "local.epochs=1",
        "local.batch_size=32", "local.lr=0.05", "local.momentum=0.5"]


def run(*extra: str):
    return experiment.run(config_mod.load(None, [*BASE, *extra]))


def test_beta_zero_round_equals_fedavg_exactly():
    ref = run("algorithm.name=fedavg", "run.rounds=2").state.params
    got = run("algorithm.name=fedntd", "algorithm.beta=0", "run.rounds=2").state.params
    assert ref.keys() == got.keys()
    for k, v in ref.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=0, msg=k)
    ntd = run("algorithm.name=fedntd", "run.rounds=2").state.params  # beta = 1 changes the round
    assert any(not torch.equal(ntd[k], v) for k, v in ref.items())


def test_learns_on_digits():
    hist = run("algorithm.name=fedntd", "run.rounds=4", "local.epochs=2", "local.lr=0.1")
    accs = [r["accuracy"] for r in hist.records]
    assert hist.records[-1]["failed"] == [] and hist.records[-1]["rejected"] == []
    assert accs[-1] > 0.75 and accs[-1] > accs[0], accs
