"""Memory of 1,000 stateful clients: all client states in memory vs at most K in memory
and the rest in files (``run.client_states_in_memory = K``).

Each setting runs in its own process (peak RSS is per process) on the same federation:
mnist1d (20,000 samples, IID), 1,000 clients, ``local`` training (every client keeps its own MLP), every client
every round. Prints the peak resident memory, the size of the kept states and the wall
time side by side, and checks that both settings end with identical per-client metrics.

    python benchmarks/client_memory.py [--clients 1000] [--hidden 2048] [--rounds 2] [--keep 32]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time


def child(clients: int, hidden: int, rounds: int, keep: int, out: str) -> None:
    import torch

    torch.set_num_threads(1)
    from kdfl import config, experiment

    over = [
        "data.name=mnist1d", "data.num_samples=20000", f"data.num_clients={clients}", "partition.name=iid",
        "algorithm.name=local",
        f"model.arch=mlp:hidden={hidden}", "local.epochs=1", "local.batch_size=16", f"run.rounds={rounds}",
        "run.checkpoint_every=0", f"run.client_states_in_memory={keep}",
    ]
    t0 = time.perf_counter()
    hist = experiment.run(config.load(None, over), out=out)
    wall = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    n_params = sum(p.numel() for p in experiment.build(config.load(None, over)).task.new_model().parameters())
    print(json.dumps({"keep": keep, "peak_rss_mb": peak_mb, "wall_s": wall, "params_per_client": n_params,
                      "states_mb": clients * n_params * 4 / 1e6,
                      "client_eval": hist.clients["client_eval"],
                      "client_test_accuracy_mean": hist.summary["client_test_accuracy_mean"]}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--keep", type=int, default=32, help="states kept in memory in the bounded setting")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child is not None:
        child(a.clients, a.hidden, a.rounds, a.child, a.out)
        return
    rows = []
    for keep in (0, a.keep):
        with tempfile.TemporaryDirectory() as d:
            cmd = [sys.executable, __file__, "--clients", str(a.clients), "--hidden", str(a.hidden), "--rounds",
                   str(a.rounds), "--child", str(keep), "--out", d]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    same = rows[0]["client_eval"] == rows[1]["client_eval"]
    print(f"{a.clients} stateful clients (local training, mlp:hidden={a.hidden}, "
          f"{rows[0]['params_per_client']:,} parameters = {rows[0]['states_mb']:.0f} MB of kept states), "
          f"{a.rounds} rounds, every client every round\n")
    print("| client states in memory | peak RSS (MB) | wall (s) | client models' mean test accuracy |")
    print("|---|---|---|---|")
    for r in rows:
        label = "all" if r["keep"] == 0 else f"{r['keep']} (rest in files)"
        print(f"| {label} | {r['peak_rss_mb']:.0f} | {r['wall_s']:.1f} | {r['client_test_accuracy_mean']:.4f} |")
    print(f"\nidentical per-client metrics: {same}; peak RSS ratio bounded / all = "
          f"{rows[1]['peak_rss_mb'] / rows[0]['peak_rss_mb']:.2f}")


if __name__ == "__main__":
    main()
