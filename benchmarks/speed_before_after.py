"""``benchmarks/speed.py`` on two versions of kdfl, in one run, side by side.

Checks out ``--before`` (default: a4a5fe0, the last commit before the algorithm-layer
redesign) into a temporary git worktree and runs ``speed.py`` (this tree's script, which
only uses APIs both versions have) alternately on the old and on the current code
(``PYTHONPATH`` selects which), ``--runs`` times each: before, after, before, after, ...
so that a slow spell of the shared machine hits both. Each run reports every runner's
speed as a ratio to the plain PyTorch loop timed in the same process; the table gives,
per model, K and runner, the median ratio of the "before" runs, of the "after" runs, and
after / before.

    python benchmarks/speed_before_after.py                       # K = 100, 1000; 2 runs each
    python benchmarks/speed_before_after.py --clients 100 --runs 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_speed(src: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "speed.py"), "--clients", *map(str, args.clients),
           "--reps", str(args.reps), "--executors", *args.executors, *(["--models", *args.models] if args.models else [])]
    env = {**os.environ, "PYTHONPATH": str(src)}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"speed.py failed on {src}:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    print(out.stdout, flush=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["ratio_vs_loop"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", default="a4a5fe0", help="git revision of the 'before' code")
    ap.add_argument("--clients", type=int, nargs="*", default=[100, 1000])
    ap.add_argument("--runs", type=int, default=2, help="speed.py runs per version (alternating)")
    ap.add_argument("--reps", type=int, default=3, help="timed rounds per runner inside each run")
    ap.add_argument("--executors", nargs="*", default=["loop", "sequential", "vectorized", "parallel", "auto"])
    ap.add_argument("--models", nargs="*", default=None, help="speed.py --models (default: all three)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "before"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), args.before], check=True,
                       capture_output=True)
        try:
            results: dict[str, list[dict]] = {"before": [], "after": []}
            for i in range(args.runs):
                for version, src in (("before", tree / "src"), ("after", ROOT / "src")):
                    print(f"# run {i + 1}/{args.runs}: {version} ({src})", flush=True)
                    results[version].append(run_speed(src, args))
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False,
                           capture_output=True)
    print(f"\n# speed.py ratios to the plain loop, median of {args.runs} runs per version, alternating "
          f"(before = {args.before}, after = working tree)")
    print("| model | K | runner | before | after | after / before |\n|---|---|---|---|---|---|")
    rows = {}
    for model, per_k in results["after"][0].items():
        for k, per_runner in per_k.items():
            for runner in per_runner:
                if runner == "loop":
                    continue
                b = statistics.median(r[model][k][runner] for r in results["before"])
                a = statistics.median(r[model][k][runner] for r in results["after"])
                rows[f"{model} K={k} {runner}"] = {"before": b, "after": a, "change": a / b}
                print(f"| {model} | {k} | {runner} | {b:.2f}x | {a:.2f}x | {a / b:.2f} |")
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
