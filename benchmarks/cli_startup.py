"""How long ``kdfl`` takes to print something, on two versions of kdfl side by side.

Each command runs as a fresh subprocess (``python -m kdfl ...``, which is what the
``kdfl`` script runs), ``--repeat`` times, alternating between the "before" code (a git
revision checked out into a temporary worktree) and this tree (``PYTHONPATH`` selects
which), so that a slow spell of the shared machine hits both. Beside the commands, the
same table times a bare interpreter (``python -c pass``: the floor no command can go
under) and the full import of the package a ``kdfl run`` needs (torch, the engine, every
algorithm, the sweep and report modules). It prints the median wall time and the median
CPU time (user + system of the child: less sensitive to other processes on the machine)
of each, and before / after. One row is a config error (a config file that does not
exist): how soon a mistake is reported.

    python benchmarks/cli_startup.py                    # before = 446433d (the eager CLI), 5 repeats
    python benchmarks/cli_startup.py --before HEAD~3 --repeat 9
    python benchmarks/cli_startup.py --before none      # this tree only
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FULL_IMPORT = ("import torch, kdfl.config, kdfl.experiment, kdfl.algorithms, kdfl.simulation.engine, "
               "kdfl.sweep, kdfl.report, kdfl.cli")
COMMANDS = {  # name -> python arguments
    "python -c pass": ["-c", "pass"],
    "kdfl --version": ["-m", "kdfl", "--version"],
    "kdfl --help": ["-m", "kdfl", "--help"],
    "kdfl run --help": ["-m", "kdfl", "run", "--help"],
    "kdfl list": ["-m", "kdfl", "list"],
    "kdfl run missing.toml (error)": ["-m", "kdfl", "run", "no-such-config.toml"],
    "full import": ["-c", FULL_IMPORT],
}


def timed(src: Path, args: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the child) of ``python ARGS`` with ``src`` first on the path."""
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != (2 if "no-such-config.toml" in args else 0):  # the config error's exit status
        raise SystemExit(f"python {' '.join(args)} failed on {src}:\n{p.stderr[-2000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", default="446433d", help="git revision of the 'before' code ('none': skip it)")
    ap.add_argument("--repeat", type=int, default=5, help="runs of each command per version (alternating)")
    ap.add_argument("--commands", nargs="*", default=list(COMMANDS), choices=list(COMMANDS), metavar="NAME",
                    help=f"which rows (default: all of {', '.join(COMMANDS)})")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"after": ROOT / "src"}
        if args.before != "none":
            tree = Path(tmp) / "before"
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), args.before],
                           check=True, capture_output=True)
            trees = {"before": tree / "src", **trees}
        try:
            times: dict[tuple[str, str], list[tuple[float, float]]] = {}
            for _ in range(args.repeat):
                for name in args.commands:
                    for version, src in trees.items():
                        times.setdefault((name, version), []).append(timed(src, COMMANDS[name]))
        finally:
            if args.before != "none":
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False,
                               capture_output=True)

    def med(name: str, version: str, i: int) -> float:
        return statistics.median(t[i] for t in times[(name, version)])

    print(f"python {sys.version.split()[0]}; median of {args.repeat} subprocess runs; "
          f"before = {args.before}, after = this tree ({ROOT})")
    cols = [f"{v} {k}" for v in trees for k in ("wall s", "CPU s")]
    if len(trees) == 2:
        cols += ["before/after wall", "before/after CPU"]
    print("| command | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for name in args.commands:
        row = [f"{med(name, v, i):.3f}" for v in trees for i in (0, 1)]
        if len(trees) == 2:
            row += [f"{med(name, 'before', i) / med(name, 'after', i):.1f}x" for i in (0, 1)]
        print(f"| {name} | " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
