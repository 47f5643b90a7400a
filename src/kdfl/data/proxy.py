"""Server-side splits: the unlabeled proxy set for distillation and a labeled validation slice.

``make_splits(bundle, proxy=..., proxy_size=..., val_size=..., seed=...)`` carves what
the server holds out of the training pool (or builds it elsewhere) and returns what is
left for the clients. Proxy kinds:

- ``"holdout"``: ``proxy_size`` samples of the training pool, labels dropped (the usual
  FedDF / FedMD / DS-FL setting: public data from the same distribution).
- ``"noise"``: uniform noise in the range of the training inputs (a data-free baseline).
- ``"dataset:<name>"``: inputs of another data set's training split (same input shape).
- ``"none"``: no proxy.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
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
    """

    train: TensorData
    test: TensorData
    proxy: torch.Tensor | None
    val: TensorData | None
    natural_partition: list[np.ndarray] | None = None
    train_index: np.ndarray | None = None
    proxy_labels: torch.Tensor | None = None


def make_splits(bundle: DataBundle, *, proxy: str = "holdout", proxy_size: int = 0, val_size: int = 0,
                seed: int = 0, data_dir: str | Path | None = None, pool_size: int = 0,
                test_size: int = 0) -> Splits:
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

    Raises:
        KdflError: unknown proxy kind, negative or too large sizes, or a proxy data set
            whose input shape differs from ``bundle``'s.
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
    if held + val_size >= n:
        raise KdflError(
            f"proxy_size={held} + val_size={val_size} leaves no training data: the training pool of "
            f"{bundle.name!r} has {n} samples; lower proxy_size or val_size"
        )
    # Separate streams so that changing one size never reshuffles the other choices.
    perm = numpy_rng(seed, "splits", "pool").permutation(n)
    proxy_idx, val_idx = perm[:held], perm[held:held + val_size]
    rest = perm[held + val_size:]
    if pool_size:
        if pool_size > len(rest):
            raise KdflError(f"pool_size={pool_size} but the training pool of {bundle.name!r} has {len(rest)} samples "
                            f"after proxy_size={held} and val_size={val_size}: lower pool_size (0 = all)")
        rest = rest[:pool_size]  # the permutation's order: a random subset, nested as pool_size grows
    keep = np.sort(rest)
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
    natural = None
    if bundle.natural_partition is not None:
        # Row r of bundle.train becomes row new_pos[r] of the client pool (-1: moved out).
        new_pos = np.full(n, -1, dtype=np.int64)
        new_pos[keep] = np.arange(len(keep))
        natural = [new_pos[p][new_pos[p] >= 0] for p in bundle.natural_partition]
    test = bundle.test
    if test_size:
        if test_size > len(test):
            raise KdflError(f"test_size={test_size} but {bundle.name!r} has {len(test)} test samples: lower "
                            "test_size (0 = all)")
        pick = np.sort(numpy_rng(seed, "splits", "test").permutation(len(test))[:test_size])
        test = test.subset(torch.from_numpy(pick))
    return Splits(
        train=bundle.train.subset(torch.from_numpy(keep)),
        test=test,
        proxy=proxy_x,
        val=val,
        natural_partition=natural,
        train_index=keep,
        proxy_labels=proxy_y,
    )


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
