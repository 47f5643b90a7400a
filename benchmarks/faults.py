"""Fault table: each fault injected for real into a real kdfl run, read back from the run's
own records (``metrics.jsonl``: ``failed``, ``rejected``, ``late``, ``dropped``;
``summary.json``; the logged reasons; exit codes and messages of ``kdfl run``).

The runs are tiny (digits, 10 clients, MLP, FedAvg, sequential executor, one torch
thread): a few seconds each, except the Flower deployment (about 100 s). How each fault
is injected (only the injection point is patched, in this process; the round driver, the
transport, the codecs, the wire format, the checkpoints and the CLI run unchanged):

1. client raises: ``kdfl.simulation.engine.make_client`` is wrapped so that client 3 in
   round 2 gets its training inputs cut to shape (n, 1, 8, 7) instead of (n, 1, 8, 8):
   the MLP's first layer cannot multiply 56 features and the client's training raises.
2. codec overflow: ``compression.uplink = "fp16"``; ``kdfl.algorithms.program.run_client``
   (the client program the executor runs) is wrapped so that client 3's upload in round 2
   has one entry set to 1e6 (outside float16's range) before the transport compresses it.
3. NaN upload: as 2 with the default fp32 uplink, the entry set to NaN.
4. truncated upload: client 3's upload in round 2 is tagged in the wrapped ``run_client``
   and ``kdfl.wire.encode`` is wrapped to cut the tagged payload's bytes in half (what
   the server receives).
5. oversized upload: ``run.max_upload_bytes`` = a clean upload's size + 1 KiB, and the
   tagged bytes get 4 KiB of padding appended.
6. dropouts: ``run.dropout = 0.3`` (the round driver drops the sampled clients itself),
   20 clients, 10 rounds.
7. stragglers: ``run.deadline = 0.2`` simulated seconds with ``run.speed_spread = 1.0``.
8. a SuperNode killed: ``tests/flower/test_flower_deployment_faults.py`` is run as is (a
   real SuperLink and three SuperNodes on 127.0.0.1, FedEMA-Distill, 2 rounds): it
   SIGKILLs SuperNode 1 and its ClientApp processes as soon as round 1 is recorded, while
   round 2 starts. Its run directory is read afterwards. ``--no-flower`` skips it.
9. server killed: ``kdfl run`` as a subprocess gets SIGKILL once round 3 of 8 appears in
   its ``metrics.jsonl``; ``kdfl run --resume`` continues it, and its records, summary,
   per-client metrics and final parameters are compared with a straight ``kdfl run``
   (``wall_seconds`` aside).
10. corrupted checkpoint: a copy of the killed run directory gets one byte of
    ``checkpoint.pt`` flipped; ``kdfl run --resume`` must exit with code 2 and a message
    naming ``checkpoint.prev.pt``; the recovery that message suggests (rename it to
    ``checkpoint.pt``) is then applied and the resumed run compared with the straight run.

Every in-process fault also runs a clean twin (the same config without the injection) to
say what the fault cost in final accuracy.

    python benchmarks/faults.py                # about 2-3 minutes; writes benchmarks/results/faults.md
    python benchmarks/faults.py --no-flower    # without the Flower deployment (about 30 s)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KDFL = Path(sys.executable).parent / "kdfl"
BASE = ["data.name='digits'", "data.num_clients=10", "partition.name='iid'", "model.arch='mlp'",
        "local.epochs=1", "local.batch_size=16", "local.lr=0.05", "local.momentum=0.9",
        "algorithm.name='fedavg'", "run.threads=1", "run.executor='sequential'", "run.seed=0"]
VICTIM, FAULT_ROUND = 3, 2  # the faulty client and the round of the fault (in-process faults)


@dataclass
class Row:
    fault: str
    injected: str
    survived: str
    rounds: str
    evidence: str
    lost: str


# -- injection points -------------------------------------------------------------------
@contextlib.contextmanager
def patched(obj: Any, name: str, wrap: Callable[[Any], Any]) -> Iterator[None]:
    old = getattr(obj, name)
    setattr(obj, name, wrap(old))
    try:
        yield
    finally:
        setattr(obj, name, old)


class Injection:
    """What to do to client VICTIM in round FAULT_ROUND; ``fired`` counts the injections."""

    def __init__(self, kind: str) -> None:
        self.kind, self.fired = kind, 0
        self.tagged: dict[str, Any] | None = None  # the upload whose bytes are cut or padded

    def hit(self, client_id: int, round_num: int) -> bool:
        return client_id == VICTIM and round_num == FAULT_ROUND

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        from kdfl import wire
        from kdfl.algorithms import program
        from kdfl.simulation import engine

        with contextlib.ExitStack() as stack:
            if self.kind == "shape":
                stack.enter_context(patched(engine, "make_client", self._make_client))
            else:
                stack.enter_context(patched(program, "run_client", self._run_client))
            if self.kind in ("truncate", "pad"):
                stack.enter_context(patched(wire, "encode", self._encode))
            yield

    def _make_client(self, make: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(task: Any, rows: Any, info: Any, state: Any, threat: Any) -> Any:
            client = make(task, rows, info, state, threat)
            if self.hit(info.id, info.round):
                from kdfl.types import TensorData

                self.fired += 1
                x = client.data.x[..., :7]  # wrongly shaped inputs: (n, 1, 8, 7)
                client = dataclasses.replace(client, data=TensorData(x, client.data.y))
            return client

        return wrapped

    def _run_client(self, run: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(algorithm: Any, task: Any, downlink: Any, client: Any) -> Any:
            update = run(algorithm, task, downlink, client)
            if not self.hit(client.id, client.round):
                return update
            self.fired += 1
            payload = dict(update.payload)
            if self.kind in ("huge", "nan"):
                key = next(k for k, v in payload.items() if v.is_floating_point())
                t = payload[key].clone()
                t.view(-1)[0] = 1e6 if self.kind == "huge" else math.nan
                payload[key] = t
            self.tagged = payload  # the transport encodes this very dict (no codec: pack is the identity)
            return dataclasses.replace(update, payload=payload)

        return wrapped

    def _encode(self, encode: Callable[..., bytes]) -> Callable[..., bytes]:
        def wrapped(payload: Any) -> bytes:
            buf = encode(payload)
            if payload is self.tagged:
                self.tagged = None
                return buf[: len(buf) // 2] if self.kind == "truncate" else buf + bytes(4096)
            return buf

        return wrapped


class Captured(logging.Handler):
    """The kdfl loggers' messages (warnings, and the round driver's straggler notes)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def run_in_process(out: Path, sets: list[str], injection: Injection | None = None
                   ) -> tuple[list[dict[str, Any]], dict[str, Any], list[str]]:
    """One run into ``out``; returns its metrics.jsonl records, summary.json and log lines."""
    from kdfl import config, experiment

    cfg = config.load(None, [*BASE, *sets])
    handler, logger = Captured(), logging.getLogger("kdfl")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with injection.active() if injection is not None else contextlib.nullcontext():
            experiment.run(cfg, out=out, overwrite=True)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    if injection is not None and injection.fired != 1:
        raise RuntimeError(f"injection {injection.kind!r} fired {injection.fired} times, expected once")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return records, json.loads((out / "summary.json").read_text()), handler.messages


