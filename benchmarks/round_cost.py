"""Where a round's time goes, per algorithm, against FedAvg's round with the same local work.

Every algorithm of the registry runs one round on the protocol's federations
(``benchmarks/protocol/mnist1d.toml``: the 1-D CNN; ``benchmarks/protocol/fmnist.toml``: the
Fashion-MNIST CNN; 8 of 20 clients, Dirichlet 0.1), at 1 and 5 local epochs, with its
registry defaults (server loops included) and the sequential executor (the reference: client
training is then separable from the rest). The round is split by timing the library's own
functions in place (exclusive times: a nested timed call is counted in its own column only):

- ``client train``: :func:`kdfl.train.local_train` (every phase of every client program);
- ``client infer``: the clients' uploads (:func:`kdfl.algorithms.program.finish`: logits on
  the proxy / public set, attention maps, deltas) and any other client-side ``predict``;
- ``client other``: the rest of the executor (building models, loading weights, programs);
- ``codec``: upload and downlink encoding and decoding (:mod:`kdfl.wire`, :mod:`kdfl.transport`);
- ``aggregate``: ``server_update`` minus its timed parts (aggregation, teachers' set-up);
- ``server infer``: ``predict`` inside ``server_update`` (teachers' logits on the proxy);
- ``server distil`` / ``server gen``: :func:`kdfl.algorithms.kit.distill.distill_loop` (with
  its early-stopping evaluations) and FedGen's ``train_generator``;
- ``eval``: :func:`kdfl.simulation.rounds.evaluate_state` (test set and validation slice);
- ``book``: the rest of the round (sampling, validation of uploads, records).

``round`` is the whole of ``run_round`` without per-client evaluation (the default
``run.client_eval_every = 0`` evaluates clients once, after the last round); ``x FedAvg`` is
its ratio to FedAvg's round in the same cell. ``per-client eval`` (every client evaluating
its model, :func:`kdfl.simulation.rounds.client_eval_record`) is timed after the round and
listed on its own.

One untimed FedAvg round per data set warms torch up first. Times are of the shared
machine at one torch thread: the ratios, measured in one run, are the numbers to read.

    python benchmarks/round_cost.py                              # the full table
    python benchmarks/round_cost.py --data fmnist --epochs 5 --algorithms fedavg,feddf,fedema_distill
    python benchmarks/round_cost.py --set data.pool_size=3000 --set data.proxy_size=1000
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = {"mnist1d": ROOT / "benchmarks/protocol/mnist1d.toml", "fmnist": ROOT / "benchmarks/protocol/fmnist.toml"}
COLUMNS = ["client train", "client infer", "client other", "codec", "aggregate", "server infer", "server distil",
           "server gen", "eval", "book"]
ABSORBING = {"server distil", "server gen", "eval", "per-client eval"}  # nested calls count here


class Profile:
    """Exclusive wall time per category of the wrapped functions (a stack of open calls)."""

    def __init__(self) -> None:
        self.stack: list[list[Any]] = []
        self.times: dict[str, float] = defaultdict(float)

    def wrap(self, fn: Callable[..., Any], label: str | Callable[[str | None], str]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            parent = self.stack[-1][0] if self.stack else None
            cat = parent if parent in ABSORBING else (label(parent) if callable(label) else label)
            self.stack.append([cat, 0.0])
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t0
                _, inner_t = self.stack.pop()
                self.times[cat] += dt - inner_t
                if self.stack:
                    self.stack[-1][1] += dt

        return inner


def _predict_label(parent: str | None) -> str:
    if parent in ("client other", "client infer", "client train"):
        return "client infer"
    if parent in ("aggregate", "server infer"):
        return "server infer"
    return parent or "book"


@contextmanager
def patched(profile: Profile, algorithm: Any, executor: Any) -> Iterator[None]:
    """Wrap the timed functions wherever a kdfl module holds them (``from x import f``
    copies), plus the algorithm's ``server_update`` / ``train_generator`` and the executor's
    ``run``; everything is restored on exit."""
    from kdfl import train, transport, wire
    from kdfl.algorithms import program
    from kdfl.algorithms.kit import distill
    from kdfl.simulation import rounds

    targets: list[tuple[Any, str | Callable[[str | None], str]]] = [
        (train.local_train, "client train"), (train.predict, _predict_label), (program.finish, "client infer"),
        (wire.encode, "codec"), (wire.decode, "codec"), (transport.pack, "codec"), (transport.unpack, "codec"),
        (distill.distill_loop, "server distil"), (rounds.evaluate_state, "eval"),
        (rounds.client_eval_record, "per-client eval"),
    ]
    undo: list[tuple[Any, str, Any]] = []
    for fn, label in targets:
        new = profile.wrap(fn, label)
        for mod in [m for name, m in sys.modules.items() if name.startswith("kdfl") and m is not None]:
            for attr, value in list(vars(mod).items()):
                if value is fn:
                    undo.append((mod, attr, value))
                    setattr(mod, attr, new)
    cls = type(algorithm)
    for attr, label in (("server_update", "aggregate"), ("train_generator", "server gen")):
        if attr in vars(cls):
            undo.append((cls, attr, vars(cls)[attr]))
            setattr(cls, attr, profile.wrap(vars(cls)[attr], label))
    undo.append((executor, "run", None))
    executor.run = profile.wrap(executor.run, "client other")
    try:
        yield
    finally:
        for obj, attr, value in reversed(undo):
            if value is None:
                delattr(obj, attr)
            else:
                setattr(obj, attr, value)


def one_round(data: str, algorithm: str, epochs: int, sets: list[str], executor: str) -> dict[str, Any]:
    """Time round 1 of ``algorithm`` (and the per-client evaluation after it)."""
    from kdfl import config
    from kdfl.experiment import build
    from kdfl.simulation.engine import Engine, RunSettings
    from kdfl.simulation.executors import make_executor
    from kdfl.simulation.rounds import client_eval_record

    cfg = config.load(DATA[data], [f"algorithm.name={algorithm}", f"local.epochs={epochs}", "run.rounds=1",
                                   f"run.executor={executor}", "run.threads=1", *sets])
    fed = build(cfg)
    keys = set(RunSettings.__dataclass_fields__)
    settings = RunSettings(**{k: v for k, v in cfg["run"].items() if k in keys} | {"client_eval_every": 0})
    ex = make_executor(executor)
    engine = Engine(fed.algorithm, fed.task, fed.partitions, settings, executor=ex, holdouts=fed.holdouts)
    state = fed.algorithm.init(fed.task)
    states: dict[int, Any] = {}
    prof = Profile()
    with patched(prof, fed.algorithm, ex):
        t0 = time.perf_counter()
        state, record = engine.round(state, 1, states)
        total = time.perf_counter() - t0
        times = dict(prof.times)
        t1 = time.perf_counter()
        client_eval_record(fed.algorithm, fed.task, state, 1, len(fed.partitions), engine.transport(states))
        per_client = time.perf_counter() - t1
    close = getattr(ex, "close", None)
    if close is not None:
        close()
    times["book"] = total - sum(times.values())
    return {"data": data, "algorithm": algorithm, "epochs": epochs, "round": total, "per-client eval": per_client,
            **{c: times.get(c, 0.0) for c in COLUMNS}, "accuracy": record.get("accuracy")}


def table(rows: list[dict[str, Any]]) -> str:
    head = ["data", "epochs", "algorithm", "round s", "x FedAvg", *COLUMNS, "per-client eval s"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = {(r["data"], r["epochs"]): r["round"] for r in rows if r["algorithm"] == "fedavg"}
    for r in rows:
        ref = base.get((r["data"], r["epochs"]))
        ratio = f"{r['round'] / ref:.2f}" if ref else "-"
        cells = [r["data"], str(r["epochs"]), r["algorithm"], f"{r['round']:.2f}", ratio,
                 *(f"{r[c]:.2f}" for c in COLUMNS), f"{r['per-client eval']:.2f}"]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    from kdfl.algorithms import ALGORITHMS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="mnist1d,fmnist", help="comma-separated: mnist1d, fmnist")
    ap.add_argument("--epochs", default="1,5", help="comma-separated local epochs")
    ap.add_argument("--algorithms", default="", help="comma-separated (default: the whole registry)")
    ap.add_argument("--set", action="append", default=[], help="a config override for every run (repeatable)")
    ap.add_argument("--executor", default="sequential",
                    help="client executor (only 'sequential' separates client training from the rest)")
    ap.add_argument("--repeats", type=int, default=1, help="rounds per cell (median of each column)")
    ap.add_argument("--out", type=Path, help="write the Markdown table here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    algs = [a for a in args.algorithms.split(",") if a] or list(ALGORITHMS)
    algs = ["fedavg", *[a for a in algs if a != "fedavg"]]
    rows = []
    for data in args.data.split(","):
        one_round(data, "fedavg", 1, args.set, args.executor)  # warm-up, untimed
        for epochs in (int(e) for e in args.epochs.split(",")):
            for alg in algs:
                reps = [one_round(data, alg, epochs, args.set, args.executor) for _ in range(args.repeats)]
                row = {**reps[0], **{k: statistics.median(r[k] for r in reps)
                                     for k in ("round", "per-client eval", *COLUMNS)}}
                rows.append(row)
                print(json.dumps(row), flush=True)
    text = table(rows)
    print("\n" + text)
    if args.out:
        cmd = "python " + " ".join(["benchmarks/round_cost.py", *(argv if argv is not None else sys.argv[1:])])
        args.out.write_text(f"# Round cost per algorithm\n\n`{cmd}`\n\nSeconds per round (one torch thread);"
                            f" columns as in the script's docstring.\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
