"""Server-side splits: the unlabeled proxy set for distillation and a labeled validation slice.

``make_splits(bundle, proxy=..., proxy_size=..., val_size=..., seed=...)`` carves what
the server holds out of the training pool (or builds it elsewhere) and returns what is
left for the clients. Proxy kinds:

- ``"holdout"``: ``proxy_size`` samples of the training pool, labels dropped (the usual
  FedDF / FedMD / DS-FL setting: public data from the same distribution).
- ``"noise"``: uniform noise in the range of the training inputs (a data-free baseline).
- ``"dataset:<name>"``: inputs of another data set's training split (same input shape).
- ``"none"``: no proxy.

Rows can also be fixed in advance instead of drawn (:class:`FixedRows`, from a partition
file): the clients' rows, and optionally the proxy, validation and test rows.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from kdfl.data.datasets import DataBundle, load
from kdfl.rng import numpy_rng
from kdfl.types import KdflError, TensorData

log = logging.getLogger(__name__)

PROXY_KINDS = ("holdout", "noise", "dataset:<name>", "none")


@dataclass(frozen=True)
class Splits:
    """What the server and the clients get.

    Attributes:
        train: the training pool left for the clients.
        test: the global test set.
        proxy: (N, *input_shape) unlabeled inputs, or None.
        proxy_labels: (N,) labels of the proxy rows when they are known (a ``holdout``
            proxy keeps its labels for algorithms with a labeled public set, such as
            FedMD's transfer learning), else None.
        val: labeled server validation slice, or None.
        natural_partition: the bundle's natural partition re-indexed into ``train``
            (samples moved to proxy/val dropped), or None.
        train_index: for each row of ``train``, its row in ``bundle.train``.
        proxy_labels: see ``proxy``.
        proxy_index: sorted rows of ``bundle.train`` that form a ``holdout`` proxy (empty
            for the other kinds).
        val_index: sorted rows of ``bundle.train`` of the validation slice (empty: none).
        test_index: sorted rows of ``bundle.test`` evaluated on.
        natural_holdout: the bundle's per-client held-out rows re-indexed into ``train``
            when ``make_splits(natural=True)``, else None.
    """

    train: TensorData
    test: TensorData
    proxy: torch.Tensor | None
    val: TensorData | None
    natural_partition: list[np.ndarray] | None = None
    train_index: np.ndarray | None = None
    proxy_labels: torch.Tensor | None = None
    proxy_index: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    val_index: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    test_index: np.ndarray | None = None
    natural_holdout: list[np.ndarray] | None = None


@dataclass(frozen=True)
class FixedRows:
    """Rows fixed in advance (by a partition file) instead of drawn from the seed.

    Attributes:
        pool: sorted rows of ``bundle.train`` the clients hold (training and held-out):
            the client pool, whatever ``pool_size`` says.
        proxy: rows of a ``holdout`` proxy, or None to draw them from the rows no client
            holds.
        val: rows of the validation slice, or None to draw them likewise.
        test: rows of ``bundle.test`` to evaluate on, or None to draw ``test_size``.
        source: where the rows come from, for messages ("partition file p.json").
    """

    pool: np.ndarray
    proxy: np.ndarray | None = None
    val: np.ndarray | None = None
    test: np.ndarray | None = None
    source: str = "the partition file"


def _sorted_rows(rows: np.ndarray | Sequence[int]) -> np.ndarray:
    return np.sort(np.asarray(rows, dtype=np.int64))


def make_splits(bundle: DataBundle, *, proxy: str = "holdout", proxy_size: int = 0, val_size: int = 0,
                seed: int = 0, data_dir: str | Path | None = None, pool_size: int = 0,
                test_size: int = 0, fixed: FixedRows | None = None, natural: bool = False) -> Splits:
    """Split ``bundle.train`` into client pool, proxy and validation slice.

    Args:
        bundle: the loaded data set.
        proxy: ``"holdout"``, ``"noise"``, ``"dataset:<name>"`` or ``"none"``.
        proxy_size: number of proxy inputs. ``holdout`` with 0 means no proxy (None);
            ``noise`` needs > 0; ``dataset:<name>`` with 0 takes the whole train split.
        val_size: labeled samples taken out of the pool for server validation
            (disjoint from a holdout proxy).
        seed: everything is a deterministic function of it.
        data_dir: where ``dataset:<name>`` proxies are read (see ``datasets.cache_dir``).
        pool_size: keep only this many samples of the clients' pool, drawn at random after
            the proxy and validation rows (0 = all): a smaller federation of the same data
            for CPU budgets. Changing it never changes the proxy or validation rows.
        test_size: evaluate on this many test samples drawn at random (0 = all).
        fixed: rows fixed by a partition file. The clients' pool is ``fixed.pool``; the
            proxy, validation and test rows it gives are used (their sizes must agree with
            ``proxy_size``, ``val_size``, ``test_size`` and ``pool_size``), the others are
            drawn as usual from the rows no client holds.
        natural: the clients use the bundle's natural split, so its per-client held-out
            rows (``bundle.natural_holdout``) join the pool (``Splits.natural_holdout``).
            Otherwise those rows (a data set's own per-client test rows) are left out of
            the pool. They are never drawn for the proxy or the validation slice.

    Raises:
        KdflError: unknown proxy kind, negative or too large sizes, a proxy data set
            whose input shape differs from ``bundle``'s, or fixed rows whose sizes
            disagree with the sizes asked for.
    """
    for key, value in (("proxy_size", proxy_size), ("val_size", val_size), ("pool_size", pool_size),
                       ("test_size", test_size)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
            raise KdflError(f"{key} must be an integer >= 0, got {value!r}")
    proxy_size, val_size, pool_size, test_size = int(proxy_size), int(val_size), int(pool_size), int(test_size)
    kind = proxy.split(":", 1)[0]
    if kind not in ("holdout", "noise", "dataset", "none") or (kind == "dataset" and not proxy[8:]) \
            or (kind != "dataset" and ":" in proxy):
        raise KdflError(f"unknown proxy {proxy!r}; allowed: {', '.join(PROXY_KINDS)}")
    n = len(bundle.train)
    held = proxy_size if kind == "holdout" else 0
    # Separate streams so that changing one size never reshuffles the other choices.
    perm = numpy_rng(seed, "splits", "pool").permutation(n)
    # Rows the server never draws: a data set's per-client test rows and every row that
    # fixed rows already place. Without either, ``perm`` is untouched (same draws as ever).
    placed = np.zeros(n, dtype=bool)
    nat_held = bundle.natural_holdout
    if nat_held is not None and len(nat_held):
        placed[np.concatenate(nat_held).astype(np.int64)] = True
    if fixed is not None:
        for rows in (fixed.pool, fixed.proxy, fixed.val):
            if rows is not None:
                placed[np.asarray(rows, dtype=np.int64)] = True
    if placed.any():
        perm = perm[~placed[perm]]
    if fixed is None:
        if held + val_size >= len(perm):
            raise KdflError(
                f"proxy_size={held} + val_size={val_size} leaves no training data: the training pool of "
                f"{bundle.name!r} has {len(perm)} samples; lower proxy_size or val_size"
            )
        proxy_idx, val_idx = perm[:held], perm[held:held + val_size]
        rest = perm[held + val_size:]
        if pool_size:
            if pool_size > len(rest):
                raise KdflError(f"pool_size={pool_size} but the training pool of {bundle.name!r} has {len(rest)} "
                                f"samples after proxy_size={held} and val_size={val_size}: lower pool_size (0 = all)")
            rest = rest[:pool_size]  # the permutation's order: a random subset, nested as pool_size grows
        if natural and nat_held is not None and len(nat_held):
            rest = np.concatenate([rest, *nat_held]).astype(np.int64)
        keep = np.sort(rest)
    else:
        proxy_idx, perm = _given_or_drawn(fixed.proxy if kind == "holdout" else None, held, perm, "proxy rows",
                                          "data.proxy_size", fixed.source, bundle.name)
        val_idx, perm = _given_or_drawn(fixed.val, val_size, perm, "validation rows", "data.val_size",
                                        fixed.source, bundle.name)
        if kind != "holdout" and fixed.proxy is not None and len(fixed.proxy):
            log.info("%s lists %d proxy rows; data.proxy = %r does not use them", fixed.source, len(fixed.proxy),
                     proxy)
        keep = _sorted_rows(fixed.pool)
        if pool_size and pool_size != len(keep):
            raise KdflError(f"data.pool_size = {pool_size} but {fixed.source} gives the clients {len(keep)} rows: "
                            f"set data.pool_size = {len(keep)} or 0 (the file decides the clients' rows)")
    x = bundle.train.x

    proxy_x: torch.Tensor | None
    proxy_y: torch.Tensor | None = None
    if kind == "holdout":
        proxy_x = x[torch.from_numpy(np.sort(proxy_idx))] if held else None
        proxy_y = bundle.train.y[torch.from_numpy(np.sort(proxy_idx))] if held else None
        if not held:
            log.info("proxy='holdout' with proxy_size=0: no proxy set")
    elif kind == "noise":
        if proxy_size == 0:
            raise KdflError("proxy='noise' needs proxy_size > 0 (the number of noise inputs)")
        lo, hi = float(x.min()), float(x.max())
        noise = numpy_rng(seed, "splits", "noise").uniform(lo, hi, (proxy_size, *bundle.input_shape))
        proxy_x = torch.from_numpy(noise.astype(np.float32))
    elif kind == "dataset":
        proxy_x = _dataset_proxy(bundle, proxy[len("dataset:"):], proxy_size, seed, data_dir)
    else:
        if proxy_size:
            log.warning("proxy='none': ignoring proxy_size=%d", proxy_size)
        proxy_x = None

    val = bundle.train.subset(torch.from_numpy(np.sort(val_idx))) if val_size else None
    # Row r of bundle.train becomes row new_pos[r] of the client pool (-1: not in it).
    new_pos = np.full(n, -1, dtype=np.int64)
    new_pos[keep] = np.arange(len(keep))
    natural_parts = None
    if bundle.natural_partition is not None:
        natural_parts = [new_pos[p][new_pos[p] >= 0] for p in bundle.natural_partition]
    natural_held = None
    if natural and nat_held is not None and fixed is None:
        natural_held = [new_pos[p][new_pos[p] >= 0] for p in nat_held]
    test, test_idx = bundle.test, np.arange(len(bundle.test), dtype=np.int64)
    if fixed is not None and fixed.test is not None:
        test_idx = _sorted_rows(fixed.test)
        if (test_size or len(bundle.test)) != len(test_idx):
            raise KdflError(f"data.test_size = {test_size} but {fixed.source} lists {len(test_idx)} test rows of "
                            f"{len(bundle.test)}: set data.test_size = "
                            f"{0 if len(test_idx) == len(bundle.test) else len(test_idx)}")
        if len(test_idx) != len(bundle.test):
            test = test.subset(torch.from_numpy(test_idx))
    elif test_size:
        if test_size > len(test):
            raise KdflError(f"test_size={test_size} but {bundle.name!r} has {len(test)} test samples: lower "
                            "test_size (0 = all)")
        test_idx = np.sort(numpy_rng(seed, "splits", "test").permutation(len(test))[:test_size])
        test = test.subset(torch.from_numpy(test_idx))
    return Splits(
        train=bundle.train.subset(torch.from_numpy(keep)),
        test=test,
        proxy=proxy_x,
        val=val,
        natural_partition=natural_parts,
        train_index=keep,
        proxy_labels=proxy_y,
        proxy_index=_sorted_rows(proxy_idx) if kind == "holdout" else np.zeros(0, dtype=np.int64),
        val_index=_sorted_rows(val_idx),
        test_index=test_idx,
        natural_holdout=natural_held,
    )


def _given_or_drawn(given: np.ndarray | None, size: int, free: np.ndarray, what: str, key: str, source: str,
                    dataset: str) -> tuple[np.ndarray, np.ndarray]:
    """The ``given`` rows (their number must be ``size``), else the first ``size`` free
    rows; returns (rows, the free rows left)."""
    if given is not None:
        if len(given) != size:
            raise KdflError(f"{key} = {size} but {source} lists {len(given)} {what}: set {key} = {len(given)}, "
                            f"or drop the {what} from the file to draw them from the rows no client holds")
        return np.asarray(given, dtype=np.int64), free
    if size > len(free):
        raise KdflError(f"{key} = {size} but only {len(free)} rows of {dataset!r} are left outside {source}'s rows: "
                        f"lower {key}, or list the {what} in the file")
    return free[:size], free[size:]


def _dataset_proxy(bundle: DataBundle, name: str, size: int, seed: int,
                   data_dir: str | Path | None) -> torch.Tensor:
    other = load(name, data_dir=data_dir)
    if tuple(other.input_shape) != tuple(bundle.input_shape):
        raise KdflError(
            f"proxy 'dataset:{name}' has inputs of shape {other.input_shape} but {bundle.name!r} has "
            f"{bundle.input_shape}; pick a proxy data set with the same input shape"
        )
    available = len(other.train)
    if size > available:
        raise KdflError(f"proxy_size={size} but 'dataset:{name}' has only {available} training inputs; "
                        f"lower proxy_size (0 takes all)")
    if size == 0:
        return other.train.x
    idx = np.sort(numpy_rng(seed, "splits", "dataset", name).choice(available, size, replace=False))
    return other.train.x[torch.from_numpy(idx)]
