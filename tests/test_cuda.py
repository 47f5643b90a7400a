"""The accelerator path: every algorithm, executor, server loop and evaluation with
``run.device = "cuda"``.

Skipped without a CUDA device (CI has none); run on a GPU machine with
``python -m pytest -q tests/test_cuda.py``. What is checked:

- every registered algorithm runs two rounds on the GPU under every executor (the
  default ``batched`` included; ``parallel``'s worker processes each open the device), with no failed or rejected client, finite metrics, and its global
  model (where it has one) left on the device;
- the GPU's numbers agree with the CPU's for FedAvg (same seed: same sampling, data order
  and initial weights; only the kernels differ, so within float tolerance);
- the vectorized executor's clients on the GPU equal the sequential ones there.
"""

from __future__ import annotations

import math

import pytest
import torch

from kdfl import config as config_mod
from kdfl import experiment
from kdfl.algorithms import ALGORITHMS, nested_fields, resolve

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run.device = 'cuda')")

BASE = [
    "run.seed=3", "data.name=digits", "data.num_clients=6", "data.proxy=holdout", "data.proxy_size=40",
    "data.val_size=20", "partition.name=dirichlet", "partition.alpha=1.0", "model.arch=cnn:width=4,hidden=16",
    "local.epochs=1", "local.batch_size=32", "local.lr=0.05", "local.momentum=0.5", "data.client_holdout=0.2",
    "run.rounds=2",
]


def cfg_of(name: str, *extra: str) -> config_mod.Config:
    cls = resolve(name)
    out = [*BASE, f"algorithm.name={name}"]
    if "distill" in nested_fields(cls):
        out.append("algorithm.distill.steps=5")
    return config_mod.load(None, [*out, *getattr(cls, "conformance_overrides", ()), *extra])


def finite(record: dict) -> bool:
    return all(math.isfinite(v) for v in record.values() if isinstance(v, float))


@pytest.mark.parametrize("executor", ["sequential", "vectorized", "batched", "auto", "parallel:workers=2"])
@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_every_algorithm_runs_on_the_gpu(name, executor):
    hist = experiment.run(cfg_of(name, "run.device=cuda", f"run.executor={executor}"))
    for rec in hist.records:
        assert rec["failed"] == [] and rec["rejected"] == [], rec
        assert finite(rec), rec
    for k, v in (hist.state.params or {}).items():
        assert v.device.type == "cuda", k
    assert hist.clients["client_eval"]["clients"]


def test_fedavg_on_the_gpu_equals_the_cpu():
    cpu = experiment.run(cfg_of("fedavg", "run.device=cpu"))
    gpu = experiment.run(cfg_of("fedavg", "run.device=cuda"))
    for k, v in cpu.state.params.items():
        torch.testing.assert_close(gpu.state.params[k].cpu(), v, rtol=1e-3, atol=1e-4, msg=k)
    assert abs(cpu.summary["final_accuracy"] - gpu.summary["final_accuracy"]) <= 0.02


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "fedema_distill", "fml"])
def test_vectorized_equals_sequential_on_the_gpu(name):
    seq = experiment.run(cfg_of(name, "run.device=cuda", "run.executor=sequential"))
    vec = experiment.run(cfg_of(name, "run.device=cuda", "run.executor=vectorized"))
    for k, v in (seq.state.params or {}).items():
        torch.testing.assert_close(vec.state.params[k], v, rtol=1e-3, atol=1e-4, msg=k)
    assert seq.records[-1].get("accuracy") == pytest.approx(vec.records[-1].get("accuracy"), abs=0.02)


def test_a_diverging_client_fails_on_the_gpu_as_on_the_cpu():
    # the GPU path reads the loss once per phase instead of once per step: same clients fail
    cpu = experiment.run(cfg_of("fedavg", "run.device=cpu", "local.lr=1e12", "run.rounds=1"))
    gpu = experiment.run(cfg_of("fedavg", "run.device=cuda", "local.lr=1e12", "run.rounds=1"))
    assert cpu.records[0]["failed"] and gpu.records[0]["failed"] == cpu.records[0]["failed"]