# -- table helpers ----------------------------------------------------------------------
def cell(text: str, limit: int = 160) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def per_round(records: list[dict[str, Any]], key: str) -> str:
    hits = [f"round {r['round']}: {key}={r.get(key, [])}" for r in records if r.get(key)]
    return "; ".join(hits) if hits else f"no {key} client in any round"


def reason(messages: list[str], client: int, words: str) -> str:
    return next((m for m in messages if f"client {client} " in m and words in m), "(no log message)")


def rounds_cell(summary: dict[str, Any] | None, planned: int) -> str:
    return f"{summary['rounds'] if summary else 0} of {planned}"


def survived(summary: dict[str, Any] | None, planned: int) -> str:
    return "yes" if summary is not None and summary.get("rounds") == planned else "no"


def acc(summary: dict[str, Any]) -> str:
    a = summary.get("final_accuracy")
    return "n/a" if a is None else f"{a:.4f}"


def upload_fault(work: Path, n: int, title: str, how: str, kind: str, sets: list[str], expect: str,
                 words: str) -> Row:
    """Faults 1-5: one injected upload fault of client VICTIM in round FAULT_ROUND, plus a clean twin."""
    rounds = 3
    sets = [f"run.rounds={rounds}", *sets]
    records, summary, messages = run_in_process(work / f"f{n}", sets, Injection(kind))
    _, clean, _ = run_in_process(work / f"f{n}_clean", sets)
    hit = records[FAULT_ROUND - 1]
    uploads = len(hit["clients"]) - len(hit["dropped"])
    seen = hit.get(expect) == [VICTIM] and all(not r.get(expect) for r in records if r is not hit)
    others = {k: sum(len(r.get(k, [])) for r in records) for k in ("failed", "rejected", "late", "dropped")}
    evidence = (f"{per_round(records, expect)}{'' if seen else ' (UNEXPECTED)'}; summary "
                f"{'failed_clients' if expect == 'failed' else 'rejected_payloads'}="
                f"{summary['failed_clients' if expect == 'failed' else 'rejected_payloads']}; "
                f"other faults: {', '.join(f'{k} {v}' for k, v in others.items() if k != expect)}; log: "
                f"\"{reason(messages, VICTIM, words)}\"")
    lost = (f"client {VICTIM}'s upload in round {FAULT_ROUND} ({len(hit[expect])} of {uploads}); "
            f"final accuracy {acc(summary)} vs {acc(clean)} without the fault")
    return Row(f"{n}. {title}", how, survived(summary, rounds), rounds_cell(summary, rounds), cell(evidence, 400),
               lost)


