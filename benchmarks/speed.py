"""Client-update throughput of kdfl's executors against a plain PyTorch loop.

For K clients (one local epoch of SGD each, the same data, partition, batch order and
hyperparameters everywhere) of three models -- the digits MLP, the digits CNN (2-D
convs on 8x8) and the mnist1d CNN (1-D convs) -- it measures, in one run on one machine:

  (a) ``loop``        a plain sequential PyTorch loop written here (the reference),
  (b) ``sequential``  kdfl's sequential executor (the bit-exact reference),
  (c) ``vectorized``  kdfl's torch.func executor,
  (c') ``default``    the executor a config gets without ``run.executor`` (``batched``:
                      vectorized where the programs and the model family batch, chosen
                      by structure, never by timing),
  (d) ``parallel``    kdfl's process pool (one thread per worker, as many workers as cores),
  (e) ``auto``        kdfl's automatic choice,
  (f) ``flower``      Flower's simulation engine running the same clients (when ``flwr``
                      is installed; skipped with a message otherwise).

Reported per row: client updates per second (median of the timed rounds), the ratio
against (a) (the median of per-round ratios: the in-process runners are timed
interleaved, round 1 of each, then round 2, ..., so a slow spell of the shared machine
hits all of them), the achieved training GFLOP/s (3 x forward FLOPs x samples trained)
and its share of the dense float32 matmul GFLOP/s measured at the start of the run, the
CPU seconds of this process per round and the ratio of the loop's CPU seconds to them
(in-process runners only: on a machine that other jobs load, wall times stretch with the
scheduler's time slices, CPU seconds much less), the
peak resident memory of the benchmark process and all its descendants (pool workers,
Ray) during the timed rounds, and the warm-up: one untimed round, or for ``auto`` the
rounds until its choice has settled (it may start and try a process pool), or for
Flower the start-up (its simulation SuperLink, ``flwr run``, Ray) plus the first round.
Flower runs as its own simulation (``flwr run`` of
:func:`kdfl.flower.simulate_clients`: one SuperNode per client, one Ray actor of one CPU
per core) after all the in-process
measurements, so its ratio is against the loop's median round. Then the goals of the issue are checked
against the measured numbers, and the last line printed is a JSON object with the
ratios.

    python benchmarks/speed.py            # K = 10, 100, 1000
    python benchmarks/speed.py --clients 100
    python benchmarks/speed.py --quick    # smoke run: small K, one repeat
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kdfl import config, models
from kdfl.algorithms import FedAvg
from kdfl.data import load, make_partition
from kdfl.rng import derive
from kdfl.simulation.executors import make_executor
from kdfl.train import LocalSGD, batch_indices
from kdfl.types import Client, Task

LOCAL = LocalSGD(epochs=1, batch_size=32, lr=0.05, momentum=0.9, weight_decay=1e-4)
MODELS = [("digits_mlp", "digits", "mlp"), ("digits_cnn", "digits", "cnn"), ("mnist1d_cnn", "mnist1d", "cnn")]
EXECUTORS = ["loop", "sequential", "vectorized", "default", "parallel", "auto", "flower"]


# ------------------------------------------------------------------------------ measuring
def _rss_mb(pid: int | str = "self") -> float:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


def _children(pid: int | str = "self") -> list[str]:
    """All descendants (workers of a pool, Ray's raylet and its workers, ...)."""
    out = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").glob("*"))
    except OSError:  # the process has just exited
        return out
    for task in tasks:
        try:
            kids = (task / "children").read_text().split()
        except OSError:
            continue
        for kid in kids:
            out += [kid, *_children(kid)]
    return out


class PeakMemory:
    """Peak RSS (MB) of this process plus its descendants (except ``exclude``), sampled every 5 ms."""

    def __init__(self, exclude: set[str] | frozenset[str] = frozenset()) -> None:
        self.exclude = exclude

    def __enter__(self) -> PeakMemory:
        self.peak, self._stop = 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_mb() + sum(_rss_mb(p) for p in _children() if p not in self.exclude))
            self._stop.wait(0.005)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def matmul_gflops(n: int = 1024, reps: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def forward_flops(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-adds x 2 of the Linear and Conv layers for one sample."""
    total = 0

    def hook(m: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(m, nn.Linear):
            total += 2 * m.in_features * m.out_features
        elif isinstance(m, nn.modules.conv._ConvNd):
            k = int(np.prod(m.kernel_size)) * m.in_channels // m.groups
            total += 2 * k * out.numel()  # out: (1, C_out, *spatial)

    hs = [m.register_forward_hook(hook) for m in model.modules()]
    with torch.no_grad():
        model(torch.zeros(1, *input_shape))
    for h in hs:
        h.remove()
    return total


# --------------------------------------------------------------------------------- setup
def setup(dataset: str, arch: str, k: int, seed: int = 0) -> tuple[Task, list[Client], dict]:
    bundle = load(dataset)
    train = bundle.train
    shape, classes = tuple(bundle.input_shape), bundle.num_classes
    parts = make_partition("iid", train.y.numpy(), k, seed)
    task = Task(
        train=train, test=bundle.test, proxy=None, val=None, num_classes=classes, input_shape=shape,
        server_arch=arch, client_archs=[arch] * k,
        build_model=functools.partial(models.build, input_shape=shape, num_classes=classes), seed=seed,
    )
    clients = [Client(i, train.subset(np.asarray(p)), arch, 1, derive(seed, "client", 1, i)) for i, p in enumerate(parts)]
    weights = {kk: v.detach().clone() for kk, v in task.new_model(arch).state_dict().items()}
    return task, clients, weights


def plain_loop(task: Task, clients: list[Client], weights: dict) -> list[dict]:
    """(a): what one writes without a framework: one model, one optimizer per client."""
    model = task.build_model(task.server_arch)
    out = []
    for c in clients:
        model.load_state_dict(weights)
        opt = torch.optim.SGD(model.parameters(), lr=LOCAL.lr, momentum=LOCAL.momentum,
                              weight_decay=LOCAL.weight_decay)
        for idx in batch_indices(len(c.data), LOCAL, c.generator()):
            loss = F.cross_entropy(model(c.data.x[idx]), c.data.y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        out.append({kk: v.detach() - weights[kk] for kk, v in model.state_dict().items()})
    return out


class Runner:
    """One way of running a round of ``clients``: ``step()`` runs it, ``settled()`` says
    whether its warm-up is over (``auto`` tries a process pool in the first rounds)."""

    def __init__(self, name: str, task: Task, clients: list[Client], weights: dict) -> None:
        self.name, self.executor = name, None
        alg, jobs = FedAvg(local=LOCAL), [(c, weights) for c in clients]
        if name == "loop":
            self.step = lambda: plain_loop(task, clients, weights)
        else:  # "default": what a config without run.executor runs
            self.executor = make_executor(config.load(None, [])["run"]["executor"] if name == "default" else name)
            self.step = lambda: self.executor.run(alg, task, jobs)

    def settled(self) -> bool:
        return bool(getattr(self.executor, "settled", True))

    def pids(self) -> set[str]:
        """This runner's worker processes and their descendants (to keep them out of the
        other runners' memory figures)."""
        pool = self.executor if hasattr(self.executor, "_pool") else getattr(self.executor, "parallel", None)
        procs = getattr(getattr(pool, "_pool", None), "_processes", None) or {}
        return {d for p in procs for d in (str(p), *_children(p))}

    def close(self) -> None:
        if self.executor is not None and hasattr(self.executor, "close"):
            self.executor.close()


def measure_in_process(names: list[str], task: Task, clients: list[Client], weights: dict, reps: int,
                       warmup_cap_s: float = 60.0) -> dict[str, dict]:
    """Warm every runner up (one round; ``auto`` until it has settled, at most
    ``warmup_cap_s``), then time ``reps`` rounds of each, interleaved (rep 1 of every
    runner, then rep 2, ...) so that a slow spell of the shared machine hits them all;
    each runner's ratio to the loop is the median of its per-rep ratios."""
    runners = [Runner(n, task, clients, weights) for n in names]
    out: dict[str, dict] = {}
    try:
        for r in runners:
            t = time.perf_counter()
            r.step()
            while not r.settled() and time.perf_counter() - t < warmup_cap_s:
                r.step()
            out[r.name] = {"warmup_s": time.perf_counter() - t, "times": [], "cpu": [], "peak_mb": 0.0,
                           "choice": getattr(r.executor, "mode", None)}
        for _ in range(reps):
            for r in runners:
                others = set().union(*(o.pids() for o in runners if o is not r))
                with PeakMemory(exclude=others) as mem:
                    t, c = time.perf_counter(), time.process_time()
                    r.step()
                    out[r.name]["times"].append(time.perf_counter() - t)
                    out[r.name]["cpu"].append(time.process_time() - c)  # this process only (not a pool's workers)
                out[r.name]["peak_mb"] = max(out[r.name]["peak_mb"], mem.peak)
    finally:
        for r in runners:
            r.close()
    loop = out.get("loop", {}).get("times")
    for r in out.values():
        r["sec"] = statistics.median(r["times"])
        r["ratio"] = statistics.median(a / b for a, b in zip(loop, r["times"], strict=True)) if loop else float("nan")
        r["cpu_s"] = statistics.median(r["cpu"])
        loop_cpu = out.get("loop", {}).get("cpu")
        r["cpu_ratio"] = (statistics.median(a / b for a, b in zip(loop_cpu, r["cpu"], strict=True))
                          if loop_cpu else float("nan"))
    return out


def measure_flower(task: Task, clients: list[Client], weights: dict, reps: int) -> dict:
    """Flower's simulation engine (``flwr run`` on a simulation SuperLink): one run of
    ``1 + reps`` rounds; the start-up and the first round (Ray's start, the actors' start
    and their first unpickling of the task) are the warm-up."""
    try:
        from kdfl.flower import simulate_clients
    except ImportError as e:
        return {"skipped": f"Flower is not installed ({e}); pip install 'kdfl[flower]' -c constraints.txt "
                           "to measure its simulation engine"}
    alg, jobs = FedAvg(local=LOCAL), [(c, weights) for c in clients]
    with PeakMemory() as mem:
        run = simulate_clients(alg, task, jobs, rounds=1 + reps)
    timed = run.round_s[1:]
    return {"sec": statistics.median(timed), "times": timed, "warmup_s": run.startup_s + run.round_s[0],
            "peak_mb": mem.peak, "total_s": run.total_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, nargs="*", default=None, help="K values (default 10 100 1000)")
    ap.add_argument("--quick", action="store_true", help="smoke run: K = 10, 50; one timed repeat")
    ap.add_argument("--reps", type=int, default=3, help="timed rounds per runner (interleaved; median)")
    ap.add_argument("--flower-reps", type=int, default=2, help="timed rounds on Flower's simulation engine")
    ap.add_argument("--models", nargs="*", default=[m[0] for m in MODELS], choices=[m[0] for m in MODELS])
    ap.add_argument("--executors", nargs="*", default=EXECUTORS, choices=EXECUTORS)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads of this process (default 1: for these tiny models more threads "
                         "only add synchronisation, and on a shared machine 2 threads made the loop ~70x slower)")
    args = ap.parse_args()
    if "loop" not in args.executors:
        args.executors = ["loop", *args.executors]  # the reference of every ratio
    peak_all = matmul_gflops()  # every core, torch's default threading
    torch.set_num_threads(args.threads)
    ks = args.clients or ([10, 50] if args.quick else [10, 100, 1000])
    reps = 1 if args.quick else args.reps
    flower_reps = 1 if args.quick else args.flower_reps

    load1 = os.getloadavg()[0]
    peak1 = matmul_gflops()
    print(f"# machine: {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} intra-op thread(s) "
          f"in this process; load average {load1:.2f} at start (other jobs share the machine when > 0.5)")
    print(f"# dense float32 matmul (1024x1024): {peak_all:.1f} GFLOP/s on all cores, {peak1:.1f} GFLOP/s on one "
          "thread; %peak below is against the all-core figure")
    print(f"# local training: {LOCAL}; iid partition of the train pool over K clients; FedAvg, plain CE")
    print(f"# in-process runners: warm-up, then {reps} timed rounds each, interleaved; x loop = median of per-round "
          f"ratios. flower: its own run, 1 warm-up + {flower_reps} timed rounds, x loop against the loop's median")
    header = f"{'model':12s} {'K':>5s} {'executor':11s} {'upd/s':>9s} {'x loop':>7s} {'GFLOP/s':>8s} " \
             f"{'%peak':>6s} {'peak MB':>8s} {'warmup s':>8s} {'cpu s':>7s} {'cpu x':>6s}  note"
    print(header)
    print("-" * len(header))
    ratios: dict[str, dict[str, dict[str, float]]] = {}
    cpu_ratios: dict[str, dict[str, dict[str, float]]] = {}
    vs_flower: dict[str, dict[str, float]] = {}
    cases = [(label, dataset, arch, k) for label, dataset, arch in MODELS if label in args.models for k in ks]
    in_process = [n for n in args.executors if n != "flower"]
    measured: dict[tuple[str, int], dict] = {}

    def row(label: str, k: int, name: str, r: dict, flops: float) -> None:
        if "skipped" in r:
            print(f"{label:12s} {k:5d} {name:11s} skipped: {r['skipped']}", flush=True)
            return
        gf = flops / r["sec"] / 1e9
        ratios.setdefault(label, {}).setdefault(str(k), {})[name] = round(r["ratio"], 3)
        if "cpu_ratio" in r:
            cpu_ratios.setdefault(label, {}).setdefault(str(k), {})[name] = round(r["cpu_ratio"], 3)
        note = ""
        if name == "auto" and r.get("choice"):
            note = "chose " + ", ".join(sorted(set(r["choice"].values())))
        cpu = f"{r['cpu_s']:7.3f} {r['cpu_ratio']:6.2f}" if "cpu_s" in r else f"{'-':>7s} {'-':>6s}"
        print(f"{label:12s} {k:5d} {name:11s} {k / r['sec']:9.1f} {r['ratio']:7.2f} {gf:8.3f} "
              f"{100 * gf / peak_all:6.2f} {r['peak_mb']:8.0f} {r['warmup_s']:8.2f} {cpu}  {note}", flush=True)

    # phase 1: the in-process runners (Ray's processes take a while to exit after a Flower
    # run and would load the machine while they are timed)
    for label, dataset, arch, k in cases:
        task, clients, weights = setup(dataset, arch, k)
        flops = 3 * forward_flops(task.new_model(arch), task.input_shape) * sum(len(c.data) for c in clients)
        res = measure_in_process(in_process, task, clients, weights, reps)
        measured[(label, k)] = {"res": res, "flops": flops}
        for name in in_process:
            row(label, k, name, res[name], flops)
    # phase 2: Flower's simulation engine, against the loop's median round from phase 1
    if "flower" in args.executors:
        print(f"# Flower's simulation engine (one SuperNode per client, {os.cpu_count()} Ray actors of one CPU)",
              flush=True)
        for label, dataset, arch, k in cases:
            task, clients, weights = setup(dataset, arch, k)
            res, flops = measured[(label, k)]["res"], measured[(label, k)]["flops"]
            fl = measure_flower(task, clients, weights, flower_reps)
            if "sec" in fl:
                fl["ratio"] = res["loop"]["sec"] / fl["sec"]
            row(label, k, "flower", fl, flops)
            if "auto" in res and "sec" in fl:
                vs_flower.setdefault(label, {})[str(k)] = round(fl["sec"] / res["auto"]["sec"], 2)
                print(f"{label:12s} {k:5d} auto is {vs_flower[label][str(k)]:.1f}x Flower's simulation engine per "
                      f"round (Flower's warm-up incl. Ray start: {fl['warmup_s']:.1f} s)", flush=True)
    print(f"# load average at end: {os.getloadavg()[0]:.2f} (start {load1:.2f})")
    goals = {}
    for label in ("digits_mlp", "mnist1d_cnn"):
        for k in ("100", "1000"):
            if "auto" in ratios.get(label, {}).get(k, {}):
                goals[f"auto>=3x loop {label} K={k}"] = ratios[label][k]["auto"] >= 3.0
    # issue 21: at K = 100 the default executor >= 3x the loop for every model, auto >= 5x
    for label in ratios:
        for name, need in (("default", 3.0), ("auto", 5.0)):
            if name in ratios[label].get("100", {}):
                goals[f"{name}>={need:g}x loop {label} K=100"] = ratios[label]["100"][name] >= need
    autos = [v["auto"] for per_k in ratios.values() for v in per_k.values() if "auto" in v]
    if autos:
        goals["auto never slower than loop"] = min(autos) >= 1.0
    for label, per_k in vs_flower.items():
        for k, v in per_k.items():
            goals[f"auto>=20x flower {label} K={k}"] = v >= 20.0
    for goal, ok in goals.items():
        print(f"# goal {goal}: {'met' if ok else 'MISSED'}")
    print(json.dumps({"ratio_vs_loop": ratios, "cpu_ratio_vs_loop": cpu_ratios, "auto_vs_flower": vs_flower,
                      "goals_met": goals,
                      "matmul_gflops": round(peak_all, 1), "matmul_gflops_1thread": round(peak1, 1)}))


if __name__ == "__main__":
    sys.exit(main())
