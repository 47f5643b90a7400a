"""PFLlib (TsingZ0/PFLlib) as a parity reference: its data format, its model, its command
line and its per-round record, read from a local checkout (never vendored here).

What PFLlib reads (``system/utils/data_utils.py``): for a data set ``NAME`` and client
``i``, ``../dataset/NAME/train/i.npz`` and ``../dataset/NAME/test/i.npz`` relative to the
working directory of ``system/main.py``, each an ``np.savez_compressed`` archive whose
``data`` entry is a pickled dict ``{"x": inputs, "y": labels}`` (``dataset/utils/
dataset_utils.py::save_file`` writes them, with a ``config.json`` beside them). Inputs are
read as float32, labels as int64. :func:`export` writes kdfl's split in that format: the
client's training rows as ``train/i.npz`` and its held-out rows (``data.client_holdout``)
as ``test/i.npz``, which is the role PFLlib's own per-client 75/25 split plays.

How the reference is run (:func:`command`): ``shim/pfllib_entry.py`` puts ``system/`` and
``shim/`` on the path, replaces the *model* ``main.py`` would build (the name it calls for
``-m CNN``) with :class:`shim.parity_models.ParityMLP` carrying kdfl's initial weights, and
runs ``main.py`` unchanged as ``__main__`` with the flags built here. ``shim/`` also
provides stand-ins for the four packages PFLlib imports that are not installed here and
that the runs never use for a result (see ``shim/README.md``).

What is read back (:func:`read_curve`): ``rs_test_acc``, the list ``Server.evaluate``
appends to (``system/flcore/servers/serverbase.py``): after ``send_models`` in round i
(before its training), so entry i is the model after i aggregations; the accuracy is the
sum of correct predictions over all clients' test splits divided by their total size, each
client using the model it holds (the global one for FedAvg, its personal one for
personalised methods).
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Sequence
from pathlib import Path

import numpy as np

SHIM = Path(__file__).resolve().parent / "shim"


def export(x: np.ndarray, y: np.ndarray, train_parts: Sequence[np.ndarray], test_parts: Sequence[np.ndarray],
           dataset_dir: Path, num_classes: int) -> dict[str, object]:
    """Write a per-client split in PFLlib's format under ``dataset_dir`` (``train/i.npz``,
    ``test/i.npz``, ``config.json``) and return the config written.

    Args:
        x: (N, ...) inputs of the pool the index arrays point into.
        y: (N,) integer labels.
        train_parts: per client, the row indices it trains on.
        test_parts: per client, the row indices of its own test split.
        dataset_dir: ``<root>/dataset/<name>``; created if missing.
        num_classes: C.
    """
    if len(train_parts) != len(test_parts):
        raise ValueError(f"{len(train_parts)} train parts but {len(test_parts)} test parts")
    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y, dtype=np.int64)
    for sub in ("train", "test"):
        (dataset_dir / sub).mkdir(parents=True, exist_ok=True)
    stats = []
    for cid, (tr, te) in enumerate(zip(train_parts, test_parts, strict=True)):
        for sub, rows in (("train", tr), ("test", te)):
            rows = np.asarray(rows, dtype=np.int64)
            with open(dataset_dir / sub / f"{cid}.npz", "wb") as f:
                np.savez_compressed(f, data={"x": x[rows], "y": y[rows]})  # type: ignore[arg-type]
        labels = np.concatenate([y[np.asarray(tr, dtype=np.int64)], y[np.asarray(te, dtype=np.int64)]])
        stats.append([[int(c), int(n)] for c, n in zip(*np.unique(labels, return_counts=True), strict=True)])
    config = {"num_clients": len(train_parts), "num_classes": int(num_classes), "non_iid": True,
              "balance": False, "partition": "kdfl", "Size of samples for labels in clients": stats}
    (dataset_dir / "config.json").write_text(json.dumps(config))
    return config


def read_client(dataset_dir: Path, cid: int, train: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """One client's arrays as PFLlib's ``read_data`` loads them (for checks)."""
    path = dataset_dir / ("train" if train else "test") / f"{cid}.npz"
    with open(path, "rb") as f:
        data = np.load(f, allow_pickle=True)["data"].tolist()
    return np.asarray(data["x"], dtype=np.float32), np.asarray(data["y"], dtype=np.int64)


def commit_of(reference_dir: Path) -> str | None:
    """The checkout's commit (``git rev-parse HEAD``), or None when it is not a git work tree."""
    try:
        out = subprocess.run(["git", "-C", str(reference_dir), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", sha) else None


def command(python: str, reference_dir: Path, flags: Sequence[str]) -> list[str]:
    """The command line that runs PFLlib's ``system/main.py`` with ``flags`` through the shim."""
    return [python, str(SHIM / "pfllib_entry.py"), str(reference_dir), *flags]


def read_curve(results_dir: Path, dataset: str, algorithm: str, goal: str) -> list[float]:
    """``rs_test_acc`` of run 0 from ``results_dir`` (written by the ``h5py`` stand-in as JSON)."""
    path = results_dir / f"{dataset}_{algorithm}_{goal}_0.h5"
    data = json.loads(path.read_text())
    return [float(a) for a in data["rs_test_acc"]]


def parse_stdout(text: str) -> list[float]:
    """The "Averaged Test Accuracy" lines of PFLlib's log, in order (a fallback and a check)."""
    return [float(m) for m in re.findall(r"Averaged Test Accuracy: ([0-9.]+)", text)]