def dropout_fault(work: Path) -> Row:
    rounds = 10
    sets = [f"run.rounds={rounds}", "data.num_clients=20"]
    records, summary, _ = run_in_process(work / "f6", [*sets, "run.dropout=0.3"])
    _, clean, _ = run_in_process(work / "f6_clean", sets)
    dropped = sum(len(r["dropped"]) for r in records)
    sampled = sum(len(r["clients"]) for r in records)
    per = ", ".join(str(len(r["dropped"])) for r in records)
    evidence = (f"dropped per round: {per} (total {dropped} of {sampled} sampled, "
                f"{100 * dropped / sampled:.0f} %, each with probability 0.3); failed "
                f"{summary['failed_clients']}, rejected {summary['rejected_payloads']}")
    lost = (f"the {dropped} dropped clients' rounds (never trained nor sent); final accuracy {acc(summary)} "
            f"vs {acc(clean)} without dropouts")
    return Row("6. 30 % dropouts", "`run.dropout=0.3` (20 clients)", survived(summary, rounds),
               rounds_cell(summary, rounds), evidence, lost)


def straggler_fault(work: Path) -> Row:
    rounds = 3
    sets = [f"run.rounds={rounds}", "run.deadline=0.2", "run.speed_spread=1.0"]
    records, summary, messages = run_in_process(work / "f7", sets)
    _, clean, _ = run_in_process(work / "f7_clean", [f"run.rounds={rounds}"])
    late = sorted({c for r in records for c in r["late"]})
    late_bytes = sum(r["uplink_bytes_per_client"] * len(r["late"]) for r in records)
    notes = sum("straggler" in m for m in messages)
    sim = ", ".join(f"{r['sim_seconds']:.3g}" for r in records)
    evidence = (f"late per round: {', '.join(str(len(r['late'])) for r in records)} (clients {late}); summary "
                f"late_clients={summary['late_clients']}; {notes} straggler log lines; sim_seconds "
                f"{sim}")
    lost = (f"{summary['late_clients']} late uploads ({late_bytes / 1e3:.0f} kB sent and counted, never "
            f"aggregated); final accuracy {acc(summary)} vs {acc(clean)} without a deadline")
    return Row("7. stragglers past the deadline", "`run.deadline=0.2`, `run.speed_spread=1.0` (simulated s)",
               survived(summary, rounds), rounds_cell(summary, rounds), evidence, lost)


