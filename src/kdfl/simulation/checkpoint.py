"""Checkpoints: everything a run needs to continue bit-for-bit after a kill.

A checkpoint holds the round, the algorithm's typed server state, the clients' kept
states and the records so far, tagged with a format version: checkpoints written before
typed states (format 1, an untyped ``extra`` dict) cannot be resumed, and say so.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from kdfl.types import KdflError, ServerState

FILE = "checkpoint.pt"
FORMAT = 2  # 2: typed ServerState subclasses and ClientState; 1 (no "format" key): ServerState.extra dicts


def save(run_dir: Path, payload: dict[str, Any]) -> None:
    """Write atomically (temp file + rename) so a kill mid-write never corrupts it."""
    tmp = run_dir / (FILE + ".tmp")
    torch.save({**payload, "format": FORMAT}, tmp)
    os.replace(tmp, run_dir / FILE)


def load(run_dir: Path) -> dict[str, Any]:
    path = run_dir / FILE
    if not path.exists():
        raise KdflError(f"cannot resume: no {FILE} in {run_dir}. Start the run without --resume.")
    try:
        ck = torch.load(path, weights_only=False)
    except Exception as e:
        raise KdflError(f"cannot resume: {path} is unreadable ({e}); delete it and start again") from None
    if not isinstance(ck, dict) or "round" not in ck:
        raise KdflError(f"cannot resume: {path} is not a kdfl checkpoint; delete it and start again")
    if ck.get("format") != FORMAT:
        raise KdflError(
            f"cannot resume: {path} was written by an older kdfl (checkpoint format {ck.get('format', 1)}, this "
            f"version reads format {FORMAT}: algorithm states are typed now). Start the run again in a new "
            "directory, or resume it with the kdfl version that started it."
        )
    if not isinstance(ck.get("state"), ServerState):
        raise KdflError(f"cannot resume: {path} holds no server state; delete it and start again")
    return ck
