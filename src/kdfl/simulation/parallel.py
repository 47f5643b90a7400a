"""The ``parallel`` executor: a pool of worker processes trains the clients of a round.

The pool starts on the first round and lives as long as the executor (one run): each
worker runs one torch thread (``torch.set_num_threads(1)``) and receives the
:class:`~kdfl.types.Task` (with the training pool) once, in its initializer; every round
only the jobs travel: clients whose data is a subset of the task's training pool (as the
engine makes them) as row indices, other client data (a poisoned client's flipped
labels, say) as rows, and each distinct downlink payload once. The jobs are cut into
one shard per worker, balanced by training work (longest first). Inside a worker the
clients run with an *inner* executor: ``sequential`` (the default: the results are
bit-identical to the sequential executor, which the tests check with ``torch.equal``)
or ``vectorized``.

Tensors cross the process boundary in one flat byte buffer per message (pickle's
``persistent_id``), not one shared-memory segment or pickled storage per tensor: with
1000 small clients that is the difference between milliseconds and seconds. A worker's
results of 1 MB or more are written once into a fresh file in /dev/shm that the parent
maps (zero-copy views, see :func:`dumps`); smaller messages go through the pipe.

The task must be picklable (``Task.build_model`` a module-level function or a
``functools.partial``, as :func:`kdfl.experiment.build` makes it); otherwise, or when the
pool cannot start, the executor logs a warning and runs the inner executor in-process.
A client that raises becomes a :class:`~kdfl.simulation.executors.ClientFailure` in its
worker; a worker that dies (segfault, out of memory) is replaced and its clients are
retried one per task, so only the client that kills a worker is lost.
"""

from __future__ import annotations

import glob
import io
import logging
import math
import mmap
import multiprocessing
import os
import pickle
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import torch
from torch import Tensor

from kdfl.simulation.executors import ClientFailure, Job, Result
from kdfl.types import Algorithm, KdflError, Task, TensorData

log = logging.getLogger(__name__)


# -------------------------------------------------------------------------- serialisation
SHM_DIR = "/dev/shm"
SHM_MIN_BYTES = 1 << 20  # results at least this big come back through a shared-memory file
_shm_count = 0


def _shm_write(size: int) -> tuple[str, mmap.mmap] | None:
    """A fresh file of ``size`` bytes in /dev/shm, mapped; None where there is none."""
    global _shm_count
    if not os.path.isdir(SHM_DIR):
        return None
    _shm_count += 1
    path = os.path.join(SHM_DIR, f"kdfl-par-{os.getpid()}-{_shm_count}")
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    except OSError:
        return None
    try:
        os.ftruncate(fd, size)
        return path, mmap.mmap(fd, size)
    except OSError:  # e.g. /dev/shm too small
        os.unlink(path)
        return None
    finally:
        os.close(fd)


def dumps(obj: Any, shm: bool = False, pool: TensorData | None = None) -> bytes:
    """Pickle ``obj`` with all its plain CPU tensors packed into one trailing buffer.

    With ``shm`` (results a worker sends back), a buffer of at least ``SHM_MIN_BYTES``
    is written once into a fresh file in /dev/shm instead of travelling through the
    pipe: 1000 mnist1d CNN deltas are 96 MB, and each fresh 96 MB buffer costs ~75 ms of
    page faults on this kind of VM, so the pickled route (5 copies) took ~0.9 s a round
    and the file route ~0.1 s. :func:`loads` maps the file and unlinks it.

    With ``pool`` (the training pool the workers already hold), client data made by
    ``pool.subset(idx)`` travels as its row indices and is rebuilt on the other side
    (``loads(..., pool=...)``): the data is shipped once, with the task.
    """
    tensors: list[Tensor] = []
    index: dict[int, int] = {}

    class _Pickler(pickle.Pickler):
        def persistent_id(self, o: Any) -> Any:
            if pool is not None and type(o) is TensorData and o.origin is not None and o.origin[0] is pool:
                return ("subset", self.persistent_id(o.origin[1]))
            if type(o) is Tensor and o.device.type == "cpu" and o.layout == torch.strided and not o.requires_grad \
                    and not o.is_quantized:
                if id(o) not in index:
                    index[id(o)] = len(tensors)
                    tensors.append(o)
                return index[id(o)]
            return None

    head = io.BytesIO()
    pickler = _Pickler(head, protocol=pickle.HIGHEST_PROTOCOL)
    pickler.dump(obj)
    metas: list[tuple[torch.dtype, tuple[int, ...], int]] = []
    pos = 0
    for t in tensors:
        metas.append((t.dtype, tuple(t.shape), pos))
        nbytes = t.numel() * t.element_size()
        pos += nbytes + (-nbytes % 16)  # every tensor 16-byte aligned: typed views on load
    mapped = _shm_write(pos) if shm and pos >= SHM_MIN_BYTES else None
    if mapped is not None:
        path, mm = mapped
        _fill(torch.frombuffer(mm, dtype=torch.uint8), tensors, metas)
        mm.close()
        return pickle.dumps((head.getvalue(), metas, ("shm", path, pos)), protocol=pickle.HIGHEST_PROTOCOL)
    body = torch.empty(pos, dtype=torch.uint8)
    _fill(body, tensors, metas)
    return pickle.dumps((head.getvalue(), metas, body.numpy().tobytes()), protocol=pickle.HIGHEST_PROTOCOL)