# -- faults of processes: the CLI and Flower --------------------------------------------
def kdfl_cli(*args: str, **kw: Any) -> subprocess.Popen[str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([str(KDFL), *args], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def cli_sets(rounds: int) -> list[str]:
    return [a for s in [*BASE, f"run.rounds={rounds}", "run.checkpoint_every=1"] for a in ("--set", s)]


def compare_runs(a: Path, b: Path) -> list[str]:
    """What differs between two finished run directories, ``wall_seconds`` aside."""
    from kdfl.simulation import checkpoint

    def records(d: Path) -> list[dict[str, Any]]:
        return [{k: v for k, v in json.loads(line).items() if k != "wall_seconds"}
                for line in (d / "metrics.jsonl").read_text().splitlines()]

    diffs = []
    if records(a) != records(b):
        diffs.append("metrics.jsonl")
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    sa.pop("wall_seconds"), sb.pop("wall_seconds")
    if sa != sb:
        diffs.append("summary.json")
    if (a / "clients.json").read_text() != (b / "clients.json").read_text():
        diffs.append("clients.json")
    pa, pb = (checkpoint.load(d)["state"].params for d in (a, b))
    if pa.keys() != pb.keys() or any(not torch.equal(pa[k], pb[k]) for k in pa):
        diffs.append("final parameters")
    return diffs


def same_as_straight(diffs: list[str], n: int) -> str:
    if diffs:
        return f"differs from a straight run in: {', '.join(diffs)}"
    return (f"nothing: records ({n} rounds), summary, per-client metrics and final parameters bit-identical to "
            "a straight run (wall time aside)")


def server_kill_faults(work: Path) -> tuple[Row, Row]:
    """Faults 9 and 10: SIGKILL of ``kdfl run`` after round 3 of 8, resume; a corrupted checkpoint."""
    from kdfl.simulation import checkpoint

    rounds, kill_after = 8, 3
    straight, killed = work / "f9_straight", work / "f9_killed"
    p = kdfl_cli("run", "--out", str(straight), "--quiet", *cli_sets(rounds))
    _, err = p.communicate(timeout=600)
    if p.returncode != 0:
        raise RuntimeError(f"the straight run failed ({p.returncode}): {err[-2000:]}")

    # 9: kill -9 of the server once round kill_after is in metrics.jsonl
    metrics = killed / "metrics.jsonl"
    p = kdfl_cli("run", "--out", str(killed), "--quiet", *cli_sets(rounds))
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= kill_after):
        if p.poll() is not None:
            raise RuntimeError(f"kdfl run ended before round {kill_after}: {p.communicate()[1][-2000:]}")
        time.sleep(0.01)
    os.kill(p.pid, signal.SIGKILL)
    p.communicate(timeout=60)
    seen = len(metrics.read_text().splitlines())
    finished = (killed / "summary.json").exists()
    ck_round = checkpoint.load(killed)["round"]
    corrupt = work / "f10_corrupt"
    shutil.copytree(killed, corrupt)  # the killed directory as it was, for fault 10
    r = kdfl_cli("run", "--out", str(killed), "--resume", "--quiet", *cli_sets(rounds))
    _, err = r.communicate(timeout=600)
    resumed = json.loads((killed / "summary.json").read_text()) if r.returncode == 0 else None
    diffs = compare_runs(killed, straight) if resumed else ["(no resumed run)"]
    span = f"round {seen}" if seen == ck_round + 1 else f"rounds {ck_round + 1}-{seen}"
    redone = f"the work of {span} (recorded, not yet checkpointed: run again); " if seen > ck_round else ""
    evidence9 = (f"SIGKILL (exit {p.returncode}) with {seen} of {rounds} rounds in metrics.jsonl"
                 f"{', summary already written (too late)' if finished else ''}; last checkpoint: round "
                 f"{ck_round}; `kdfl run --resume` exit {r.returncode}, resumed at round {ck_round + 1}")
    row9 = Row("9. server killed (kill -9 of `kdfl run`)",
               f"`kdfl run` subprocess, SIGKILL once round {kill_after} of {rounds} is in metrics.jsonl, then "
               "`kdfl run --resume`", survived(resumed, rounds), rounds_cell(resumed, rounds), evidence9,
               (redone + same_as_straight(diffs, rounds)) if resumed else cell(err[-300:]))

    # 10: one flipped byte in checkpoint.pt, then --resume; then the recovery the message suggests
    path = corrupt / checkpoint.FILE
    data = bytearray(path.read_bytes())
    offset = len(data) // 2
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
    r = kdfl_cli("run", "--out", str(corrupt), "--resume", "--quiet", *cli_sets(rounds))
    _, err = r.communicate(timeout=600)
    message = next((line for line in err.splitlines() if line.startswith("kdfl: error")), err.strip()[-300:])
    message = message.replace(str(corrupt), "RUN_DIR")
    names_prev = checkpoint.PREV in message
    recovery, rec_summary, rec_diffs, prev_round = "none suggested", None, ["(no recovery)"], None
    if names_prev and f"rename it to {checkpoint.FILE}" in message:
        os.replace(corrupt / checkpoint.PREV, path)  # what the message says to do
        prev_round = checkpoint.load(corrupt)["round"]
        r2 = kdfl_cli("run", "--out", str(corrupt), "--resume", "--quiet", *cli_sets(rounds))
        _, err2 = r2.communicate(timeout=600)
        recovery = (f"renamed {checkpoint.PREV} (round {prev_round}) to {checkpoint.FILE}: `--resume` exit "
                    f"{r2.returncode}")
        if r2.returncode == 0:
            rec_summary = json.loads((corrupt / "summary.json").read_text())
            rec_diffs = compare_runs(corrupt, straight)
        else:
            recovery += f" ({cell(err2[-200:])})"
    evidence10 = (f"`kdfl run --resume` exit {r.returncode} (expected 2), names {checkpoint.PREV}: "
                  f"{'yes' if names_prev else 'no'}; message: \"{cell(message, 400)}\"; recovery: {recovery}")
    survived10 = (f"refused cleanly (exit {r.returncode}); after the suggested recovery: "
                  f"{survived(rec_summary, rounds)}")
    lost10 = "no recovery"
    if rec_summary is not None and prev_round is not None:
        lost10 = (f"the corrupted checkpoint's progress: resumed after round {prev_round} instead of {ck_round} "
                  f"(round {ck_round} run again); otherwise {same_as_straight(rec_diffs, rounds)}")
    row10 = Row("10. corrupted checkpoint", f"one byte of checkpoint.pt (round {ck_round}) flipped at offset "
                f"{offset} of {len(data)}, then `kdfl run --resume`", survived10, rounds_cell(rec_summary, rounds),
                evidence10, lost10)
    return row9, row10


def flower_fault(work: Path) -> Row:
    """Fault 8: tests/flower/test_flower_deployment_faults.py, run as is, then its records read."""
    sys.path.insert(0, str(ROOT / "tests" / "flower"))
    import test_flower_deployment_faults as t  # a real SuperLink and three SuperNodes on 127.0.0.1

    tmp = work / "f8"
    tmp.mkdir()
    outcome = "its assertions hold"
    try:
        t.test_killed_supernode_is_a_failed_client_and_the_run_completes(tmp)
    except AssertionError as e:
        outcome = f"its assertions fail: {cell(str(e), 200)}"
    out = tmp / "out"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()] \
        if (out / "metrics.jsonl").exists() else []
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else None
    log_text = (tmp / "flwr_run.log").read_text()
    logged = [line.strip() for line in log_text.splitlines() if "failed" in line and "round 2" in line]
    planned = 2
    evidence = (f"{per_round(records, 'failed')}; summary failed_clients="
                f"{summary['failed_clients'] if summary else 'n/a'}; uplink bytes per round "
                f"{[r['uplink_bytes'] for r in records]}; the test's check: {outcome}; streamed log: "
                f"\"{cell(logged[0] if logged else '(none)', 200)}\"")
    lost = (f"client 1's upload in round 2 (its node is gone); final accuracy "
            f"{acc(summary) if summary else 'n/a'} (examples/flower_app: FedEMA-Distill on mnist1d, 2 rounds; "
            "no clean twin)")
    return Row("8. a SuperNode killed (Flower deployment)",
               "SIGKILL to SuperNode 1 (of 3) and its ClientApp processes once round 1 is recorded, round 2 "
               f"starting; reply timeout {t.REPLY_TIMEOUT_S} s (`kdfl-timeout-s`)",
               survived(summary, planned), rounds_cell(summary, planned), evidence, lost)


