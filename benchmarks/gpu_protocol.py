"""Round times of a protocol sweep's methods on a GPU, at the size given (full size by default).

For each method of a sweep file (its first tuning value, one seed), runs a few rounds with
``run.device = "cuda"`` under each executor asked for and prints seconds per round (the
median over rounds after the first, which pays for CUDA's start), the accuracy reached,
and what a whole run and the whole sweep would take at that rate. Writes a Markdown table.

    python benchmarks/gpu_protocol.py benchmarks/protocol/fedema_clean_fmnist.toml \
        --rounds 3 --executors sequential,vectorized --out gpu_protocol.md

``--full`` runs every run of the sweep to the end instead (``--workers`` processes sharing
the GPU) and reports their wall times; ``--set`` overrides apply to every run. The default
``--set`` is the protocol's full size of Fashion-MNIST (all 54,000 client images, the whole
test set, a 5,000-image proxy, 100 rounds; benchmarks/PROTOCOL.md).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

FULL_SIZE = ["data.pool_size=0", "data.test_size=0", "data.proxy_size=5000", "run.rounds=100"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--executors", default="sequential,vectorized")
    ap.add_argument("--methods", default="", help="comma-separated subset of the sweep's methods")
    ap.add_argument("--set", action="append", default=None, help="override (repeatable); default: full size")
    ap.add_argument("--out", default="")
    ap.add_argument("--full", action="store_true", help="run the whole sweep instead of timing rounds")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--device", default="cuda", help="cuda (default), or cpu to try the script on a small size")
    args = ap.parse_args()

    import torch

    from kdfl import sweep

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: this benchmark needs one", file=sys.stderr)
        return 2
    extra = [*(args.set if args.set is not None else FULL_SIZE), f"run.device={args.device}"]
    sw = sweep.load(args.sweep, extra)
    base = [] if sw.base is None else [str(sw.base)]
    gpu = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    lines = [f"# {Path(args.sweep).name} on {gpu}", "", f"overrides: `{' '.join(extra)}`", ""]
    if args.full:
        t0 = time.perf_counter()
        counts = sweep.run_sweep(sw, workers=args.workers)
        lines.append(f"whole sweep: {len(sw.runs())} runs, {counts}, {time.perf_counter() - t0:.0f} s wall "
                     f"with {args.workers} workers")
    else:
        methods = [m for m in sw.methods if not args.methods or m in args.methods.split(",")]
        runs_of = {m: sum(r.method == m for r in sw.runs()) for m in methods}  # a method's own tuning candidates count
        lines += ["| method | executor | s/round (median after round 1) | first round s | accuracy after "
                  f"{args.rounds} rounds | failed clients | one run (est.) s | its runs (est.) s |",
                  "|---|---|---|---|---|---|---|---|"]
        total = {}
        for method in methods:
            tunings = sw.tunings(method)
            ov = sw.overrides(method, sw.cells()[0], tunings[0] if tunings else (), sw.seeds[0])
            for ex in args.executors.split(","):
                cfg_ov = [*ov, f"run.executor={ex}"]
                try:
                    times, info = time_rounds_from(base, cfg_ov, args.rounds)
                except Exception as e:  # a failure is a row, not the end of the table
                    lines.append(f"| {method} | {ex} | failed: {type(e).__name__}: {str(e)[:200]} | | | | | |")
                    print(lines[-1], flush=True)
                    continue
                per = statistics.median(times[1:]) if len(times) > 1 else times[0]
                one = per * info["full_rounds"]
                total[method] = min(total.get(method, float("inf")), one * runs_of[method])
                acc = info["accuracy"]
                lines.append(f"| {method} | {ex} | {per:.2f} | {times[0]:.2f} | "
                             f"{'-' if acc is None else format(acc, '.4f')} | {info['failed']} | {one:.0f} | "
                             f"{one * runs_of[method]:.0f} ({runs_of[method]}) |")
                print(lines[-1], flush=True)
        lines += ["", f"whole sweep at the faster executor per method (est.): {sum(total.values()) / 3600:.2f} "
                  "GPU hours, one run at a time"]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


def time_rounds_from(base: list[str], overrides: list[str], rounds: int) -> tuple[list[float], dict]:
    import torch

    from kdfl import config, experiment

    cfg = config.load(base[0] if base else None, overrides)
    full_rounds = cfg["run"]["rounds"]
    cfg["run"]["rounds"] = rounds
    stamps: list[float] = []

    def on_round(rec: dict) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    t0 = time.perf_counter()
    hist = experiment.run(cfg, on_round=on_round)
    times = [b - a for a, b in zip([t0, *stamps[:-1]], stamps, strict=True)]
    return times, {"full_rounds": full_rounds, "accuracy": hist.records[-1].get("accuracy"),
                   "failed": sum(len(r["failed"]) for r in hist.records)}


if __name__ == "__main__":
    sys.exit(main())
