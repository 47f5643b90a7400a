"""Hand-computed FedAvg round and the baseline equivalences."""

import pytest
import torch
from helpers import blob_task, tiny_task

from kdfl.algorithms import FedAvg, FedAvgM, FedProx
from kdfl.simulation.engine import Engine, RunSettings
from kdfl.train import LocalSGD

ONE_STEP = LocalSGD(epochs=1, batch_size=8, lr=1.0)


def one_round(algorithm, task, parts, rounds=1):
    return Engine(algorithm, task, parts, RunSettings(rounds=rounds)).run()


def test_fedavg_one_round_by_hand():
    # W = 0 -> softmax = [0.5, 0.5]; grad of CE = (p - onehot(y)) x^T.
    # client 0 (1 sample, x=[1,0], y=0): grad [[-.5, 0], [.5, 0]] -> W0 = [[.5, 0], [-.5, 0]]
    # client 1 (3 samples, x=[0,2], y=1): grad [[0, 1], [0, -1]] -> W1 = [[0, -1], [0, 1]]
    # FedAvg weighted by examples (1 and 3): (W0 + 3 W1) / 4
    task, parts = tiny_task()
    hist = one_round(FedAvg(local=ONE_STEP), task, parts)
    expected = torch.tensor([[0.125, -0.75], [-0.125, 0.75]])
    torch.testing.assert_close(hist.state.params["weight"], expected)


def test_fedprox_mu0_equals_fedavg():
    task, parts = blob_task()
    local = LocalSGD(epochs=2, batch_size=16, lr=0.1)
    a = one_round(FedAvg(local=local), task, parts, rounds=2).state.params
    b = one_round(FedProx(local=local, mu=0.0), task, parts, rounds=2).state.params
    for k in a:
        assert torch.equal(a[k], b[k])


def test_fedprox_mu_pulls_towards_global():
    task, parts = blob_task()
    local = LocalSGD(epochs=3, batch_size=16, lr=0.2)
    init = FedAvg(local=local).init(task).params
    far = one_round(FedAvg(local=local), task, parts).state.params
    near = one_round(FedProx(local=local, mu=5.0), task, parts).state.params
    dist = lambda p: sum(((p[k] - init[k]) ** 2).sum() for k in p)  # noqa: E731
    assert dist(near) < dist(far)


def test_fedavgm_no_momentum_unit_lr_equals_fedavg():
    task, parts = blob_task()
    local = LocalSGD(epochs=1, batch_size=16, lr=0.1)
    a = one_round(FedAvg(local=local), task, parts, rounds=3).state.params
    b = one_round(FedAvgM(local=local, momentum=0.0, server_lr=1.0), task, parts, rounds=3).state.params
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-7)


def test_fedavgm_momentum_by_hand():
    # round 1: v = d1, w1 = w0 + lr*d1; round 2 uses v = m*d1 + d2. Check round 1 with lr=0.5.
    task, parts = tiny_task()
    hist = one_round(FedAvgM(local=ONE_STEP, momentum=0.9, server_lr=0.5), task, parts)
    expected = 0.5 * torch.tensor([[0.125, -0.75], [-0.125, 0.75]])
    torch.testing.assert_close(hist.state.params["weight"], expected)


def test_fedavg_learns_blobs():
    task, parts = blob_task()
    hist = one_round(FedAvg(local=LocalSGD(epochs=2, batch_size=16, lr=0.1)), task, parts, rounds=5)
    assert hist.summary["final_accuracy"] > 0.9


def test_bad_hyperparameters_rejected():
    with pytest.raises(Exception, match="mu"):
        FedProx(mu=-1)
    with pytest.raises(Exception, match="momentum"):
        FedAvgM(momentum=1.5)
