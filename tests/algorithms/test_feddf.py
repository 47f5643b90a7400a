"""FedDF: zero distillation equals FedAvg; drop-worst rule; learning with two architectures."""

import dataclasses

import torch
from helpers import blob_task
from torch import nn

from kdfl.algorithms import FedAvg, FedDF
from kdfl.algorithms.feddf import drop_worst, feddf_distill
from kdfl.simulation.engine import Engine, RunSettings
from kdfl.train import LocalSGD

LOCAL = LocalSGD(epochs=2, batch_size=16, lr=0.1)


def steps(n):
    return dataclasses.replace(feddf_distill(), steps=n)


def test_zero_distillation_steps_equals_fedavg():
    task, parts = blob_task()
    a = Engine(FedAvg(local=LOCAL), task, parts, RunSettings(rounds=2)).run().state.params
    b = Engine(FedDF(local=LOCAL, distill=steps(0)), task, parts, RunSettings(rounds=2)).run().state.params
    for k in a:
        assert torch.equal(a[k], b[k])


def test_drop_worst_rules():
    # below 1.2 x random guess (10 classes: 0.12) is dropped first
    assert drop_worst([0.5, 0.1, 0.6], 10) == [0, 2]
    # otherwise the 1.5-sigma rule on normalised accuracies (max set aside)
    # (with 8 teachers at 0.8: normalised 0.119 each, 0.045 for the outlier; cut = mean - 1.5 std = 0.071)
    assert drop_worst([0.8] * 8 + [0.3], 10) == list(range(8))
    # with few teachers the outlier inflates the std and survives (the rule's known masking effect)
    assert drop_worst([0.80, 0.81, 0.79, 0.80, 0.30], 10) == [0, 1, 2, 3, 4]
    assert drop_worst([0.8, 0.8, 0.8], 10) == [0, 1, 2]


def test_distillation_learns_with_two_architectures():
    task, parts = blob_task()

    def build(arch):
        hidden = 16 if arch == "small" else 32
        return nn.Sequential(nn.Linear(2, hidden), nn.ReLU(), nn.Linear(hidden, 3))

    task = dataclasses.replace(task, build_model=build, server_arch="small", client_archs=["small", "big"] * 2)
    hist = Engine(FedDF(local=LOCAL, distill=steps(100)), task, parts, RunSettings(rounds=3)).run()
    assert hist.summary["final_accuracy"] > 0.9
    protos = hist.state.protos
    assert set(protos) == {"small", "big"} and protos["big"]["0.weight"].shape == (32, 2)
