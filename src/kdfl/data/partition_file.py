"""Partitions in and out: the split a config produces, as a file and back.

``export(cfg)`` gives every row a config assigns: each client's training rows, its
held-out rows, the proxy, validation and test rows, with what identifies the pool they
index (data set, number of training rows, a digest of the labels, seed, config digest).
``write_partition(export(cfg), "p.json")`` (the CLI's ``kdfl partition CONFIG --out
FILE``) stores it; ``partition.name = "file"`` with ``partition.path = "p.json"`` runs it.
A run from the file is bit-identical to the run of the config that wrote it.

Every index is a row of the data set's own training split (``DataBundle.train``; for
``data.name = "npz"`` with per-client test arrays, those rows follow the training rows)
or, for ``test``, of its test split. The file format (JSON or ``.npz``) is described in
``docs/partitions-and-data.md``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kdfl.data.datasets import DataBundle, load
from kdfl.data.partition import NATURAL, Partition, hold_out, make_partition
from kdfl.data.proxy import FixedRows, Splits, make_splits
from kdfl.types import KdflError

log = logging.getLogger(__name__)

FILE = "file"  # partition.name of a partition read from a file
FORMAT = "kdfl-partition/1"
SUFFIXES = (".json", ".npz")
_LISTS = ("proxy", "val", "test")


@dataclass(frozen=True)
class PartitionFile:
    """A checked partition file.

    Attributes:
        clients: per-client training rows of the data set's training split.
        holdouts: per-client held-out rows, or None.
        proxy, val: rows of the ``holdout`` proxy and of the validation slice, or None
            (then drawn from the seed among the rows no client holds).
        test: rows of the test split to evaluate on, or None (``data.test_size`` decides).
        meta: the file's other keys (format, dataset, seed, digests...).
        source: ``"partition file <path>"``, for messages.
    """

    clients: Partition
    holdouts: Partition | None
    proxy: np.ndarray | None
    val: np.ndarray | None
    test: np.ndarray | None
    meta: dict[str, Any]
    source: str

    def fixed_rows(self) -> FixedRows:
        """The rows :func:`~kdfl.data.proxy.make_splits` takes instead of drawing them."""
        pool = np.sort(np.concatenate([*self.clients, *(self.holdouts or [])]).astype(np.int64))
        return FixedRows(pool=pool, proxy=self.proxy, val=self.val, test=self.test, source=self.source)


@dataclass(frozen=True)
class FederationData:
    """The data side of a federation built from a config.

    Attributes:
        bundle: the loaded data set.
        splits: client pool, proxy, validation and test sets.
        parts: per-client training rows of ``splits.train``.
        holdouts: per-client held-out rows of ``splits.train``, or None.
    """

    bundle: DataBundle
    splits: Splits
    parts: Partition
    holdouts: Partition | None


def labels_digest(labels: Any) -> str:
    """SHA-256 of the labels as little-endian int64: identifies a training pool's order."""
    return hashlib.sha256(np.ascontiguousarray(np.asarray(labels), dtype="<i8").tobytes()).hexdigest()


