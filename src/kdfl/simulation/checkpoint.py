"""Checkpoints: everything a run needs to continue bit-for-bit after a kill.

A checkpoint holds the round, the algorithm's typed server state, the clients' kept
states and the records so far, tagged with a format version: checkpoints written before
typed states (format 1, an untyped ``extra`` dict) cannot be resumed, and say so.

Checkpoints cannot lie: each is written to a temporary file, followed by a trailer with
the SHA-256 of everything before it, and renamed into place only once complete; the
previous checkpoint is kept as ``checkpoint.prev.pt`` until then. Loading verifies the
checksum, so a truncated, altered or foreign file is a clear error that names the
previous checkpoint when there is one.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from pathlib import Path
from typing import IO, Any, cast

import torch

from kdfl.types import KdflError, ServerState

log = logging.getLogger(__name__)

FILE = "checkpoint.pt"
PREV = "checkpoint.prev.pt"  # the checkpoint before the last one
FORMAT = 2  # 2: typed ServerState subclasses and ClientState; 1 (no "format" key): ServerState.extra dicts
TAG = b"\nKDFL-SHA256:"  # trailer: TAG + 64 hex digits + b"\n"
TRAILER = len(TAG) + 64 + 1


def save(run_dir: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` plus its checksum to a temporary file, keep the current
    checkpoint as :data:`PREV`, then rename the new one into place: a kill at any moment
    leaves a complete checkpoint (the new one, or the previous one under one of the names)."""
    tmp = run_dir / (FILE + ".tmp")
    h = hashlib.sha256()
    with open(tmp, "wb") as f:
        torch.save({**payload, "format": FORMAT}, cast(IO[bytes], _Hashing(f, h)))
        f.write(TAG + h.hexdigest().encode() + b"\n")
        f.flush()
        os.fsync(f.fileno())
    if (run_dir / FILE).exists():
        # PREV becomes a second name of the current file (a hard link, renamed into place), so
        # FILE exists at every moment: the old checkpoint until the new one replaces it
        link = run_dir / (PREV + ".tmp")
        link.unlink(missing_ok=True)
        try:
            os.link(run_dir / FILE, link)
            os.replace(link, run_dir / PREV)
        except OSError:  # no hard links on this file system: a kill right here leaves only PREV (load says so)
            os.replace(run_dir / FILE, run_dir / PREV)
    os.replace(tmp, run_dir / FILE)


class _Hashing(io.RawIOBase):
    """A write-only file that hashes what passes through it."""

    def __init__(self, f: Any, h: Any) -> None:
        super().__init__()
        self.f, self.h = f, h

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self.h.update(b)
        return int(self.f.write(b))


def _complete(path: Path) -> bool:
    """Does ``path`` hold a whole checkpoint (its checksum trailer present and matching)?"""
    try:
        data = path.read_bytes()
    except OSError:
        return False
    body, trailer = data[:-TRAILER], data[-TRAILER:]
    return (len(data) >= TRAILER and trailer.startswith(TAG)
            and hashlib.sha256(body).hexdigest().encode() == trailer[len(TAG):].strip())


def _read_verified(path: Path) -> bytes:
    """The checkpoint's bytes without the trailer, after checking the checksum."""
    data = path.read_bytes()
    body, trailer = data[:-TRAILER], data[-TRAILER:]
    if len(data) < TRAILER or not trailer.startswith(TAG):
        # kdfl before checksums (or not kdfl at all: torch.load and the format check decide)
        log.warning("%s has no checksum (written by an earlier kdfl?): loading it unverified", path)
        return data
    want = trailer[len(TAG):-1].decode(errors="replace")
    got = hashlib.sha256(body).hexdigest()
    if got != want:
        raise ValueError(f"checksum mismatch (stored {want[:12]}..., computed {got[:12]}...): the file is altered "
                         "or incomplete")
    return body


def load(run_dir: Path) -> dict[str, Any]:
    path = run_dir / FILE
    prev = run_dir / PREV
    again = "start the run again with --overwrite in place of --resume"
    fallback = (f"; the previous checkpoint is {prev}: rename it to {FILE} to resume from it, or {again}"
                if prev.exists() else f"; {again}")
    if not path.exists():
        tmp = run_dir / (FILE + ".tmp")
        if _complete(tmp):
            newest = f"; {tmp.name} is complete and newer: rename it to {FILE} to resume from it (or {PREV})"
        else:
            newest = f": rename {PREV} to {FILE} to resume from it"
        if prev.exists():
            raise KdflError(f"cannot resume: no {FILE} in {run_dir}, only {PREV} (a save was interrupted){newest}")
        raise KdflError(f"cannot resume: no {FILE} in {run_dir}. Start the run without --resume.")
    try:
        ck = torch.load(io.BytesIO(_read_verified(path)), weights_only=False)
    except Exception as e:
        raise KdflError(f"cannot resume: {path} is unreadable ({e}){fallback}") from None
    if not isinstance(ck, dict) or "round" not in ck:
        raise KdflError(f"cannot resume: {path} is not a kdfl checkpoint; {again}")
    if ck.get("format") != FORMAT:
        raise KdflError(
            f"cannot resume: {path} was written by an older kdfl (checkpoint format {ck.get('format', 1)}, this "
            f"version reads format {FORMAT}: algorithm states are typed now). Start the run again in a new "
            "directory, or resume it with the kdfl version that started it."
        )
    if not isinstance(ck.get("state"), ServerState):
        raise KdflError(f"cannot resume: {path} holds no server state; {again}")
    return ck
