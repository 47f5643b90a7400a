"""The pieces that make the executors fast: reused scratch models, stacked deltas,
result files in /dev/shm, and ``auto``'s background pool start."""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass

import pytest
import torch
from test_executors import LOCAL, SIZES, assert_close, jobs_of, make_task

from kdfl.algorithms import FedAvg
from kdfl.algorithms.program import Custom, Delta, run_client
from kdfl.simulation import parallel as par
from kdfl.simulation.auto import Auto
from kdfl.simulation.executors import Sequential
from kdfl.simulation.vectorized import Vectorized
from kdfl.types import KdflError


def test_run_program_reuses_scratch_models():
    task, clients = make_task(["mlp:hidden=16"], SIZES[:3])
    alg = FedAvg(local=LOCAL)
    jobs = jobs_of(alg, task, clients)
    first = run_client(alg, task, jobs[0][1], clients[0])
    pooled = task._scratch["mlp:hidden=16"]
    assert len(pooled) == 1
    model = pooled[0]
    second = run_client(alg, task, jobs[1][1], clients[1])
    assert task._scratch["mlp:hidden=16"] == [model]  # borrowed and given back
    assert all(p.grad is None for p in model.parameters())
    # reuse changes nothing: the first client again gives the same update, and the
    # payloads are copies, which later training into the same scratch model leaves alone
    again = run_client(alg, task, jobs[0][1], clients[0])
    for k in first.payload:
        assert torch.equal(first.payload[k], again.payload[k])
        assert first.payload[k].data_ptr() != second.payload[k].data_ptr()


def test_scratch_models_do_not_travel_with_the_task():
    import pickle

    task, clients = make_task(["mlp:hidden=16"], SIZES[:2])
    run_client(FedAvg(local=LOCAL), task, jobs_of(FedAvg(local=LOCAL), task, clients)[0][1], clients[0])
    assert task._scratch and pickle.loads(pickle.dumps(task))._scratch == {}


def test_stacked_deltas_equal_one_delta_per_client():
    task, clients = make_task(["mlp:hidden=16"], SIZES[:4])
    models = [task.new_model("mlp:hidden=16", seed=i) for i in range(4)]
    weights = [{k: v + 0.1 * i for k, v in models[0].state_dict().items()} for i in range(4)]
    stacked = {k: torch.stack([m.state_dict()[k] for m in models]) for k in weights[0]}
    for ws in (weights, [weights[0]] * 4):  # per-client starting weights, and one shared object
        uploads = [Delta(w) for w in ws]
        got = Delta.make_stacked(uploads, stacked)
        for up, m, payload in zip(uploads, models, got, strict=True):
            ref = up.make({"model": m})
            assert payload.keys() == ref.keys() and all(torch.equal(payload[k], ref[k]) for k in ref)


def mark(models):
    return {"marked": torch.ones(1)}


def test_per_client_uploads_run_beside_stacked_deltas():
    @dataclass(frozen=True)
    class Marked(FedAvg):
        def client_program(self, task, downlink, client):
            program = super().client_program(task, downlink, client)
            return dataclasses.replace(program, upload=[*program.upload, Custom(mark)])

    task, clients = make_task(["mlp:hidden=16"], SIZES)
    alg = Marked(local=LOCAL)
    vec = Vectorized()
    got = vec.run(alg, task, jobs_of(alg, task, clients))
    assert vec.batched == len(SIZES) and all(torch.equal(u.payload["marked"], torch.ones(1)) for u in got)
    assert list(got[0].payload)[-1] == "marked"  # upload order kept


def test_large_results_come_back_through_a_shm_file(monkeypatch):
    if not os.path.isdir(par.SHM_DIR):
        pytest.skip("no /dev/shm on this machine")
    obj = {"big": torch.arange(300_000, dtype=torch.float32), "small": torch.tensor([1, 2], dtype=torch.int8),
           "half": torch.ones(3, 5, dtype=torch.float16), "empty": torch.zeros(0, 4)}
    obj["alias"] = obj["big"]
    before = set(os.listdir(par.SHM_DIR))
    blob = par.dumps(obj, shm=True)
    made = set(os.listdir(par.SHM_DIR)) - before
    assert len(made) == 1 and len(blob) < 10_000  # the tensors are in the file, not in the message
    out = par.loads(blob)
    assert not (set(os.listdir(par.SHM_DIR)) - before)  # unlinked once mapped
    for k in ("big", "small", "half", "empty"):
        assert out[k].dtype == obj[k].dtype and torch.equal(out[k], obj[k])
    assert out["alias"] is out["big"]
    out["big"][0] = -1.0  # a private mapping: writable
    # below the threshold, and without shm, the pipe carries the bytes
    assert not (set(os.listdir(par.SHM_DIR)) - before) and len(par.dumps(obj)) > 1_200_000
    monkeypatch.setattr(par, "SHM_DIR", "/nonexistent")
    assert torch.equal(par.loads(par.dumps(obj, shm=True))["big"], obj["big"])  # falls back to the pipe