def _split_values(cfg: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The config values that decide the split (``data_dir`` excepted: where, not what)."""
    return {"run": {"seed": cfg["run"]["seed"]},
            "data": {k: v for k, v in cfg["data"].items() if k != "data_dir"},
            "partition": dict(cfg["partition"])}


def config_digest(cfg: dict[str, dict[str, Any]]) -> str:
    """SHA-256 of the values that decide the split: seed, [data] and [partition]."""
    return hashlib.sha256(json.dumps(_split_values(cfg), sort_keys=True, default=str).encode()).hexdigest()


def split_config(cfg: dict[str, dict[str, Any]]) -> FederationData:
    """Load the data of a validated config and split it: pool, proxy, validation, test,
    each client's training and held-out rows. ``kdfl.experiment.build`` and
    :func:`export` both go through here, so a file holds exactly what a run uses.

    Raises:
        KdflError: from loading, splitting, partitioning or reading a partition file.
    """
    from kdfl.config import _DATA_FIXED

    run, data, part = cfg["run"], cfg["data"], cfg["partition"]
    seed = run["seed"]
    data_dir = data["data_dir"] or None
    options = {k: v for k, v in data.items() if k not in _DATA_FIXED}
    bundle = load(data["name"], data_dir=data_dir, **options)
    pf = read_partition(part["path"], bundle, data["num_clients"], data["name"]) if part["name"] == FILE else None
    splits = make_splits(
        bundle, proxy=data["proxy"], proxy_size=data["proxy_size"], val_size=data["val_size"], seed=seed,
        data_dir=data_dir, pool_size=data["pool_size"], test_size=data["test_size"],
        fixed=None if pf is None else pf.fixed_rows(), natural=part["name"] == NATURAL,
    )
    labels = splits.train.y.numpy()
    holdouts: Partition | None
    if pf is not None:
        keep = np.asarray(splits.train_index)
        parts = [np.searchsorted(keep, c) for c in pf.clients]
        holdouts = None if pf.holdouts is None else [np.searchsorted(keep, h) for h in pf.holdouts]
    else:
        params = {k: v for k, v in part.items() if k != "name"}
        parts = make_partition(part["name"], labels, data["num_clients"], seed, natural=splits.natural_partition,
                               **params)
        holdouts = splits.natural_holdout
    if holdouts is None:
        if data["client_holdout"] > 0:
            parts, holdouts = hold_out(labels, parts, data["client_holdout"], seed)
    elif data["client_holdout"] > 0:
        where = pf.source if pf is not None else f"the data set {data['name']!r}"
        log.info("%s gives each client's held-out rows; data.client_holdout = %s is not applied", where,
                 data["client_holdout"])
    return FederationData(bundle, splits, parts, holdouts)


def export(cfg: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The split a validated config produces, as a dict (see :func:`write_partition`).

    Returns:
        ``format`` (``"kdfl-partition/1"``); ``dataset``, ``dataset_options``,
        ``num_train``, ``num_test``, ``num_classes``, ``labels_sha256`` (what the indices
        refer to); ``seed``, ``config_sha256`` and ``config`` (the seed, [data] and
        [partition] values that produced it); ``num_clients``; ``proxy_kind``; and the
        rows, each a sorted int64 array: ``clients`` (per-client training rows of the
        data set's training split), ``holdout`` (per-client held-out rows, or None),
        ``proxy`` (rows of a ``holdout`` proxy; empty for other kinds), ``val``
        (validation rows) and ``test`` (rows of the test split evaluated on).
    """
    from kdfl.config import _DATA_FIXED

    fd = split_config(cfg)
    keep = np.asarray(fd.splits.train_index, dtype=np.int64)
    data = cfg["data"]
    return {
        "format": FORMAT,
        "dataset": data["name"],
        "dataset_options": {k: v for k, v in data.items() if k not in _DATA_FIXED},
        "num_train": len(fd.bundle.train),
        "num_test": len(fd.bundle.test),
        "num_classes": fd.bundle.num_classes,
        "labels_sha256": labels_digest(fd.bundle.train.y.numpy()),
        "seed": cfg["run"]["seed"],
        "config_sha256": config_digest(cfg),
        "config": _split_values(cfg),
        "num_clients": len(fd.parts),
        "proxy_kind": data["proxy"],
        "clients": [keep[p] for p in fd.parts],
        "holdout": None if fd.holdouts is None else [keep[h] for h in fd.holdouts],
        "proxy": np.asarray(fd.splits.proxy_index, dtype=np.int64),
        "val": np.asarray(fd.splits.val_index, dtype=np.int64),
        "test": np.asarray(fd.splits.test_index, dtype=np.int64),
    }


def _suffix(path: Path, what: str) -> str:
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise KdflError(f"{what} {str(path)!r} must end in .json or .npz (the file format), got {path.suffix!r}")
    return suffix


def write_partition(exported: dict[str, Any], path: str | Path) -> Path:
    """Write :func:`export`'s dict as JSON (``.json``) or numpy arrays (``.npz``).

    JSON holds the dict with every row array as a list. ``.npz`` holds ``client_<i>``,
    ``holdout_<i>`` (when there are held-out rows), ``proxy``, ``val`` and ``test`` as
    int64 arrays, and the other keys as a JSON string in the 0-d array ``meta``. The file
    is written whole, then renamed into place.

    Raises:
        KdflError: a suffix other than .json / .npz, or a directory that cannot be written.
    """
    path = Path(path)
    suffix = _suffix(path, "partition file")
    rows = {"clients", "holdout", *_LISTS}
    meta = {k: v for k, v in exported.items() if k not in rows}
    if suffix == ".json":
        def lst(a: Any) -> str:
            return json.dumps(np.asarray(a, dtype=np.int64).tolist(), separators=(",", ":"))

        lines = [f"  {json.dumps(k)}: {json.dumps(v, default=str)}" for k, v in meta.items()]
        for key in ("clients", "holdout"):
            value = exported.get(key)
            lines.append(f"  {json.dumps(key)}: " + ("null" if value is None else
                         "[\n    " + ",\n    ".join(lst(c) for c in value) + "\n  ]"))
        lines += [f"  {json.dumps(k)}: {lst(exported[k])}" for k in _LISTS if exported.get(k) is not None]
        payload = ("{\n" + ",\n".join(lines) + "\n}\n").encode()
    else:
        arrays: dict[str, Any] = {f"client_{i}": np.asarray(c, dtype=np.int64)
                                  for i, c in enumerate(exported["clients"])}
        for i, h in enumerate(exported.get("holdout") or []):
            arrays[f"holdout_{i}"] = np.asarray(h, dtype=np.int64)
        arrays.update({k: np.asarray(exported[k], dtype=np.int64) for k in _LISTS if exported.get(k) is not None})
        buf = io.BytesIO()
        arrays["meta"] = np.array(json.dumps(meta, default=str))
        np.savez(buf, **arrays)
        payload = buf.getvalue()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.part")  # opened as usual: the umask's permissions
        try:
            with open(tmp, "wb") as f:
                f.write(payload)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    except OSError as e:
        raise KdflError(f"cannot write partition file {path}: {e}") from None
    return path


def _load_raw(path: Path, source: str) -> dict[str, Any]:
    """The file's keys: ``clients`` (list of rows), optional ``holdout``, row lists and metadata."""
    if _suffix(path, "partition.path") == ".json":
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise KdflError(f"{source} is not valid JSON ({e}); write it with `kdfl partition CONFIG --out FILE` "
                            'or as {"clients": [[row, ...], ...]}') from None
        if isinstance(raw, list):  # the shortest form: just the per-client lists
            raw = {"clients": raw}
        if not isinstance(raw, dict) or "clients" not in raw:
            raise KdflError(f"{source} has no \"clients\" key: it must be a JSON object with \"clients\": one list "
                            "of training-row indices per client (or a bare list of such lists)")
        clients = raw["clients"]
        if isinstance(clients, dict):  # {"0": [...], "1": [...]}: client ids as keys
            try:
                ids = sorted(int(k) for k in clients)
            except ValueError:
                raise KdflError(f"{source}: \"clients\" keys must be client numbers 0 ... n-1, got "
                                f"{sorted(clients)[:5]}") from None
            if ids != list(range(len(ids))):
                raise KdflError(f"{source}: \"clients\" keys must be 0 ... {len(ids) - 1} without gaps")
            raw["clients"] = [clients[str(i)] for i in ids]
        return dict(raw)
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise KdflError(f"{source} is not a readable .npz file of index arrays ({type(e).__name__}: {e})") from None
    out: dict[str, Any] = {}
    if "meta" in arrays:
        try:
            meta = json.loads(str(arrays.pop("meta")))
        except json.JSONDecodeError as e:
            raise KdflError(f"{source}: its 'meta' array is not JSON ({e})") from None
        if isinstance(meta, dict):
            out.update(meta)
    for group in ("client", "holdout"):
        ids = sorted(int(k.rsplit("_", 1)[1]) for k in arrays
                     if k.startswith(group + "_") and k.rsplit("_", 1)[1].isdigit())
        if ids != list(range(len(ids))):
            raise KdflError(f"{source}: arrays {group}_<i> must be numbered 0 ... {len(ids) - 1} without gaps, "
                            f"found {ids[:8]}")
        if ids:
            out["clients" if group == "client" else "holdout"] = [arrays[f"{group}_{i}"] for i in ids]
    if "clients" not in out:
        raise KdflError(f"{source} has no client_0, client_1, ... arrays (found {', '.join(sorted(arrays)) or 'none'})")
    out.update({k: arrays[k] for k in _LISTS if k in arrays})
    return out


def _rows(value: Any, what: str, bound: int, bound_name: str, source: str) -> np.ndarray:
    """``value`` as sorted int64 rows in ``[0, bound)`` without repeats, or an error naming ``what``."""
    if isinstance(value, np.ndarray):
        arr = value
        if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
            raise KdflError(f"{source}: {what} must be a 1-D array of integer row indices, got shape {arr.shape} "
                            f"dtype {arr.dtype}")
    else:
        if not isinstance(value, list):
            raise KdflError(f"{source}: {what} must be a list of integer row indices, got {type(value).__name__}")
        bad = next((v for v in value if not isinstance(v, int) or isinstance(v, bool)), None)
        if bad is not None:
            raise KdflError(f"{source}: {what} holds {bad!r}, not an integer row index")
        arr = np.asarray(value, dtype=np.int64) if value else np.zeros(0, dtype=np.int64)
    arr = np.sort(arr.astype(np.int64))
    if arr.size and (arr[0] < 0 or arr[-1] >= bound):
        bad_i = int(arr[0] if arr[0] < 0 else arr[-1])
        raise KdflError(f"{source}: {what} holds index {bad_i}, out of range for the {bound} rows of {bound_name} "
                        f"(indices are 0 ... {bound - 1})")
    dup = np.flatnonzero(arr[1:] == arr[:-1])
    if dup.size:
        raise KdflError(f"{source}: {what} lists row {int(arr[dup[0]])} more than once")
    return arr


def _check_disjoint(groups: list[tuple[str, np.ndarray]], source: str) -> None:
    """No row in two groups; the error names the row and both owners."""
    if not groups:
        return
    rows = np.concatenate([g for _, g in groups])
    owner = np.concatenate([np.full(len(g), i, dtype=np.int64) for i, (_, g) in enumerate(groups)])
    order = np.argsort(rows, kind="stable")
    rows, owner = rows[order], owner[order]
    clash = np.flatnonzero(rows[1:] == rows[:-1])
    if clash.size:
        j = int(clash[0])
        a, b = groups[int(owner[j])][0], groups[int(owner[j + 1])][0]
        raise KdflError(f"{source}: row {int(rows[j])} is in both {a} and {b}; every row may belong to one "
                        "client (and to the proxy, validation slice or nobody) only")


def read_partition(path: str | Path, bundle: DataBundle, num_clients: int, dataset: str) -> PartitionFile:
    """Read and check a partition file against the loaded data set.

    Args:
        path: the ``.json`` or ``.npz`` file (relative to the working directory).
        bundle: the data set the indices refer to.
        num_clients: ``data.num_clients``; the file must list as many clients.
        dataset: ``data.name``, compared with the file's ``dataset`` when it has one.

    Raises:
        KdflError: a missing or malformed file; a client count other than
            ``num_clients``; an index out of range, repeated, or in two clients (or in a
            client and the proxy / validation rows); a file written for another data set
            or another order of its training rows.
    """
    path = Path(path).expanduser()
    source = f"partition file {path}"
    if not path.is_file():
        where = "is a directory" if path.is_dir() else "does not exist"
        raise KdflError(f"partition.path {str(path)!r} {where} (a relative path is read from the working directory "
                        f"{os.getcwd()}); write one with `kdfl partition CONFIG --out {path.name or 'p.json'}`")
    raw = _load_raw(path, source)
    fmt = raw.get("format", FORMAT)
    if fmt != FORMAT:
        raise KdflError(f"{source} has format {fmt!r}; this kdfl reads {FORMAT!r}")
    n, n_test = len(bundle.train), len(bundle.test)
    if raw.get("dataset") not in (None, dataset):
        raise KdflError(f"{source} was written for data set {raw['dataset']!r} but data.name = {dataset!r}: set "
                        f"data.name = {raw['dataset']!r} or use a partition of {dataset!r}")
    if raw.get("num_train") not in (None, n):
        raise KdflError(f"{source} indexes {raw['num_train']} training rows but {dataset!r} has {n} (other data "
                        f"set options? the file was written with {raw.get('dataset_options', {})})")
    if raw.get("labels_sha256") not in (None, labels_digest(bundle.train.y.numpy())):
        raise KdflError(f"{source} was written for training rows with other labels than {dataset!r} has now (other "
                        f"data set options or another version of the files? it was written with "
                        f"{raw.get('dataset_options', {})}); write the partition again for this data")
    clients_raw = raw["clients"]
    if not isinstance(clients_raw, list):
        raise KdflError(f"{source}: \"clients\" must be a list with one list of row indices per client")
    if len(clients_raw) != num_clients:
        raise KdflError(f"{source} lists {len(clients_raw)} clients but data.num_clients = {num_clients}: set "
                        f"data.num_clients = {len(clients_raw)}")
    pool = f"the training split of {dataset!r}"
    clients = [_rows(c, f"client {i}'s rows", n, pool, source) for i, c in enumerate(clients_raw)]
    empty = [i for i, c in enumerate(clients) if not len(c)]
    if empty:
        raise KdflError(f"{source}: client {empty[0]} has no training rows; every client needs at least one")
    holdouts = None
    if raw.get("holdout") is not None:
        if not isinstance(raw["holdout"], list) or len(raw["holdout"]) != num_clients:
            got = len(raw["holdout"]) if isinstance(raw["holdout"], list) else type(raw["holdout"]).__name__
            raise KdflError(f"{source}: \"holdout\" must list one list of held-out rows per client "
                            f"({num_clients}), got {got}")
        holdouts = [_rows(h, f"client {i}'s held-out rows", n, pool, source) for i, h in enumerate(raw["holdout"])]
    extra = {k: _rows(raw[k], f"the {k} rows", n_test if k == "test" else n,
                      f"the test split of {dataset!r}" if k == "test" else pool, source)
             for k in _LISTS if raw.get(k) is not None}
    groups = [(f"client {i}", c) for i, c in enumerate(clients)]
    groups += [(f"client {i}'s held-out rows", h) for i, h in enumerate(holdouts or [])]
    groups += [(f"the {k} rows", extra[k]) for k in ("proxy", "val") if k in extra]
    _check_disjoint(groups, source)
    meta = {k: v for k, v in raw.items() if k not in ("clients", "holdout", *_LISTS)}
    return PartitionFile(clients, holdouts, extra.get("proxy"), extra.get("val"), extra.get("test"), meta, source)