def _typed(buf: Tensor) -> Any:
    """``typed(dtype)``: the whole byte buffer viewed as ``dtype`` (one view per dtype:
    viewing each tensor's bytes separately cost ~20 us a tensor)."""
    cache: dict[torch.dtype, tuple[Tensor, int]] = {}

    def typed(dtype: torch.dtype) -> tuple[Tensor, int]:
        if dtype not in cache:
            size = torch.empty(0, dtype=dtype).element_size()
            cache[dtype] = (buf[: buf.numel() // size * size].view(dtype), size)
        return cache[dtype]

    return typed


def _fill(buf: Tensor, tensors: Sequence[Tensor], metas: Sequence[tuple[torch.dtype, tuple[int, ...], int]]) -> None:
    typed = _typed(buf)
    with torch.no_grad():
        for t, (dtype, _, pos) in zip(tensors, metas, strict=True):
            if t.numel():
                view, size = typed(dtype)
                view[pos // size : pos // size + t.numel()].view(t.shape).copy_(t)


def loads(data: bytes, pool: TensorData | None = None) -> Any:
    """Inverse of :func:`dumps`. Tensors from the pipe get their own storage; tensors from
    a shared-memory file are views of one private (copy-on-write) mapping of it, which
    lives as long as any of them (the file itself is unlinked here)."""
    head, metas, body = pickle.loads(data)
    if isinstance(body, tuple):
        _, path, size = body
        fd = os.open(path, os.O_RDONLY)
        try:
            mm = mmap.mmap(fd, size, access=mmap.ACCESS_COPY)
        finally:
            os.close(fd)
            os.unlink(path)
        buf = torch.frombuffer(mm, dtype=torch.uint8)
        own = False
    else:
        buf = torch.frombuffer(bytearray(body), dtype=torch.uint8) if body else torch.zeros(0, dtype=torch.uint8)
        own = True
    typed = _typed(buf)
    tensors = []
    for dtype, shape, pos in metas:
        n = math.prod(shape)
        if n == 0:
            tensors.append(torch.empty(shape, dtype=dtype))
            continue
        view, size = typed(dtype)
        t = view[pos // size : pos // size + n].view(shape)
        tensors.append(t.clone() if own else t)

    class _Unpickler(pickle.Unpickler):
        def persistent_load(self, pid: Any) -> Any:
            if isinstance(pid, tuple):  # ("subset", rows) of the training pool
                if pool is None:
                    raise pickle.UnpicklingError("client data was sent as row indices but no pool is known here")
                return pool.subset(tensors[pid[1]])
            return tensors[pid]

    return _Unpickler(io.BytesIO(head)).load()


def remove_shm_files(pids: Sequence[int]) -> None:
    """Delete result files that workers ``pids`` wrote but nobody read (a crashed round)."""
    for pid in pids:
        for path in glob.glob(os.path.join(SHM_DIR, f"kdfl-par-{pid}-*")):
            try:
                os.unlink(path)
            except OSError:
                pass


# ------------------------------------------------------------------------------- workers
_TASK: Task | None = None
_INNER: dict[str, Any] = {}
INNER = ("sequential", "vectorized", "batched", "auto-local")  # how a worker runs its shard


def _init_worker(task_blob: bytes, threads: int) -> None:
    global _TASK
    torch.set_num_threads(threads)
    _TASK = loads(task_blob)


def _inner(name: str) -> Any:
    if name not in _INNER:
        if name == "auto-local":  # auto's in-process choice (no nested pools): batched
            from kdfl.simulation.auto import Batched

            _INNER[name] = Batched()
        else:
            from kdfl.simulation.executors import make_executor

            _INNER[name] = make_executor(name)
    return _INNER[name]


def _work(blob: bytes) -> bytes:
    assert _TASK is not None
    algorithm, inner, jobs = loads(blob, pool=_TASK.train)
    return dumps(_inner(inner).run(algorithm, _TASK, jobs), shm=True)


def _ping() -> int:
    return os.getpid()


def _cost(job: Job) -> float:
    client, _ = job
    return float(len(client.data)) + 1.0


def shard(jobs: Sequence[Job], parts: int) -> list[list[int]]:
    """Positions of ``jobs`` cut into ``parts`` shards of about equal work (LPT)."""
    order = sorted(range(len(jobs)), key=lambda i: -_cost(jobs[i]))
    loads_ = [0.0] * parts
    out: list[list[int]] = [[] for _ in range(parts)]
    for i in order:
        w = min(range(parts), key=loads_.__getitem__)
        out[w].append(i)
        loads_[w] += _cost(jobs[i])
    return [sorted(s) for s in out if s]


class Parallel:
    """Clients trained concurrently by a pool of single-threaded worker processes.

    Args:
        workers: worker processes (0 = the number of CPU cores).
        inner: how each worker runs its shard: "sequential" (bit-identical to the
            sequential executor), "vectorized" or "batched" ("auto-local" is batched).
        context: multiprocessing start method, "spawn" or "forkserver".
        threads: torch threads per worker.
    """

    name = "parallel"

    def __init__(self, workers: int = 0, inner: str = "sequential", context: str = "spawn", threads: int = 1) -> None:
        if workers < 0 or threads < 1:
            raise KdflError(f"parallel needs workers >= 0 (0 = one per core) and threads >= 1; got "
                            f"workers={workers}, threads={threads}")
        if inner not in INNER:
            raise KdflError(f"parallel's inner executor must be one of {', '.join(INNER)}; got {inner!r}")
        if context not in multiprocessing.get_all_start_methods():
            raise KdflError(f"parallel's context must be one of {', '.join(multiprocessing.get_all_start_methods())}"
                            f" on this machine; got {context!r}")
        self.workers = workers or os.cpu_count() or 1
        self.inner, self.context, self.threads = inner, context, threads
        self._pool: ProcessPoolExecutor | None = None
        self._task: Task | None = None
        self._failed_for: Task | None = None

    # -- pool -----------------------------------------------------------------------------
    def start(self, task: Task) -> bool:
        """Start the pool for ``task`` (a no-op when it already runs for it); False when
        the pool cannot serve this task (unpicklable task, no process support)."""
        if self._pool is not None and self._task is task:
            return True
        if self._failed_for is task:
            return False
        self.close()
        try:
            blob = dumps(task)
        except Exception as e:
            log.warning("parallel: the task cannot be sent to worker processes (%s: %s); running clients "
                        "in-process. Make Task.build_model picklable (e.g. functools.partial(kdfl.models.build, "
                        "input_shape=..., num_classes=...)).", type(e).__name__, e)
            self._failed_for = task
            return False
        try:
            pool = ProcessPoolExecutor(
                max_workers=self.workers, mp_context=multiprocessing.get_context(self.context),
                initializer=_init_worker, initargs=(blob, self.threads),
            )
            for f in [pool.submit(_ping) for _ in range(self.workers)]:
                f.result()
        except Exception as e:
            log.warning("parallel: could not start %d worker processes (%s: %s); running clients in-process",
                        self.workers, type(e).__name__, e)
            self._failed_for = task
            return False
        self._pool, self._task = pool, task
        log.debug("parallel: started %d workers (%s, %d thread each)", self.workers, self.context, self.threads)
        return True

    def close(self) -> None:
        """Stop the worker processes (and delete result files a failed round left behind)."""
        if self._pool is not None:
            pids = list(getattr(self._pool, "_processes", None) or {})
            self._pool.shutdown(wait=True, cancel_futures=True)
            remove_shm_files(pids)
        self._pool, self._task = None, None

    def __enter__(self) -> Parallel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
        except Exception:
            pass

    # -- rounds ---------------------------------------------------------------------------
    def run(self, algorithm: Algorithm, task: Task, jobs: Sequence[Job]) -> list[Result]:
        if not jobs:
            return []
        if not self.start(task):
            return _inner(self.inner).run(algorithm, task, jobs)
        assert self._pool is not None
        results: list[Result | None] = [None] * len(jobs)
        shards = shard(jobs, self.workers)
        futures = [(s, self._pool.submit(_work, dumps((algorithm, self.inner, [jobs[i] for i in s]), pool=task.train)))
                   for s in shards]
        broken: list[int] = []
        for positions, fut in futures:
            try:
                for i, r in zip(positions, loads(fut.result()), strict=True):
                    results[i] = r
            except BrokenProcessPool:
                broken += positions
        if broken:
            self._retry(algorithm, task, jobs, broken, results)
        return results  # type: ignore[return-value]

    def _retry(self, algorithm: Algorithm, task: Task, jobs: Sequence[Job], positions: list[int],
               results: list[Result | None]) -> None:
        """A worker died: restart the pool and rerun its clients one per task."""
        log.warning("parallel: a worker process died; retrying its %d clients one at a time", len(positions))
        self.close()
        for i in positions:
            if not self.start(task):
                from kdfl.simulation.executors import run_one

                results[i] = run_one(algorithm, task, *jobs[i])
                continue
            assert self._pool is not None
            fut: Future[bytes] = self._pool.submit(_work, dumps((algorithm, self.inner, [jobs[i]]), pool=task.train))
            try:
                results[i] = loads(fut.result())[0]
            except BrokenProcessPool as e:
                results[i] = ClientFailure(jobs[i][0].id, f"worker process died: {e}")
                self.close()  # the next retry starts a fresh pool