def table(rows: list[Row]) -> str:
    lines = ["| fault | injected how | survived | rounds completed | evidence (the run's records) | lost |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r.fault} | {r.injected} | {r.survived} | {r.rounds} | {r.evidence} | {r.lost} |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--no-flower", action="store_true", help="skip the Flower deployment fault (about 100 s)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "faults.md"), help="Markdown table")
    p.add_argument("--keep", metavar="DIR", help="keep the run directories here (default: a temporary directory)")
    args = p.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="kdfl_faults_"))
    if args.keep and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []

    def add(row: Row) -> None:
        rows.append(row)
        print(f"  {row.fault}: survived {row.survived}, {row.rounds} rounds ({time.perf_counter() - t0:.0f} s)",
              file=sys.stderr, flush=True)

    try:
        fault_at = f"client {VICTIM}, round {FAULT_ROUND}"
        add(upload_fault(work, 1, "client raises during local training",
                         f"{fault_at}: its training inputs cut to shape (n, 1, 8, 7) (the MLP expects 8x8)",
                         "shape", [], "failed", "failed"))
        add(upload_fault(work, 2, "codec overflow (fp16 uplink)",
                         f"`compression.uplink=fp16`; {fault_at}: one entry of its upload set to 1e6", "huge",
                         ["compression.uplink='fp16'"], "failed", "failed"))
        add(upload_fault(work, 3, "NaN upload", f"{fault_at}: one entry of its upload set to NaN", "nan", [],
                         "rejected", "rejected"))
        add(upload_fault(work, 4, "truncated upload", f"{fault_at}: its encoded upload cut to half its bytes",
                         "truncate", [], "rejected", "rejected"))
        _, clean, _ = run_in_process(work / "size_probe", ["run.rounds=1"])
        limit = int(clean["uplink_bytes_per_client_round"]) + 1024
        add(upload_fault(work, 5, "oversized upload",
                         f"`run.max_upload_bytes={limit}` (a clean upload + 1 KiB); {fault_at}: 4 KiB appended "
                         "to its encoded upload", "pad", [f"run.max_upload_bytes={limit}"], "rejected", "rejected"))
        add(dropout_fault(work))
        add(straggler_fault(work))
        if not args.no_flower:
            add(flower_fault(work))
        row9, row10 = server_kill_faults(work)
        add(row9)
        add(row10)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    seconds = time.perf_counter() - t0
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = (f"# Faults\n\nCommand: `{command_line()}`\n\nRun on {when}, {seconds:.0f} s in all "
            f"(2-core shared machine). In-process and `kdfl run` faults: `{' '.join(BASE)}` (faulty client "
            f"{VICTIM}, round {FAULT_ROUND}); the Flower fault: the slow test "
            f"`tests/flower/test_flower_deployment_faults.py`, run as is.\n\n{table(rows)}\n")
    if args.no_flower:
        text += "\nFault 8 (a SuperNode killed on Flower) was skipped (`--no-flower`).\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
