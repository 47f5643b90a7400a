"""Split a training pool among clients: IID, Dirichlet label skew, shards, quantity skew.

A partition can also come from a file (``partition.name = "file"``) and be written to
one (:func:`export`, ``kdfl partition``): see :mod:`kdfl.data.partition_file`.

Every function takes the labels ``(n,)`` and an explicit ``np.random.Generator`` and
returns one sorted int64 index array per client; the arrays are disjoint and together
cover ``range(n)``. ``make_partition`` is the validated entry point used by configs.

References: Dirichlet label skew and quantity skew follow NIID-Bench (Li et al.,
Federated Learning on Non-IID Data Silos: An Experimental Study, ICDE 2022); shards follow
FedAvg (McMahan et al., AISTATS 2017).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from kdfl.registry import Check, Option, Registry, is_int, is_real, signature_options
from kdfl.spec import unknown
from kdfl.types import KdflError

log = logging.getLogger(__name__)

Partition = list[np.ndarray]


def _finish(parts: Sequence[np.ndarray | list[int]]) -> Partition:
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def _check_clients(n: int, num_clients: int, min_size: int = 1) -> None:
    if num_clients < 1:
        raise KdflError(f"num_clients must be >= 1, got {num_clients}")
    if num_clients * min_size > n:
        raise KdflError(
            f"cannot give {num_clients} clients at least {min_size} samples each from {n} samples; "
            f"lower num_clients or min_size"
        )


def iid(labels: np.ndarray, num_clients: int, rng: np.random.Generator) -> Partition:
    """Shuffle and cut into ``num_clients`` parts whose sizes differ by at most one."""
    n = len(labels)
    _check_clients(n, num_clients)
    return _finish(np.array_split(rng.permutation(n), num_clients))


def dirichlet(labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator,
              min_size: int = 10, max_tries: int = 1000) -> Partition:
    """Label skew: each class is split among clients with shares p ~ Dir(alpha).

    As in NIID-Bench, a client that already holds ``n / num_clients`` samples gets no
    share of later classes (keeps sizes bounded), and the whole draw is repeated until
    every client holds at least ``min_size`` samples. Small ``alpha`` (alpha) -> few
    classes per client; large alpha -> close to IID.

    Raises:
        KdflError: no valid draw within ``max_tries``.
    """
    labels = np.asarray(labels)
    n = len(labels)
    _check_clients(n, num_clients, min_size)
    cap = n / num_clients
    class_idx = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    for attempt in range(1, max_tries + 1):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        sizes = np.zeros(num_clients, dtype=np.int64)
        for idx in class_idx:
            idx = rng.permutation(idx)
            p = rng.dirichlet(np.full(num_clients, float(alpha)))
            p = p * (sizes < cap)  # full clients take no more
            total = p.sum()
            # All-zero can only happen through underflow at tiny alpha; fall back to uniform.
            p = p / total if total > 0 else np.full(num_clients, 1.0 / num_clients)
            cuts = (np.cumsum(p) * len(idx)).astype(np.int64)[:-1]
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].append(chunk)
                sizes[k] += len(chunk)
        if sizes.min() >= min_size:
            log.debug("dirichlet(alpha=%s): valid draw after %d tries", alpha, attempt)
            return _finish([np.concatenate(p) for p in parts])
    raise KdflError(
        f"dirichlet partition: no draw gave every one of {num_clients} clients >= {min_size} samples "
        f"in {max_tries} tries (alpha={alpha}, n={n}); lower min_size or num_clients, or raise alpha"
    )


def shards(labels: np.ndarray, num_clients: int, classes_per_client: int,
           rng: np.random.Generator) -> Partition:
    """Pathological label skew: label-sorted shards, ``classes_per_client`` shards each.

    Unlike cutting the sorted array blindly, every shard lies inside one class (classes
    get shards in proportion to their size), so a client never sees more than
    ``classes_per_client`` classes.

    Raises:
        KdflError: fewer shards than classes (some class could not be placed) or a class
            with fewer samples than its shards.
    """
    labels = np.asarray(labels)
    n = len(labels)
    _check_clients(n, num_clients)
    classes, counts = np.unique(labels, return_counts=True)
    total = num_clients * classes_per_client
    if total < len(classes):
        raise KdflError(
            f"shards: {num_clients} clients x classes_per_client={classes_per_client} = {total} shards "
            f"cannot cover {len(classes)} classes; raise num_clients or classes_per_client"
        )
    # One shard per class, then the rest by largest remainder in proportion to class size.
    quota = counts / n * (total - len(classes))
    alloc = np.floor(quota).astype(np.int64)
    order = np.argsort(-(quota - alloc), kind="stable")
    alloc[order[: total - len(classes) - int(alloc.sum())]] += 1
    alloc += 1
    if np.any(alloc > counts):
        c = int(np.argmax(alloc > counts))
        raise KdflError(
            f"shards: class {classes[c]} has {counts[c]} samples but needs {alloc[c]} shards; "
            f"lower num_clients or classes_per_client"
        )
    pieces = []
    for c, k in zip(classes, alloc, strict=True):
        pieces.extend(np.array_split(rng.permutation(np.flatnonzero(labels == c)), int(k)))
    owner = rng.permutation(total)  # shard owner[j] goes to client j // classes_per_client
    parts = [np.concatenate([pieces[s] for s in owner[i * classes_per_client:(i + 1) * classes_per_client]])
             for i in range(num_clients)]
    return _finish(parts)


def quantity_skew(labels: np.ndarray, num_clients: int, rng: np.random.Generator,
                  alpha: float = 1.0, min_size: int = 10, max_tries: int = 1000) -> Partition:
    """Quantity skew: IID labels, client sizes proportional to q ~ Dir(alpha).

    Raises:
        KdflError: no draw gives every client ``min_size`` samples within ``max_tries``.
    """
    n = len(labels)
    _check_clients(n, num_clients, min_size)
    perm = rng.permutation(n)
    for _ in range(max_tries):
        q = rng.dirichlet(np.full(num_clients, float(alpha)))
        cuts = (np.cumsum(q) * n).astype(np.int64)[:-1]
        sizes = np.diff(np.concatenate([[0], cuts, [n]]))
        if sizes.min() >= min_size:
            return _finish(np.split(perm, cuts))
    raise KdflError(
        f"quantity_skew partition: no draw gave every one of {num_clients} clients >= {min_size} "
        f"samples in {max_tries} tries (alpha={alpha}, n={n}); lower min_size or num_clients, or raise alpha"
    )


# parameter -> what it accepts, shared by the partitions that have it
_CHECKS: dict[str, Check] = {
    "alpha": Check(lambda v: is_real(v) and v > 0, "a finite number > 0"),
    "min_size": Check(lambda v: is_int(v) and v >= 0, "an integer >= 0"),
    "max_tries": Check(lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    "classes_per_client": Check(lambda v: is_int(v) and v >= 1, "an integer >= 1"),
}


def _parameters(fn: Callable[..., Partition]) -> dict[str, Option]:
    """A partition's tunable parameters: all but the labels, client count and generator."""
    return signature_options(fn, skip=("labels", "num_clients", "rng"), checks=_CHECKS)


