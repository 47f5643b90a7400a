"""Client-update throughput of kdfl's executors against a plain PyTorch loop.

For K clients (one local epoch of SGD each, the same data, partition, batch order and
hyperparameters everywhere) of three models -- the digits MLP, the digits CNN (2-D
convs on 8x8) and the mnist1d CNN (1-D convs) -- it measures, in one run on one machine:

  (a) ``loop``        a plain sequential PyTorch loop written here (the reference),
  (b) ``sequential``  kdfl's sequential executor,
  (c) ``vectorized``  kdfl's torch.func executor,
  (d) ``parallel``    kdfl's process pool (one thread per worker, as many workers as cores),
  (e) ``auto``        kdfl's automatic choice,
  (f) ``flower``      Flower's simulation engine running the same clients (when ``flwr``
                      is installed; skipped with a message otherwise).

Reported per row: client updates per second (median over the timed repeats, after one
untimed warm-up round that also pays any pool start-up, shown as ``warmup_s``), the
ratio against (a), the achieved training GFLOP/s (3 x forward FLOPs x samples trained)
and its share of the dense float32 matmul GFLOP/s measured at the start of the run, and
the peak resident memory of the benchmark process plus its worker processes during the
timed rounds. The last line printed is a JSON object with the ratios against (a).

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

from kdfl import models
from kdfl.algorithms import FedAvg
from kdfl.data import load, make_partition
from kdfl.rng import derive
from kdfl.simulation.executors import make_executor
from kdfl.train import LocalSGD, batch_indices
from kdfl.types import Client, Task

LOCAL = LocalSGD(epochs=1, batch_size=32, lr=0.05, momentum=0.9, weight_decay=1e-4)
MODELS = [("digits_mlp", "digits", "mlp"), ("digits_cnn", "digits", "cnn"), ("mnist1d_cnn", "mnist1d", "cnn")]
EXECUTORS = ["loop", "sequential", "vectorized", "parallel", "auto", "flower"]


# ------------------------------------------------------------------------------ measuring
def _rss_mb(pid: int | str = "self") -> float:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


def _children() -> list[str]:
    out = []
    for task in Path("/proc/self/task").glob("*"):
        try:
            out += (task / "children").read_text().split()
        except OSError:
            pass
    return out


class PeakMemory:
    """Peak RSS (MB) of this process plus its children, sampled every 5 ms."""

    def __enter__(self) -> PeakMemory:
        self.peak, self._stop = 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_mb() + sum(_rss_mb(p) for p in _children()))
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


def flower_runner():
    try:
        import flwr  # noqa: F401
    except ImportError:
        return None
    try:
        from kdfl.flower import simulate_clients  # type: ignore[attr-defined]
    except ImportError:
        return None
    return simulate_clients


def measure(name: str, task: Task, clients: list[Client], weights: dict, reps: int) -> dict:
    alg = FedAvg(local=LOCAL)
    jobs = [(c, weights) for c in clients]
    executor = None
    if name == "loop":
        def fn() -> object:
            return plain_loop(task, clients, weights)
    elif name == "flower":
        runner = flower_runner()
        if runner is None:
            return {"skipped": "flwr is not installed (pip install 'kdfl[flower]') or kdfl.flower has no "
                               "simulate_clients; Flower's simulation engine was not measured"}

        def fn() -> object:
            return runner(alg, task, jobs)
    else:
        executor = make_executor(name)

        def fn() -> object:
            return executor.run(alg, task, jobs)
    t = time.perf_counter()
    fn()
    warmup = time.perf_counter() - t
    times = []
    with PeakMemory() as mem:
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
            if sum(times) > 20:  # enough signal; keep the whole run to minutes
                break
    if executor is not None and hasattr(executor, "close"):
        executor.close()
    sec = statistics.median(times)
    return {"sec": sec, "updates_per_s": len(clients) / sec, "warmup_s": warmup, "peak_mb": mem.peak,
            "reps": len(times)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, nargs="*", default=None, help="K values (default 10 100 1000)")
    ap.add_argument("--quick", action="store_true", help="smoke run: K = 10, 50; one timed repeat")
    ap.add_argument("--reps", type=int, default=3, help="timed repeats per measurement (median)")
    ap.add_argument("--models", nargs="*", default=[m[0] for m in MODELS], choices=[m[0] for m in MODELS])
    ap.add_argument("--executors", nargs="*", default=EXECUTORS, choices=EXECUTORS)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads of this process (default 1: for these tiny models more threads "
                         "only add synchronisation, and on a shared machine 2 threads made the loop ~70x slower)")
    args = ap.parse_args()
    peak_all = matmul_gflops()  # every core, torch's default threading
    torch.set_num_threads(args.threads)
    ks = args.clients or ([10, 50] if args.quick else [10, 100, 1000])
    reps = 1 if args.quick else args.reps

    load1 = os.getloadavg()[0]
    peak1 = matmul_gflops()
    peak = peak_all
    print(f"# machine: {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} intra-op thread(s) "
          f"in this process; load average {load1:.2f} at start (other jobs share the machine when > 0.5)")
    print(f"# dense float32 matmul (1024x1024): {peak_all:.1f} GFLOP/s on all cores, {peak1:.1f} GFLOP/s on one "
          "thread; %peak below is against the all-core figure")
    print(f"# local training: {LOCAL}; iid partition of the train pool over K clients; FedAvg, plain CE")
    header = f"{'model':12s} {'K':>5s} {'executor':11s} {'upd/s':>9s} {'x loop':>7s} {'GFLOP/s':>8s} " \
             f"{'%peak':>6s} {'peak MB':>8s} {'warmup s':>8s}"
    print(header)
    print("-" * len(header))
    ratios: dict[str, dict[str, dict[str, float]]] = {}
    for label, dataset, arch in MODELS:
        if label not in args.models:
            continue
        for k in ks:
            task, clients, weights = setup(dataset, arch, k)
            samples = sum(len(c.data) for c in clients) * LOCAL.epochs
            flops = 3 * forward_flops(task.new_model(arch), task.input_shape) * samples
            base = None
            for name in args.executors:
                r = measure(name, task, clients, weights, reps)
                if "skipped" in r:
                    print(f"{label:12s} {k:5d} {name:11s} skipped: {r['skipped']}")
                    continue
                if name == "loop":
                    base = r["updates_per_s"]
                ratio = r["updates_per_s"] / base if base else float("nan")
                gf = flops / r["sec"] / 1e9
                ratios.setdefault(label, {}).setdefault(str(k), {})[name] = round(ratio, 3)
                print(f"{label:12s} {k:5d} {name:11s} {r['updates_per_s']:9.1f} {ratio:7.2f} {gf:8.3f} "
                      f"{100 * gf / peak:6.2f} {r['peak_mb']:8.0f} {r['warmup_s']:8.2f}", flush=True)
    print(f"# load average at end: {os.getloadavg()[0]:.2f} (start {load1:.2f})")
    print(json.dumps({"ratio_vs_loop": ratios, "matmul_gflops": round(peak, 1), "matmul_gflops_1thread": round(peak1, 1)}))


if __name__ == "__main__":
    sys.exit(main())