def test_leftover_result_files_are_removed():
    if not os.path.isdir(par.SHM_DIR):
        pytest.skip("no /dev/shm on this machine")
    par.dumps({"x": torch.zeros(par.SHM_MIN_BYTES // 4 + 1)}, shm=True)  # written, never read
    mine = [f for f in os.listdir(par.SHM_DIR) if f.startswith(f"kdfl-par-{os.getpid()}-")]
    assert mine
    par.remove_shm_files([os.getpid()])
    assert not [f for f in os.listdir(par.SHM_DIR) if f.startswith(f"kdfl-par-{os.getpid()}-")]


def test_auto_starts_the_pool_in_the_background_and_settles(monkeypatch):
    task, clients = make_task(["mlp:hidden=16"], SIZES * 2)
    alg = FedAvg(local=LOCAL)
    jobs = jobs_of(alg, task, clients)
    ref = Sequential().run(alg, task, jobs)
    auto = Auto(workers=2, min_round_s=0.0)
    monkeypatch.setattr(auto, "_idle_cores", lambda busy=None: True)
    key = (("mlp:hidden=16",), "cpu")
    try:
        assert not auto.settled
        assert_close(ref, auto.run(alg, task, jobs))  # in-process, measured; the pool starts meanwhile
        assert auto.mode[key] == "starting" and not auto.settled
        deadline = time.monotonic() + 120
        while auto._starting is not None and auto._starting[0].is_alive() and time.monotonic() < deadline:
            assert_close(ref, auto.run(alg, task, jobs))  # rounds go on in-process while it starts
            time.sleep(0.05)
        assert_close(ref, auto.run(alg, task, jobs))  # the workers' first round: not judged
        assert auto.mode[key] == "try" and not auto.settled
        assert_close(ref, auto.run(alg, task, jobs))  # the timed trial round, on the pool
        assert auto.mode[key] in ("local", "parallel") and auto.settled
        assert_close(ref, auto.run(alg, task, jobs))
    finally:
        auto.close()


def test_models_with_non_persistent_buffers_are_never_reused():
    from torch import nn

    class Counting(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self.register_buffer("seen", torch.zeros(()), persistent=False)  # load_state_dict leaves it

    task, _ = make_task(["mlp:hidden=16"], SIZES[:1])
    build = task.build_model
    task.build_model = lambda arch: Counting()
    model = task.borrow_model("x")
    task.return_model("x", model)
    assert task.borrow_model("x") is not model and not task._scratch.get("x")
    task.build_model = build
    plain = task.new_model("mlp:hidden=16")
    task.return_model("mlp:hidden=16", plain)
    assert task.borrow_model("mlp:hidden=16") is plain


def test_busy_cores_from_proc_stat_readings(monkeypatch):
    from kdfl.simulation import auto as auto_mod

    monkeypatch.setattr(auto_mod.os, "cpu_count", lambda: 2)
    assert auto_mod._busy_cores((100.0, 1000.0), (250.0, 1200.0)) == 1.5  # 150 of 200 jiffies on 2 cores
    assert auto_mod._busy_cores((100.0, 1000.0), (101.0, 1005.0)) is None  # too short to tell
    assert auto_mod._busy_cores(None, (1.0, 2.0)) is None
    a = Auto(workers=2)
    assert a._idle_cores(1.2) and not a._idle_cores(1.6)
    if os.path.exists("/proc/stat"):
        busy, total = auto_mod._cpu_times()
        assert 0 <= busy <= total


def test_executor_specs_build_configured_executors():
    from kdfl.simulation.executors import make_executor
    from kdfl.simulation.parallel import Parallel

    ex = make_executor("parallel:workers=3,inner=vectorized")
    assert isinstance(ex, Parallel) and ex.workers == 3 and ex.inner == "vectorized" and ex._pool is None
    assert make_executor("auto:workers=1").parallel is None  # never a pool
    assert make_executor("vectorized:max_chunk=8,max_memory_mb=64.5").max_chunk == 8
    assert make_executor("sequential").name == "sequential"


def test_executor_spec_errors_name_the_executor_and_its_options():
    from kdfl.simulation.executors import EXECUTORS, executor_options, make_executor

    with pytest.raises(KdflError, match=r"unknown executor 'paralel'\. Did you mean 'parallel'"):
        make_executor("paralel")
    with pytest.raises(KdflError, match=r"executor 'auto' has no option 'worker'; allowed: workers=0, min_round_s=0.1"):
        make_executor("auto:worker=2")
    with pytest.raises(KdflError, match="executor 'auto': 2 is not key=value"):
        make_executor("auto:2")
    with pytest.raises(KdflError, match="executor 'sequential' takes no options"):
        make_executor("sequential:2")
    with pytest.raises(KdflError, match="executor spec 'auto:workers='"):
        make_executor("auto:workers=")
    assert sorted(EXECUTORS) == ["auto", "batched", "parallel", "sequential", "vectorized"]
    assert executor_options()["vectorized"] == {"max_memory_mb": 1024, "max_chunk": 512, "min_group": 2}
    assert EXECUTORS["auto"] is Auto  # a lazy entry is the class itself once imported


def test_client_data_from_the_training_pool_travels_as_row_indices():
    import pickle

    from kdfl.types import TensorData

    task, clients = make_task(["mlp:hidden=16"], SIZES)
    flipped = TensorData(clients[0].data.x, (clients[0].data.y + 1) % 5)  # a poisoned client's own rows
    payload = [c.data for c in clients] + [flipped]
    full, small = par.dumps(payload), par.dumps(payload, pool=task.train)
    assert len(small) < len(full) // 3
    out = par.loads(small, pool=task.train)
    for a, b in zip(payload, out, strict=True):
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert out[0].origin[0] is task.train and out[-1].origin is None
    with pytest.raises(pickle.UnpicklingError, match="no pool"):
        par.loads(small)
    # a subset of another data set is not mistaken for one of the pool
    other = TensorData(task.train.x.clone(), task.train.y.clone())
    assert len(par.dumps([other.subset([0, 1, 2])], pool=task.train)) > len(par.dumps([clients[2].data], pool=task.train))
