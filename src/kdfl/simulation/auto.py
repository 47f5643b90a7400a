"""The ``batched`` executor (the default) and ``auto``, which adds a timed choice of a
process pool on top of it.

``batched`` decides from structure only -- what the config and the programs declare --
so one config always takes the same numerical path. Per program:

- programs the vectorized executor can batch (see :mod:`kdfl.simulation.vectorized`)
  whose models are all of a family that batches fast on the device are **vectorized**:
  on a GPU any model; on a CPU models without 2-D convolutions or whose 2-D inputs are
  small (at most 16x16). Measured with one thread on 2 shared cores
  (benchmarks/speed.py): 1.9-2.5x a plain PyTorch loop for the digits MLP, the digits
  8x8 CNN and the mnist1d 1-D CNN at K = 10-50 clients, 3-7x at K = 100-1000;
- 2-D CNNs on larger images run **sequentially**: batched (grouped) 2-D convolutions on
  28x28 inputs are slower on a CPU than one convolution per client (0.3-0.9x,
  research/env.md section 3); so do programs that do not batch.

``auto`` (only when asked for: ``run.executor = "auto"``) runs rounds in-process as
``batched`` does, and may move them to a process pool, chosen by timing (so two runs of
one config may take different numerical paths, each within the tolerance below). Across
processes: a pool of single-threaded workers only pays when cores are idle, and it costs
seconds to start. So ``auto`` runs the first round in-process and measures its
throughput (examples per second) and how many cores the whole machine kept busy meanwhile
(``/proc/stat``); when a core sat idle (busy below ``cores - 0.5``, this round included;
the 1-minute load average where there is no /proc/stat) and the round took long enough for a pool to matter
(``min_round_s``), it starts the pool in a background thread while the rounds go on
in-process; the two rounds after the pool is up run on it (each worker making the
in-process choice above for its shard; the first warms the workers up, the second is
timed), and ``auto`` keeps whichever was faster
(the pool must beat the best in-process round by 10 %) for the rest of the run. On a
busy machine it stays in-process (on the shared 2-core machine of the benchmark, with
other jobs running, a 2-worker pool ran at 0.35-0.98x of the plain loop).

Results equal the sequential executor within the vectorized executor's tolerance
(bit-identical for clients that run sequentially).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence

from torch import nn

from kdfl.algorithms.program import Program
from kdfl.simulation.executors import Job, Result
from kdfl.simulation.parallel import Parallel
from kdfl.simulation.vectorized import Vectorized
from kdfl.types import Algorithm, KdflError, Task

log = logging.getLogger(__name__)


def prefers_vectorized(model: nn.Module, device_type: str, input_shape: tuple[int, ...] = ()) -> bool:
    """The rule: vectorize unless 2-D/3-D convolutions on inputs over 16x16 would run batched on a CPU."""
    if device_type != "cpu":
        return True
    convs = any(isinstance(m, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d)) for m in model.modules())
    small = len(input_shape) == 3 and input_shape[1] * input_shape[2] <= 16 * 16
    return not convs or small


def _cpu_times() -> tuple[float, float] | None:
    """(busy, total) jiffies of the whole machine from /proc/stat; None elsewhere."""
    try:
        with open("/proc/stat") as f:
            fields = [float(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def _busy_cores(before: tuple[float, float] | None, after: tuple[float, float] | None) -> float | None:
    """Cores busy on average between two :func:`_cpu_times` readings (this process included)."""
    if before is None or after is None or after[1] - before[1] < 10:  # under ~0.1 s of jiffies: no signal
        return None
    return (after[0] - before[0]) / (after[1] - before[1]) * (os.cpu_count() or 1)


class Batched(Vectorized):
    """The default executor: clients trained vectorized wherever their programs batch and
    their models are of a family that batches fast on the device; the rest one after
    another with the reference runner.

    The choice is made from what the config and the programs declare, never from a timing,
    so the same config always takes the same numerical path: a program batches when the
    vectorized executor can batch it (see :mod:`kdfl.simulation.vectorized`) and every
    model it declares passes :func:`prefers_vectorized` (on a CPU: no 2-D convolutions
    on inputs over 16x16). Batched clients equal their sequential run within the
    vectorized executor's tolerance; declined ones are bit-identical to it. The reasons
    are in :attr:`reasons` after a round, as for ``vectorized``.
    """

    name = "batched"

    def __init__(self, max_memory_mb: float = 1024, max_chunk: int = 512, min_group: int = 2) -> None:
        super().__init__(max_memory_mb=max_memory_mb, max_chunk=max_chunk, min_group=min_group)
        self._prefers: dict[tuple[str, str, tuple[int, ...]], bool] = {}  # (arch, device type, input shape) -> rule

    def prefers(self, task: Task, arch: str) -> bool:
        """The rule for one architecture on the task's device and input shape (cached)."""
        key = (arch, task.device.type, tuple(task.input_shape))
        if key not in self._prefers:
            try:
                self._prefers[key] = prefers_vectorized(task.new_model(arch), task.device.type,
                                                        tuple(task.input_shape))
            except Exception:  # the client will fail (or not) on its own in the reference runner
                self._prefers[key] = False
            log.debug("batched: %s on %s -> %s", arch, task.device.type,
                      "vectorized" if self._prefers[key] else "sequential")
        return self._prefers[key]

    def declines(self, task: Task, program: Program) -> str:
        slow = [m.arch for m in program.models.values() if not self.prefers(task, m.arch)]
        if slow:
            return (f"model {slow[0]!r} has 2-D convolutions on inputs over 16x16, which run faster one client at a "
                    f"time on a {task.device.type.upper()} (use run.executor = 'vectorized' to batch them anyway)")
        return ""