PARTITIONS: Registry[Callable[..., Partition]] = Registry(
    "partition",
    {"iid": iid, "dirichlet": dirichlet, "shards": shards, "quantity_skew": quantity_skew},
    word="parameter",
    options_of=_parameters,
)
NATURAL = "natural"  # the data set's own split: not a function of the labels, so not in PARTITIONS
FILE = "file"  # rows read from a partition file (kdfl.data.partition_file): not in PARTITIONS either
FILE_PARAMS: dict[str, Any] = {"path": str}  # partition.path: the .json / .npz file


def partition_params(name: str) -> dict[str, Any]:
    """The tunable parameters of a partition and their defaults (``inspect.Parameter.empty`` = required)."""
    if name == FILE:
        return {"path": inspect.Parameter.empty}
    return {} if name == NATURAL else PARTITIONS.defaults(name)


def export(cfg: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The split a validated config produces; see :func:`kdfl.data.partition_file.export`."""
    from kdfl.data.partition_file import export as _export

    return _export(cfg)


def make_partition(name: str, labels: np.ndarray, num_clients: int, seed: int,
                   natural: list[np.ndarray] | None = None, **params: Any) -> Partition:
    """Validate ``params`` and partition ``labels`` among ``num_clients`` clients.

    Args:
        name: a key of :data:`PARTITIONS`, or ``"natural"`` to use the data set's own
            per-device split (``natural``, e.g. ``DataBundle.natural_partition``).
        labels: (n,) integer labels of the training pool.
        num_clients: number of clients.
        seed: seed of the partition's own generator.
        natural: the natural partition, required for ``"natural"``.
        **params: partition parameters (``alpha``, ``min_size``, ``classes_per_client``...).

    Raises:
        KdflError: unknown name or parameter, a value out of range, or an impossible split.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or (len(labels) and not np.issubdtype(labels.dtype, np.integer)):
        raise KdflError(f"labels must be a 1-D integer array, got shape {labels.shape} dtype {labels.dtype}")
    if not is_int(num_clients) or num_clients < 1:
        raise KdflError(f"num_clients must be an integer >= 1, got {num_clients!r}")
    num_clients = int(num_clients)
    if name == NATURAL:
        if params:
            raise KdflError(f"partition {NATURAL!r} takes no parameters, got {', '.join(map(repr, params))}")
        return _natural(labels, num_clients, natural)
    if name == FILE:
        raise KdflError("partition 'file' is not a function of the labels: read it with "
                        "kdfl.data.partition_file.read_partition (kdfl.data.partition_file.split_config applies it)")
    if name not in PARTITIONS:  # the standard error, with "natural" and "file" among the choices
        raise unknown("partition", name, [*PARTITIONS, NATURAL, FILE])
    params = PARTITIONS.bind(name, params)
    return PARTITIONS[name](labels, num_clients, rng=np.random.default_rng(seed), **params)


def _natural(labels: np.ndarray, num_clients: int, natural: list[np.ndarray] | None) -> Partition:
    if natural is None:
        raise KdflError("partition 'natural' needs a data set with a natural split (e.g. synthetic); "
                        "choose iid, dirichlet, shards or quantity_skew instead")
    if len(natural) != num_clients:
        raise KdflError(f"partition 'natural': the data set has {len(natural)} devices but "
                        f"num_clients={num_clients}; set num_clients={len(natural)}")
    parts = _finish(natural)
    top = max((int(p.max()) for p in parts if len(p)), default=-1)
    if top >= len(labels):
        raise KdflError(f"partition 'natural': index {top} is out of range for {len(labels)} samples")
    return parts


def label_counts(labels: np.ndarray, parts: Sequence[np.ndarray], num_classes: int) -> np.ndarray:
    """(clients, num_classes) int64 counts of each label held by each client."""
    labels = np.asarray(labels)
    return np.stack([np.bincount(labels[p], minlength=num_classes)[:num_classes] for p in parts]) \
        if len(parts) else np.zeros((0, num_classes), dtype=np.int64)


def format_label_table(counts: np.ndarray, max_classes: int = 20) -> str:
    """A compact text table: one row per client with its size and per-class counts.

    With more than ``max_classes`` classes the per-class columns would not fit a
    terminal, so each row shows the number of classes held and the top three instead.
    """
    counts = np.asarray(counts, dtype=np.int64)
    num_clients, num_classes = counts.shape
    totals = counts.sum(axis=1)
    if num_classes <= max_classes:
        header = ["client", "n", *(str(c) for c in range(num_classes))]
        rows = [[str(i), str(totals[i]), *(str(v) for v in counts[i])] for i in range(num_clients)]
        rows.append(["all", str(totals.sum()), *(str(v) for v in counts.sum(axis=0))])
    else:
        header = ["client", "n", "classes", "top classes (label:count)"]
        rows = []
        for i in range(num_clients):
            top = np.argsort(-counts[i], kind="stable")[:3]
            top_s = " ".join(f"{c}:{counts[i, c]}" for c in top if counts[i, c] > 0)
            rows.append([str(i), str(totals[i]), str(int((counts[i] > 0).sum())), top_s])
        rows.append(["all", str(totals.sum()), str(int((counts.sum(axis=0) > 0).sum())), ""])
    widths = [max(len(r[j]) for r in [header, *rows]) for j in range(len(header))]
    lines = ["  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]]
    return "\n".join(lines)


def hold_out(labels: np.ndarray, parts: Sequence[np.ndarray], fraction: float,
             seed: int) -> tuple[Partition, Partition]:
    """Split every client's rows into (train, held-out) with the client's own label mix.

    For each client and each label it holds ``m`` samples of, ``round(fraction * m)`` of
    them (drawn from the client's own generator) are held out, but never all of them: a
    label with one sample stays in training, and at least one sample of every held label
    is trained on. The held-out split measures a client's (personal) model on data from
    its own distribution, as PFLlib and FL-bench do.

    Returns:
        (train parts, held-out parts), each one sorted index array per client.
    """
    if not 0 <= fraction < 1:
        raise KdflError(f"data.client_holdout must be in [0, 1) (the share of each client's data held out "
                        f"for its per-client accuracy), got {fraction}")
    labels = np.asarray(labels)
    train, held = [], []
    for cid, part in enumerate(parts):
        rng = np.random.default_rng([seed, 0x401D, cid])
        part = np.asarray(part, dtype=np.int64)
        out: list[np.ndarray] = []
        for lab in np.unique(labels[part]):
            rows = part[labels[part] == lab]
            h = min(int(round(fraction * len(rows))), len(rows) - 1)
            if h > 0:
                out.append(rng.choice(rows, h, replace=False))
        mask = np.isin(part, np.concatenate(out)) if out else np.zeros(len(part), dtype=bool)
        train.append(np.sort(part[~mask]))
        held.append(np.sort(part[mask]))
    return train, held
