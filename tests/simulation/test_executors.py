"""Fast executors against the sequential reference.

Tolerances: ``vectorized`` (and ``auto``, which may vectorize) must equal ``sequential``
within ``atol=1e-5`` on every payload tensor and on ``train_loss`` after the local
epochs below (observed: ~1e-7); ``parallel`` must be bit-identical (``torch.equal``) to
``sequential`` run with the same torch thread count (1 here: intra-op threading changes
the order of float sums, in any executor).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import pytest
import torch
from helpers import blob_task

from kdfl import models
from kdfl.algorithms import FedAvg, FedDF, FedEMADistill, FedProx
from kdfl.algorithms.feddf import feddf_distill
from kdfl.algorithms.kit.weights import init_params
from kdfl.algorithms.program import Custom, Data, LabelLogits, LabelStats, Phase, Tracked
from kdfl.losses import CrossEntropy
from kdfl.rng import derive
from kdfl.simulation.auto import Batched, prefers_vectorized
from kdfl.simulation.executors import DEFAULT_EXECUTOR, EXECUTORS, ClientFailure, Sequential, make_executor
from kdfl.simulation.parallel import Parallel, dumps, loads
from kdfl.simulation.vectorized import Vectorized
from kdfl.train import LocalSGD
from kdfl.types import Client, ServerState, Task, TensorData

ATOL = 1e-5
SIZES = [7, 13, 20, 3, 16, 16, 1, 0, 9]  # unequal, ragged last batches, one empty client
LOCAL = LocalSGD(epochs=2, batch_size=5, lr=0.1, momentum=0.9, weight_decay=1e-3)



def make_task(archs: list[str], sizes: list[int], shape: tuple[int, ...] = (1, 8, 8), classes: int = 5,
              seed: int = 0) -> tuple[Task, list[Client]]:
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    x, y = torch.randn(n, *shape, generator=g), torch.randint(0, classes, (n,), generator=g)
    data = TensorData(x, y)
    task = Task(
        train=data, test=data, proxy=torch.randn(12, *shape, generator=g), val=None, num_classes=classes,
        input_shape=shape, server_arch=archs[0], client_archs=[archs[i % len(archs)] for i in range(len(sizes))],
        build_model=functools.partial(models.build, input_shape=shape, num_classes=classes), seed=seed,
    )
    clients, start = [], 0
    for i, s in enumerate(sizes):
        clients.append(Client(i, data.subset(range(start, start + s)), task.client_archs[i], 1, derive(seed, "c", i)))
        start += s
    return task, clients


def jobs_of(alg, task, clients):
    # FedAvg-like algorithms refuse mixed-architecture tasks; their clients here share the server's
    state = ServerState(init_params(task)) if isinstance(alg, FedAvg) else alg.init(task)
    return [(c, alg.configure(task, state, c.info)) for c in clients]


def assert_close(ref, got, exact: bool = False) -> None:
    assert len(ref) == len(got)
    for a, b in zip(ref, got, strict=True):
        assert type(a) is type(b), (a, b)
        assert a.client_id == b.client_id
        if isinstance(a, ClientFailure):
            continue
        assert a.payload.keys() == b.payload.keys()
        assert a.metrics["steps"] == b.metrics["steps"]
        for k in a.payload:
            if exact:
                assert torch.equal(a.payload[k], b.payload[k]), k
            else:
                torch.testing.assert_close(b.payload[k], a.payload[k], atol=ATOL, rtol=0, msg=k)
        if exact:
            assert a.metrics == b.metrics
        else:
            assert abs(a.metrics["train_loss"] - b.metrics["train_loss"]) <= ATOL
        if a.client_state is not None:
            for k, v in a.client_state.models["model"].items():
                torch.testing.assert_close(b.client_state.models["model"][k], v, atol=ATOL, rtol=0)


ALGS = {
    "fedavg": FedAvg(local=LOCAL),
    "fedprox": FedProx(local=LOCAL, mu=0.5),
    "feddf": FedDF(local=LOCAL, distill=dataclasses.replace(feddf_distill(), steps=0)),  # stacked deltas
    "fedema_distill": FedEMADistill(local=LOCAL),
    "fedema_distill_stateful": FedEMADistill(local=LOCAL, downlink="none"),  # per-client weights
}


@pytest.mark.parametrize("alg", list(ALGS), ids=list(ALGS))
@pytest.mark.parametrize("arch,shape", [("mlp:hidden=16", (1, 8, 8)), ("cnn:width=4,hidden=16", (1, 40))])
def test_vectorized_equals_sequential(alg, arch, shape):
    task, clients = make_task([arch], SIZES, shape)
    jobs = jobs_of(ALGS[alg], task, clients)
    vec = Vectorized()
    assert_close(Sequential().run(ALGS[alg], task, jobs), vec.run(ALGS[alg], task, jobs))
    assert vec.batched == len(SIZES)


@pytest.mark.parametrize("alg", ["fedavg", "fedprox", "feddf", "fedema_distill_stateful"])
def test_default_executor_equals_sequential_and_batches_by_structure(alg):
    # the default: batched wherever the program batches and the model family pays on a CPU
    from kdfl import config

    assert config.DEFAULTS["run"]["executor"] == DEFAULT_EXECUTOR == "batched"
    task, clients = make_task(["mlp:hidden=16"], SIZES)
    jobs = jobs_of(ALGS[alg], task, clients)
    ex = make_executor(config.load(None, [])["run"]["executor"])
    assert isinstance(ex, Batched)
    assert_close(Sequential().run(ALGS[alg], task, jobs), ex.run(ALGS[alg], task, jobs))
    assert ex.batched == len(SIZES) and not ex.reasons


def test_default_executor_declines_by_structure_not_timing():
    # a 2-D CNN on 28x28 runs one client at a time on a CPU (bit-identical to sequential),
    # every time, with the reason recorded; an 8x8 one batches
    alg = ALGS["fedavg"]
    for shape, batched in (((1, 28, 28), 0), ((1, 8, 8), 4)):
        task, clients = make_task(["cnn:width=4,hidden=8"], [6, 5, 7, 3], shape)
        jobs = jobs_of(alg, task, clients)
        ref = Sequential().run(alg, task, jobs)
        for _ in range(2):  # a fresh executor and a warm one take the same path
            ex = Batched()
            got = ex.run(alg, task, jobs)
            assert ex.batched == batched
            if batched:
                assert_close(ref, got)
            else:
                assert_close(ref, got, exact=True)
                assert all("2-D convolutions" in why for why in ex.reasons.values()) and len(ex.reasons) == 4
    # mixed programs: a model of a declined family declines the whole program
    task, clients = make_task(["mlp:hidden=16", "cnn:width=4,hidden=8"], SIZES, (1, 28, 28))
    algs = ALGS["fedema_distill_stateful"]
    jobs = jobs_of(algs, task, clients)
    ex = Batched()
    assert_close(Sequential().run(algs, task, jobs), ex.run(algs, task, jobs))
    mlp = {c.id for c in clients if c.arch == "mlp:hidden=16"}
    assert set(ex.reasons) == {c.id for c in clients} - mlp and ex.batched == len(mlp)


@pytest.mark.parametrize("arch", ["resnet8:norm=gn,width=4", "resnet8:norm=bn,width=4"])
def test_vectorized_normalisation_layers(arch):
    # BatchNorm: per-client running statistics, clients bucketed by size (no padding in a BN batch)
    task, clients = make_task([arch], [8, 8, 8, 5, 5, 11, 4])
    alg = FedAvg(local=LocalSGD(epochs=1, batch_size=4, lr=0.05, momentum=0.5))
    jobs = jobs_of(alg, task, clients)
    vec = Vectorized()
    ref, got = Sequential().run(alg, task, jobs), vec.run(alg, task, jobs)
    assert_close(ref, got)
    assert vec.batched == (5 if "bn" in arch else 7)  # BN: sizes 8, 8, 8 and 5, 5 batched; 11 and 4 alone
    if "bn" in arch:  # the running statistics moved, per client
        key = "delta.bn1.running_mean"
        assert not torch.equal(got[0].payload[key], got[3].payload[key])


def test_vectorized_chunks_and_mixed_architectures():
    task, clients = make_task(["mlp:hidden=16", "mlp:hidden=8"], SIZES * 2)
    alg = FedEMADistill(local=LOCAL, downlink="none")
    jobs = jobs_of(alg, task, clients)
    vec = Vectorized(max_chunk=3)
    assert_close(Sequential().run(alg, task, jobs), vec.run(alg, task, jobs))
    assert vec.batched == 2 * len(SIZES)


@dataclass(frozen=True)
class Hostile:
    """Cross-entropy with data-dependent control flow: vmap cannot run it."""

    def __call__(self, out, batch, consts):
        if float(out.logits().detach().sum()) > 1e9:
            raise AssertionError
        return torch.nn.functional.cross_entropy(out.logits(), batch.y)


def crash_client_2(client_id, models):
    if client_id == 2:
        raise RuntimeError("client 2 crashed")
    return {}


@dataclass(frozen=True)
class Fragile(FedAvg):
    """FedAvg whose client 2 fails while making its upload and whose loss cannot be vmapped when asked."""

    vmap_hostile: bool = False

    def loss(self):
        return Hostile() if self.vmap_hostile else super().loss()

    def client_program(self, task, downlink, client):
        program = super().client_program(task, downlink, client)
        return dataclasses.replace(program, upload=[*program.upload,
                                                    Custom(functools.partial(crash_client_2, client.id))])


@pytest.mark.parametrize("hostile", [False, True])
def test_vectorized_isolates_failures(hostile):
    task, clients = make_task(["mlp:hidden=8"], SIZES)
    clients[5].data.x[0, 0, 0, 0] = float("nan")  # diverges: local_train raises on a NaN loss
    alg = Fragile(local=LOCAL, vmap_hostile=hostile)
    jobs = jobs_of(alg, task, clients)
    ref, got = Sequential().run(alg, task, jobs), Vectorized().run(alg, task, jobs)
    assert [type(r) for r in got] == [type(r) for r in ref]
    assert {r.client_id for r in got if isinstance(r, ClientFailure)} == {2, 5}
    assert_close(ref, got)


@dataclass(frozen=True)
class Declined(FedAvg):
    def client_program(self, task, downlink, client):
        return dataclasses.replace(super().client_program(task, downlink, client), batchable="draws noise")


def test_vectorized_falls_back_with_a_reason():
    task, clients = make_task(["mlp:hidden=8"], SIZES[:4])
    adam = FedAvg(local=LocalSGD(epochs=1, batch_size=4, optimizer="adam"))
    jobs = jobs_of(adam, task, clients)
    vec = Vectorized()
    assert_close(Sequential().run(adam, task, jobs), vec.run(adam, task, jobs), exact=True)
    assert vec.batched == 0 and all("adam" in why for why in vec.reasons.values())

    declined = Declined(local=LOCAL)  # a program that says it must not be batched
    jobs = jobs_of(declined, task, clients)
    assert_close(Sequential().run(declined, task, jobs), vec.run(declined, task, jobs), exact=True)
    assert vec.batched == 0 and set(vec.reasons.values()) == {"draws noise"}


def test_serialisation_roundtrip():
    obj = {"a": [torch.arange(5), torch.zeros(0), torch.tensor(3.5)], "b": torch.ones(2, 3, dtype=torch.bool)}
    obj["c"] = obj["a"][0]  # shared tensors stay shared once
    out = loads(dumps(obj))
    assert torch.equal(out["a"][0], obj["a"][0]) and out["a"][1].shape == (0,) and out["b"].dtype == torch.bool
    assert out["a"][2].item() == 3.5 and out["c"] is out["a"][0]


def test_registry():
    for name in ("sequential", "vectorized", "batched", "parallel", "auto"):
        assert name in EXECUTORS and make_executor(name).name == name


def test_parallel_falls_back_for_an_unpicklable_task():
    task, parts = blob_task(num_clients=3)  # build_model is a local function
    clients = [Client(i, task.train.subset(p), "mlp", 1, derive(0, i)) for i, p in enumerate(parts)]
    alg = FedAvg(local=LOCAL)
    jobs = jobs_of(alg, task, clients)
    with Parallel(workers=2) as ex:
        assert_close(Sequential().run(alg, task, jobs), ex.run(alg, task, jobs), exact=True)


@pytest.fixture(scope="module")
def pool_task():
    """One pool for the module: the task is shipped once, when the pool starts."""
    task, clients = make_task(["mlp:hidden=16", "cnn:width=4,hidden=8"], SIZES * 2)
    ex = Parallel(workers=2)
    assert ex.start(task)
    yield task, clients, ex
    ex.close()


@pytest.mark.parametrize("alg", ["fedavg", "fedprox", "fedema_distill_stateful"])
def test_parallel_is_bit_identical(pool_task, alg):
    task, clients, ex = pool_task
    algorithm = ALGS[alg]
    if alg != "fedema_distill_stateful":
        clients = [c for c in clients if c.arch == task.server_arch]
    jobs = jobs_of(algorithm, task, clients)
    assert_close(Sequential().run(algorithm, task, jobs), ex.run(algorithm, task, jobs), exact=True)


def test_parallel_isolates_failures(pool_task):
    task, clients, ex = pool_task
    clients = [c for c in clients if c.arch == task.server_arch]
    alg = Fragile(local=LOCAL)
    jobs = jobs_of(alg, task, clients)
    got = ex.run(alg, task, jobs)
    assert {r.client_id for r in got if isinstance(r, ClientFailure)} == {2}
    assert_close(Sequential().run(alg, task, jobs), got, exact=True)


def test_auto_equals_sequential(pool_task):
    task, clients, _ = pool_task
    alg = ALGS["fedema_distill_stateful"]
    jobs = jobs_of(alg, task, clients)
    ref = Sequential().run(alg, task, jobs)
    auto = make_executor("auto")
    assert_close(ref, auto.local.run(alg, task, jobs))  # in-process choice: batched
    assert auto.local._prefers == {("mlp:hidden=16", "cpu", (1, 8, 8)): True,
                                   ("cnn:width=4,hidden=8", "cpu", (1, 8, 8)): True}
    cnn28 = models.build("cnn", (1, 28, 28), 10)
    assert not prefers_vectorized(cnn28, "cpu", (1, 28, 28)) and prefers_vectorized(cnn28, "cuda", (1, 28, 28))
    auto.parallel = pool_task[2]  # reuse the module's pool instead of starting another one
    auto.mode[(("cnn:width=4,hidden=8", "mlp:hidden=16"), "cpu")] = "try"  # force the pool trial
    assert_close(ref, auto.run(alg, task, jobs))
    assert auto.mode[(("cnn:width=4,hidden=8", "mlp:hidden=16"), "cpu")] in ("local", "parallel")
    assert_close(ref, auto.run(alg, task, jobs))


def keep_train_tracker(models, kept):
    from kdfl.algorithms.feddistill import FedDistillClientState

    return FedDistillClientState(kept.models, models.tracked["train"])


@dataclass(frozen=True)
class Tracking(FedAvg):
    """FedAvg plus per-label logit tracking in two phases: labelled public rows (a length per
    client that orders the clients differently from their private data, so the vectorized
    executor reorders them between phases) and the private data (ragged batches, an empty
    client); both trackers uploaded (one on top of per-client start values) and kept."""

    def client_program(self, task, downlink, client):
        program = super().client_program(task, downlink, client)
        n, c = 3 + 4 * (client.id % 4), task.num_classes
        track = LabelLogits(c)
        phases = [Phase(CrossEntropy(), LOCAL, data=Data(task.train.x[:n], task.train.y[:n]), name="public",
                        track=track),
                  Phase(CrossEntropy(), LOCAL, track=track)]
        start = LabelStats(torch.full((c, c), float(client.id), dtype=torch.float64), torch.ones(c, dtype=torch.long))
        return dataclasses.replace(program, phases=phases, keep=("model",), keep_state=keep_train_tracker, upload=[
            *program.upload, Tracked("public", key="public_logits", counts_key="public_counts"),
            Tracked("train", start=start)])


@pytest.mark.parametrize("arch", ["mlp:hidden=16", "cnn:width=4,hidden=16"])
def test_tracked_statistics_equal_across_executors(arch):
    task, clients = make_task([arch], SIZES)
    alg = Tracking(local=LOCAL)
    jobs = jobs_of(alg, task, clients)
    ref = Sequential().run(alg, task, jobs)
    vec = Vectorized()
    got = vec.run(alg, task, jobs)
    assert vec.batched == len(SIZES) and not vec.reasons
    assert_close(ref, got)  # every payload entry (tracked averages and counts too) within 1e-5
    for a, b in zip(ref, got, strict=True):
        assert torch.equal(a.payload["label_counts"], b.payload["label_counts"])
        assert torch.equal(a.payload["public_counts"], b.payload["public_counts"])
        torch.testing.assert_close(b.client_state.tracker.sums, a.client_state.tracker.sums, atol=1e-4, rtol=0)
        assert int(a.payload["public_counts"].sum()) == 2 * (3 + 4 * (a.client_id % 4))  # 2 epochs
        assert int(a.payload["label_counts"].sum()) == 2 * SIZES[a.client_id] + task.num_classes  # + start's ones
    if arch.startswith("mlp"):  # the reference runner in worker processes: bit for bit (one pool start)
        with Parallel(workers=2) as ex:
            assert_close(ref, ex.run(alg, task, jobs), exact=True)


def test_batched_templates_pool_1d_exactly_as_the_model():
    # the vectorized executor's 1-D max-pools (a reshape and a max over the last axis):
    # the same outputs and gradients as nn.MaxPool1d, ties included (zeros after ReLU)
    import copy

    from torch.func import functional_call, grad, vmap

    from kdfl.simulation.vectorized import _fast_pools, _MaxPoolLastAxis

    model = models.build("cnn:width=4,hidden=8", (1, 41), 5)  # odd length: the last column is dropped
    fast = _fast_pools(copy.deepcopy(model))
    assert sum(isinstance(m, _MaxPoolLastAxis) for m in fast.modules()) == 2
    assert not any(isinstance(m, torch.nn.MaxPool1d) for m in fast.modules())
    params = {k: v.detach().unsqueeze(0).repeat(3, *[1] * v.dim()) for k, v in model.named_parameters()}
    x = torch.randn(3, 6, 1, 41).relu()  # (clients, batch, ...): many exact zeros

    def loss(m):
        return lambda p, xb: functional_call(m, p, (xb,)).square().sum()

    ref, got = vmap(grad(loss(model)))(params, x), vmap(grad(loss(fast)))(params, x)
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    assert torch.equal(model(x[0]), fast(x[0]))