AutoLocal = Batched  # auto's in-process part (the name parallel's inner="auto-local" refers to)


class Auto:
    """Chooses the fastest way to run each round (see the module docstring).

    Args:
        workers: worker processes for the pool (0 = the number of CPU cores; 1 = never a pool).
        min_round_s: an in-process round shorter than this never tries the pool (a pool
            round costs ~10-20 ms of messaging on top of the training).
    """

    name = "auto"

    def __init__(self, workers: int = 0, min_round_s: float = 0.1) -> None:
        if workers < 0 or min_round_s < 0:
            raise KdflError(f"auto needs workers >= 0 (0 = one per core, 1 = never a pool) and min_round_s >= 0; "
                            f"got workers={workers}, min_round_s={min_round_s}")
        self.workers = workers or os.cpu_count() or 1
        self.min_round_s = min_round_s
        self.local = Batched()
        self.parallel = Parallel(self.workers, inner="auto-local") if self.workers > 1 else None
        # (architectures, device) -> "local" | "starting" | "warm" | "try" | "parallel"
        self.mode: dict[tuple, str] = {}
        self._rate: dict[tuple, float] = {}
        self._starting: tuple[threading.Thread, list[bool], Task] | None = None

    @property
    def settled(self) -> bool:
        """True once every kind of round seen so far has its final choice (no pool starting
        or on trial): what a benchmark waits for before timing."""
        return bool(self.mode) and all(m in ("local", "parallel") for m in self.mode.values())

    def _idle_cores(self, busy: float | None = None) -> bool:
        """Whether a core sat idle: ``busy`` (cores in use during the last in-process round,
        from /proc/stat, that round included) below ``cores - 0.5``; without /proc/stat, the
        1-minute load average (which lags: a pool that just ran keeps it up for a minute)."""
        cores = os.cpu_count() or 1
        if busy is not None:
            return busy < cores - 0.5
        try:
            return os.getloadavg()[0] < cores - 0.5
        except OSError:
            return False

    def _start_pool(self, task: Task) -> None:
        """Start the pool in a background thread: rounds go on in-process meanwhile."""
        assert self.parallel is not None
        ok: list[bool] = []
        thread = threading.Thread(target=lambda: ok.append(self.parallel.start(task)),  # type: ignore[union-attr]
                                  name="kdfl-auto-pool", daemon=True)
        thread.start()
        self._starting = (thread, ok, task)

    def _pool_ready(self, task: Task) -> bool | None:
        """True/False once the background start finished for ``task``; None while it runs."""
        if self._starting is None:
            return None
        thread, ok, started_for = self._starting
        if thread.is_alive():
            return None
        self._starting = None
        return bool(ok and ok[0]) and started_for is task

    def run(self, algorithm: Algorithm, task: Task, jobs: Sequence[Job]) -> list[Result]:
        key = (tuple(sorted({c.arch for c, _ in jobs})), task.device.type)
        mode = self.mode.get(key)
        work = sum(len(c.data) for c, _ in jobs) + 1
        if mode == "starting":
            ready = self._pool_ready(task)
            if ready is not None:
                mode = self.mode[key] = "warm" if ready else "local"
        if mode in ("warm", "try", "parallel") and not (self.parallel is not None and self.parallel.start(task)):
            mode = self.mode[key] = "local"  # the pool is gone and cannot start again
        if mode in ("warm", "try", "parallel") and self.parallel is not None:
            t = time.perf_counter()
            results = self.parallel.run(algorithm, task, jobs)
            if mode == "warm":  # the workers' first round (imports, first vmap traces) is not judged
                self.mode[key] = "try"
            elif mode == "try":
                rate = work / (time.perf_counter() - t)
                local = self._rate.get(key, 0.0)
                self.mode[key] = "parallel" if rate > 1.1 * local else "local"
                log.info("auto: pool %.0f vs in-process %.0f examples/s -> %s", rate, local, self.mode[key])
                if self.mode[key] == "local" and "parallel" not in self.mode.values():
                    self.parallel.close()  # nothing uses it: free the worker processes
            return results
        t, cpu = time.perf_counter(), _cpu_times()
        results = self.local.run(algorithm, task, jobs)
        took = time.perf_counter() - t
        busy = _busy_cores(cpu, _cpu_times())
        if mode in (None, "starting"):
            self._rate[key] = max(self._rate.get(key, 0.0), work / took)  # the best in-process round
        if mode is None:
            can_pool = (self.parallel is not None and task.device.type == "cpu" and len(jobs) >= 2 * self.workers
                        and took >= self.min_round_s and self._idle_cores(busy))
            if can_pool and self._starting is None:
                self._start_pool(task)
                self.mode[key] = "starting"
            else:
                self.mode[key] = "local"
        return results

    def close(self) -> None:
        if self._starting is not None:
            self._starting[0].join()
            self._starting = None
        if self.parallel is not None:
            self.parallel.close()
