"""Stateful clients at scale: client states in memory vs at most K in memory and the rest
in files (``run.client_states_in_memory = K``).

For each stateful algorithm -- FedMD, FD, ``local`` and FedEMA-Distill with heterogeneous
clients (three architectures round robin: ``cnn``, ``cnn:width=8``, ``mlp:hidden=256``;
the clients whose architecture is not the server's keep their own model) -- on mnist1d
(IID, ``--per-round`` clients sampled per round, the default executor):

1. at ``--compare`` clients (default 1,000): two runs, every state in memory and at most
   ``--keep`` states in memory (the rest in files); both end with the same per-client
   metrics and the same round records (checked, printed as ``identical``);
2. at ``--clients`` (default 10,000): the run with states in files, whose peak RSS must
   stay under ``--max-rss-gib`` (default 8) on one machine.

Each run is its own process (peak RSS is per process: ``ru_maxrss``); seconds per round
are each round's own wall time (``wall_seconds`` of its record: training, aggregation,
server steps and evaluation), the median over the rounds and round 1 (which pays one-off
costs: first batched traces, FedMD's transfer learning of every new client) apart; the
final per-client evaluation of every client is timed separately. The last line printed is a JSON object with every number.

    python benchmarks/client_memory.py --clients 10000 --per-round 100 --rounds 3 --compare 1000
    python benchmarks/client_memory.py --algorithms local --clients 2000 --compare 200   # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HETERO = ["model.arch=cnn", 'model.client_archs=["cnn", "cnn:width=8", "mlp:hidden=256"]',
          "model.assign=round_robin"]
ALGORITHMS: dict[str, list[str]] = {
    "fedmd": ["algorithm.name=fedmd", "data.proxy=holdout", "data.proxy_size=500", "algorithm.alignment_size=200",
              "algorithm.transfer_epochs=1", *HETERO],
    "fd": ["algorithm.name=fd", *HETERO],
    "local": ["algorithm.name=local", *HETERO],
    "fedema_distill_hetero": ["algorithm.name=fedema_distill", "data.proxy=holdout", "data.proxy_size=500",
                              "algorithm.distill.steps=20", *HETERO],
}


def overrides(alg: str, clients: int, per_round: int, rounds: int, keep: int, samples_per_client: int,
              test_size: int = 0) -> list[str]:
    return [
        "data.name=mnist1d", f"data.num_samples={samples_per_client * clients * 5 // 4 + 1000}",
        f"data.test_size={test_size}",
        f"data.num_clients={clients}", "data.client_holdout=0.2", "partition.name=iid",
        "local.epochs=1", "local.batch_size=16", "local.lr=0.05", "local.momentum=0.9",
        f"run.rounds={rounds}", f"run.clients_per_round={per_round}", "run.checkpoint_every=0", "run.threads=1",
        f"run.client_states_in_memory={keep}", *ALGORITHMS[alg],
    ]


def child(over: list[str], out: str) -> None:
    import torch

    torch.set_num_threads(1)
    from kdfl import config, experiment

    cfg = config.load(None, over)
    stamps = [time.perf_counter()]
    hist = experiment.run(cfg, out=out, on_round=lambda rec: stamps.append(time.perf_counter()))
    wall = time.perf_counter() - stamps[0]
    rounds_s = [r["wall_seconds"] for r in hist.records]  # the round itself (no data loading, no final eval)
    states = list((Path(out) / "client_states").glob("*.pt"))
    records = [{k: v for k, v in r.items() if k != "wall_seconds"} for r in hist.records]
    print(json.dumps({
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
        "wall_s": wall, "round_s": rounds_s, "final_eval_s": time.perf_counter() - stamps[-1],
        "state_files": len(states), "state_files_mb": sum(f.stat().st_size for f in states) / 2**20,
        "client_eval": hist.clients.get("client_eval"), "records": records,
        "client_test_accuracy_mean": hist.summary.get("client_test_accuracy_mean"),
        "client_accuracy_mean": hist.summary.get("client_accuracy_mean"),
    }, default=str))


def run_child(over: list[str]) -> dict:
    with tempfile.TemporaryDirectory(prefix="kdfl-client-memory-") as d:
        cmd = [sys.executable, __file__, "--child", json.dumps(over), "--out", str(Path(d) / "run")]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if res.returncode:
            raise SystemExit(f"child failed ({' '.join(over)}):\n{res.stderr[-3000:]}")
        return json.loads(res.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=10000, help="clients of the large run (states in files)")
    ap.add_argument("--compare", type=int, default=1000, help="clients of the in-memory vs files comparison (0: skip)")
    ap.add_argument("--per-round", type=int, default=100, help="clients sampled per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--keep", type=int, default=0, help="states kept in memory in the bounded runs (0: --per-round)")
    ap.add_argument("--samples-per-client", type=int, default=8, help="mnist1d training samples per client")
    ap.add_argument("--test-size", type=int, default=0,
                    help="global test samples every client's model is evaluated on (0: all, a fifth of the data)")
    ap.add_argument("--max-rss-gib", type=float, default=8.0)
    ap.add_argument("--algorithms", nargs="*", default=list(ALGORITHMS), choices=list(ALGORITHMS))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child is not None:
        child(json.loads(a.child), a.out)
        return
    keep = a.keep or a.per_round
    print(f"# {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at start; mnist1d IID, "
          f"{a.samples_per_client} training samples per client, {a.per_round} clients per round, {a.rounds} rounds, "
          f"1 local epoch; bounded runs keep {keep} states in memory; test set: "
          f"{a.test_size or 'all'}", flush=True)
    print("| algorithm | clients | client states in memory | peak RSS (MB) | s / round (median) | round 1 (s) | "
          "final per-client eval (s) | state files (MB) | client test acc (mean) |")
    print("|---|---|---|---|---|---|---|---|---|")
    summary: dict[str, dict] = {}
    for alg in a.algorithms:
        rows = []
        if a.compare:
            for k in (0, keep):
                rows.append((a.compare, k, run_child(overrides(alg, a.compare, a.per_round, a.rounds, k,
                                                               a.samples_per_client, a.test_size))))
        if a.clients:
            rows.append((a.clients, keep, run_child(overrides(alg, a.clients, a.per_round, a.rounds, keep,
                                                              a.samples_per_client, a.test_size))))
        out: dict = {}
        for n, k, r in rows:
            label = "all" if k == 0 else f"{k} (rest in files)"
            acc = r["client_test_accuracy_mean"]
            print(f"| {alg} | {n} | {label} | {r['peak_rss_mb']:.0f} | {statistics.median(r['round_s']):.2f} | "
                  f"{r['round_s'][0]:.2f} | "
                  f"{r['final_eval_s']:.1f} | {r['state_files_mb']:.0f} | "
                  f"{'-' if acc is None else f'{acc:.4f}'} |", flush=True)
            out[f"{n}/{k}"] = {key: r[key] for key in ("peak_rss_mb", "round_s", "final_eval_s", "state_files",
                                                       "state_files_mb", "client_test_accuracy_mean")}
        if a.compare:
            mem, files = rows[0][2], rows[1][2]
            out["identical"] = mem["client_eval"] == files["client_eval"] and mem["records"] == files["records"]
        if a.clients:
            out["rss_ok"] = rows[-1][2]["peak_rss_mb"] < a.max_rss_gib * 1024
        summary[alg] = out
    for alg, out in summary.items():
        if "identical" in out:
            print(f"# {alg}: per-client metrics and round records identical in memory and in files at "
                  f"{a.compare} clients: {out['identical']}")
        if "rss_ok" in out:
            print(f"# {alg}: peak RSS at {a.clients} clients under {a.max_rss_gib:g} GiB: "
                  f"{'met' if out['rss_ok'] else 'MISSED'}")
    print(f"# load average at end: {os.getloadavg()[0]:.2f}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
