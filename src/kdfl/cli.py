"""The ``kdfl`` command: run, sweep, list, partition, report."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from kdfl.errors import KdflError

log = logging.getLogger("kdfl")


def _cmd_run(args: argparse.Namespace) -> int:
    from kdfl import config

    cfg = config.load(args.config, args.set or [])  # a config error is printed before the engine is imported
    from tqdm import tqdm

    from kdfl import experiment

    out = Path(args.out) if args.out else None
    start, sent, resumes = 0, {"up": 0.0, "acc": float("nan")}, False
    if args.overwrite and args.resume:
        raise KdflError("--overwrite and --resume contradict each other: choose one")
    if args.resume and out is None:
        raise KdflError("--resume needs --out DIR: the run directory of the run to continue")
    if out is not None:
        # clear errors before the bar appears; --resume without a checkpoint starts from round 0 in place
        resumes = experiment.check_run_dir(out, args.resume, args.overwrite, cfg)
        if resumes:  # the bar continues where the run stopped (a corrupt checkpoint is a clear error)
            from kdfl.simulation import checkpoint

            ck = checkpoint.load(out)
            start = int(ck["round"])
            sent["up"] = sum(r.get("uplink_bytes", 0) for r in ck.get("records", [])) / 1e6
        elif args.resume:
            print(f"kdfl: {out} has no checkpoint yet: starting the run from round 0 in place", file=sys.stderr)
    from kdfl.simulation.rounds import RunSettings

    rounds = cfg["run"].get("rounds", RunSettings.rounds)  # a config may leave it to the default
    bar = tqdm(total=rounds, initial=start, desc="rounds", unit="round", disable=args.quiet, file=sys.stderr,
               dynamic_ncols=True)

    def on_round(rec: dict[str, Any]) -> None:
        sent["up"] += rec["uplink_bytes"] / 1e6
        sent["acc"] = rec.get("accuracy", sent["acc"])
        bar.n = rec["round"]
        bar.set_postfix(acc=f"{sent['acc']:.3f}", up_MB=f"{sent['up']:.2f}", refresh=False)
        bar.refresh()

    try:
        hist = experiment.run(cfg, out=out, resume=resumes, on_round=on_round, overwrite=args.overwrite)
    finally:  # an error after the start is printed below the bar, not into its line
        bar.close()
    s = hist.summary
    if s["final_accuracy"] is not None:
        head = (f"final test accuracy {s['final_accuracy']:.4f} (best {s['best_accuracy']:.4f}, "
                f"ECE {s['final_ece']:.4f})")
    else:
        head = "no global model (per-client metrics below)"
    print(
        f"{head} after {s['rounds']} rounds; uplink {s['uplink_bytes_per_client_round'] / 1e6:.4f} MB and downlink "
        f"{s['downlink_bytes_per_client_round'] / 1e6:.4f} MB per client per round; {s['wall_seconds']:.1f} s"
    )
    if s.get("client_accuracy_mean") is not None:
        print(f"client accuracy (held-out, {len_clients(hist)} clients): mean {s['client_accuracy_mean']:.4f}, "
              f"worst 10 % {s['client_accuracy_worst10']:.4f}, best {s['client_accuracy_best']:.4f}")
    elif s.get("client_test_accuracy_mean") is not None:
        print(f"client models on the test set: mean {s['client_test_accuracy_mean']:.4f}, worst 10 % "
              f"{s['client_test_accuracy_worst10']:.4f} (set data.client_holdout > 0 for held-out accuracy)")
    if s.get("epsilon") is not None:
        print(f"differential privacy ({s['privacy_mode']}, noise multiplier {s['noise_multiplier']}, clip {s['clip']}): "
              f"epsilon {s['epsilon']:.3g} at delta {s['delta']:g}")
    if s["target_accuracy"] is not None and s["final_accuracy"] is not None:
        print(f"rounds to target accuracy {s['target_accuracy']}: {s['rounds_to_target'] or 'not reached'}")
    if out is not None:
        print(f"run directory: {out}")
    if args.json:
        print(json.dumps(s))
    return 0


def len_clients(hist: Any) -> int:
    ce = hist.clients.get("client_eval", {})
    return len(set(ce.get("clients", [])) - set(ce.get("malicious", [])))


def _cmd_list(args: argparse.Namespace) -> int:
    from kdfl.aggregation import AGGREGATORS
    from kdfl.algorithms import ALGORITHMS
    from kdfl.attacks import ATTACKS
    from kdfl.compression import CODECS
    from kdfl.data import DATASETS, PARTITIONS
    from kdfl.models import describe
    from kdfl.simulation.executors import executor_options

    what = args.what
    if what in ("all", "algorithms"):
        print("algorithms:")
        for name, cls in ALGORITHMS.items():
            doc = (sys.modules[cls.__module__].__doc__ or "").strip().splitlines()[0]
            print(f"  {name:16s} {doc}")
    if what in ("all", "datasets"):
        print("datasets:")
        for name, spec in DATASETS.items():
            print(f"  {name:16s} {spec.description}")
    if what in ("all", "partitions"):
        print("partitions:")
        for name in PARTITIONS:
            print(f"  {name}")
        print("  natural          the data set's own per-client split (synthetic, npz with per-client arrays)")
        print("  file             rows read from partition.path (written by `kdfl partition` or by hand)")
    if what in ("all", "models"):
        try:
            shape = tuple(int(s) for s in args.input_shape.split(",")) if args.input_shape else (1, 8, 8)
        except ValueError:
            raise KdflError(f"--input-shape expects comma-separated integers such as 3,32,32, "
                            f"got {args.input_shape!r}") from None
        print(f"models (parameters for input {shape}, {args.classes} classes):")
        for name, params, desc in describe(shape, args.classes):
            print(f"  {name:12s} {params if params is not None else 'n/a':>10} {desc}")
    if what in ("all", "aggregators"):
        print("aggregators:", ", ".join(AGGREGATORS))
    if what in ("all", "attacks"):
        print("attacks:")
        for name, attack in ATTACKS.items():
            print(f"  {name:12s} [{attack.space}{', omniscient' if attack.omniscient else ''}] {attack.description}")
    if what in ("all", "codecs"):
        print("codecs:", ", ".join(CODECS))
    if what in ("all", "executors"):
        print("executors (run.executor = \"name\" or \"name:option=value,...\"):")
        for name, options in executor_options().items():
            print(f"  {name:12s} {', '.join(f'{k}={v!r}' for k, v in options.items()) or '(no options)'}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from kdfl.report import report

    out = report([Path(p) for p in args.runs], Path(args.out) if args.out else None)
    print(f"wrote {', '.join(str(p) for p in out)}")
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from kdfl import sweep

    if args.workers < 1:
        raise KdflError(f"--workers must be >= 1, got {args.workers}")
    if args.threads < 0:
        raise KdflError(f"--threads must be >= 0 (0 = torch's default), got {args.threads}")
    sw = sweep.load(args.sweep, args.set or [], args.out)
    if args.dry_run:
        for run in sw.runs():
            print(f"{sweep.run_status(run, sw.base, check=True):8s} {run.name}  ->  {run.out}")
        return 0
    if args.report_only:
        print("wrote " + ", ".join(str(p) for p in sweep.write_report(sw)))
        return 0
    counts = sweep.run_sweep(sw, workers=args.workers, threads=args.threads)
    return 1 if counts["failed"] else 0


def _cmd_partition(args: argparse.Namespace) -> int:
    from kdfl import config
    from kdfl.data.partition_file import SUFFIXES, export, write_partition

    if Path(args.out).suffix.lower() not in SUFFIXES:  # before the data set is loaded
        raise KdflError(f"--out {args.out!r} must end in .json or .npz (the partition file's format)")
    cfg = config.load(args.config, args.set or [])
    split = export(cfg)
    path = write_partition(split, args.out)
    held = sum(len(h) for h in split["holdout"]) if split["holdout"] is not None else 0
    print(f"wrote {path}: {split['num_clients']} clients holding {sum(len(c) for c in split['clients'])} training "
          f"rows ({held} more held out) of the {split['num_train']} of {split['dataset']!r}; {len(split['proxy'])} "
          f"proxy rows, {len(split['val'])} validation rows, {len(split['test'])} test rows; seed {split['seed']}, "
          f"config digest {split['config_sha256'][:12]}")
    print(f'run it with: --set partition.name=file --set partition.path={path}')
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kdfl")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "(not installed)"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kdfl", description="Federated learning with knowledge distillation.")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    p.add_argument("--version", action="version", version=f"kdfl {_version()}")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run an experiment from a TOML config")
    r.add_argument("config", nargs="?", help="config file (configs/*.toml); defaults apply to missing keys")
    r.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config value")
    r.add_argument("--out", metavar="DIR", help="run directory: config, metrics.jsonl, summary.json, checkpoints")
    r.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    r.add_argument("--overwrite", action="store_true", help="replace a run already in --out (else that is an error)")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.add_argument("--json", action="store_true", help="also print the summary as JSON")
    r.set_defaults(fn=_cmd_run)
    sw = sub.add_parser("sweep", help="run a grid of configs over seeds in worker processes; one table (resumable)")
    sw.add_argument("sweep", metavar="SWEEP.toml", help="sweep file: base config, [set], [grid], [methods.*], [tune]")
    sw.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    sw.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1; 0 = torch's default)")
    sw.add_argument("--out", metavar="DIR", help="sweep directory (default: the file's 'out', else runs/<file stem>)")
    sw.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a value in every run")
    sw.add_argument("--dry-run", action="store_true", help="list the runs and their status; run nothing")
    sw.add_argument("--report-only", action="store_true", help="aggregate the finished runs; run nothing")
    sw.set_defaults(fn=_cmd_sweep)
    ls = sub.add_parser("list", help="list algorithms, models, data sets, partitions, aggregators, attacks, codecs, executors")
    ls.add_argument("what", nargs="?", default="all",
                    choices=["all", "algorithms", "models", "datasets", "partitions", "aggregators", "attacks", "codecs",
                             "executors"])
    ls.add_argument("--input-shape", help="input shape for model parameter counts, e.g. 3,32,32")
    ls.add_argument("--classes", type=int, default=10)
    ls.set_defaults(fn=_cmd_list)
    pa = sub.add_parser("partition", help="write the split a config produces (client, proxy, validation, test rows)")
    pa.add_argument("config", nargs="?", help="config file (configs/*.toml); defaults apply to missing keys")
    pa.add_argument("--out", required=True, metavar="FILE", help="the partition file to write: .json or .npz")
    pa.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config value")
    pa.set_defaults(fn=_cmd_partition)
    rep = sub.add_parser("report", help="plots and a Markdown table for one or more run directories")
    rep.add_argument("runs", nargs="+", metavar="RUN_DIR")
    rep.add_argument("--out", metavar="DIR", help="where to write (default: the first run directory)")
    rep.set_defaults(fn=_cmd_report)
    return p


def interrupted(args: argparse.Namespace, argv: list[str]) -> str:
    """What a Ctrl-C left behind and the command that goes on from there."""
    if args.command == "sweep":
        return ("interrupted; finished runs are kept: run the same command again to continue (an unfinished run "
                "goes on from its last checkpoint, or starts again when it has none)")
    if args.command != "run":
        return "interrupted"
    if not args.out:
        return "interrupted; nothing was saved (no --out): run the command again to start over"
    import shlex

    # the same command with --resume (and without --overwrite: the files to resume from are there now)
    again = "kdfl " + shlex.join([*(a for a in argv if a != "--overwrite"), *([] if args.resume else ["--resume"])])
    out = Path(args.out)
    from kdfl.simulation import checkpoint

    if not ((out / checkpoint.FILE).is_file() or (out / checkpoint.PREV).is_file()):
        return (f"interrupted before the first checkpoint in {out}: `{again}` starts the run again from round 0 "
                "there")
    try:
        done = int(checkpoint.load(out)["round"])
    except (KdflError, OSError):  # `--resume` names the recovery (e.g. which checkpoint to rename)
        return f"interrupted; `{again}` goes on from the checkpoint in {out}, or says how to recover it"
    return f"interrupted; {out} holds a checkpoint after round {done}: `{again}` continues from round {done + 1}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    if "" not in sys.path and os.getcwd() not in sys.path:
        # as `python -m`: a user algorithm module in the working directory is importable
        # (algorithm.name = "mymodule:MyAlgorithm")
        sys.path.insert(0, os.getcwd())
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.fn(args))
    except KdflError as e:
        print(f"kdfl: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"kdfl: {interrupted(args, argv)}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `kdfl list | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
