"""Checkpoints: everything a run needs to continue bit-for-bit after a kill."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from kdfl.types import KdflError

FILE = "checkpoint.pt"


def save(run_dir: Path, payload: dict[str, Any]) -> None:
    """Write atomically (temp file + rename) so a kill mid-write never corrupts it."""
    tmp = run_dir / (FILE + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, run_dir / FILE)


def load(run_dir: Path) -> dict[str, Any]:
    path = run_dir / FILE
    if not path.exists():
        raise KdflError(f"cannot resume: no {FILE} in {run_dir}. Start the run without --resume.")
    try:
        return torch.load(path, weights_only=False)
    except Exception as e:
        raise KdflError(f"cannot resume: {path} is unreadable ({e}); delete it and start again") from None
