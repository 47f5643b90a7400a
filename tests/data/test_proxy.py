"""Server splits: holdout/val disjoint from the client pool, noise range, data set proxies."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdfl.data import load, make_partition, make_splits
from kdfl.types import KdflError


@pytest.fixture(scope="module")
def digits():
    return load("digits")


def rows(x: torch.Tensor) -> set[bytes]:
    return {r.numpy().tobytes() for r in x.reshape(len(x), -1)}


def test_holdout_and_val_disjoint_sizes_deterministic(digits):
    s = make_splits(digits, proxy="holdout", proxy_size=200, val_size=100, seed=3)
    n = len(digits.train)
    assert s.proxy.shape == (200, 1, 8, 8) and len(s.val) == 100 and len(s.train) == n - 300
    assert s.test is digits.test
    # Disjoint by index: rebuild the indices from train_index and the row contents.
    assert len(set(s.train_index.tolist())) == len(s.train)
    assert torch.equal(digits.train.x[torch.from_numpy(s.train_index)], s.train.x)
    train_rows, proxy_rows, val_rows = rows(s.train.x), rows(s.proxy), rows(s.val.x)
    # digits has a few duplicate images, so compare with a tolerance of a handful.
    assert len(train_rows & proxy_rows) <= 5 and len(train_rows & val_rows) <= 5 and len(proxy_rows & val_rows) <= 5
    again = make_splits(digits, proxy="holdout", proxy_size=200, val_size=100, seed=3)
    assert torch.equal(again.proxy, s.proxy) and torch.equal(again.val.y, s.val.y)
    other = make_splits(digits, proxy="holdout", proxy_size=200, val_size=100, seed=4)
    assert not torch.equal(other.proxy, s.proxy)


def test_holdout_index_disjointness_exact():
    x = torch.arange(50, dtype=torch.float32).reshape(50, 1)
    from kdfl.data.datasets import DataBundle
    from kdfl.types import TensorData

    b = DataBundle("toy", TensorData(x, torch.zeros(50, dtype=torch.long)), TensorData(x[:2], torch.zeros(2, dtype=torch.long)),
                   2, (1,), natural_partition=[np.arange(0, 25), np.arange(25, 50)])
    s = make_splits(b, proxy_size=10, val_size=5, seed=0)
    t, p, v = set(s.train.x.ravel().tolist()), set(s.proxy.ravel().tolist()), set(s.val.x.ravel().tolist())
    assert len(t) == 35 and len(p) == 10 and len(v) == 5
    assert not (t & p) and not (t & v) and not (p & v) and len(t | p | v) == 50
    # The natural partition follows the samples into the smaller pool.
    assert sum(len(q) for q in s.natural_partition) == 35
    for q, orig in zip(s.natural_partition, b.natural_partition, strict=True):
        assert set(s.train.x[torch.from_numpy(q)].ravel().tolist()) == set(orig.tolist()) & t
    parts = make_partition("natural", s.train.y.numpy(), 2, 0, natural=s.natural_partition)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(35))


def test_noise_shape_range_pool_untouched(digits):
    s = make_splits(digits, proxy="noise", proxy_size=64, seed=0)
    assert s.proxy.shape == (64, 1, 8, 8) and s.proxy.dtype == torch.float32
    assert float(s.proxy.min()) >= 0.0 and float(s.proxy.max()) <= 1.0 and float(s.proxy.std()) > 0.2
    assert len(s.train) == len(digits.train) and s.val is None
    with pytest.raises(KdflError, match="proxy_size > 0"):
        make_splits(digits, proxy="noise")


def test_none_and_default(digits):
    assert make_splits(digits, proxy="none").proxy is None
    s = make_splits(digits)
    assert s.proxy is None and len(s.train) == len(digits.train)


def test_dataset_proxy_and_shape_mismatch(digits, tmp_path):
    s = make_splits(digits, proxy="dataset:digits", proxy_size=30, seed=1)
    assert s.proxy.shape == (30, 1, 8, 8) and len(s.train) == len(digits.train)
    assert len(make_splits(digits, proxy="dataset:digits").proxy) == len(digits.train)
    small = load("mnist1d", data_dir=tmp_path, num_samples=200)
    with pytest.raises(KdflError, match=r"dataset:digits.*\(1, 8, 8\).*'mnist1d'.*\(1, 40\)"):
        make_splits(small, proxy="dataset:digits")

def test_size_errors(digits):
    n = len(digits.train)
    with pytest.raises(KdflError, match=f"{n} samples"):
        make_splits(digits, proxy_size=n - 10, val_size=10)
    with pytest.raises(KdflError, match="only 1437"):
        make_splits(digits, proxy="dataset:digits", proxy_size=5000)
    with pytest.raises(KdflError, match="val_size must be an integer >= 0"):
        make_splits(digits, val_size=-1)
    with pytest.raises(KdflError, match="unknown proxy 'public'.*holdout"):
        make_splits(digits, proxy="public")


def test_pool_and_test_subsets(digits):
    full = make_splits(digits, proxy="holdout", proxy_size=200, val_size=100, seed=3)
    s = make_splits(digits, proxy="holdout", proxy_size=200, val_size=100, seed=3, pool_size=500, test_size=50)
    # the proxy and validation rows do not move when the pool shrinks
    assert torch.equal(s.proxy, full.proxy) and torch.equal(s.val.y, full.val.y)
    assert len(s.train) == 500 and set(s.train_index.tolist()) <= set(full.train_index.tolist())
    # nested: a larger pool keeps the smaller one's rows
    bigger = make_splits(digits, proxy="holdout", proxy_size=200, val_size=100, seed=3, pool_size=800)
    assert set(s.train_index.tolist()) <= set(bigger.train_index.tolist())
    assert len(s.test) == 50 and rows(s.test.x) <= rows(digits.test.x)
    again = make_splits(digits, proxy="holdout", proxy_size=200, val_size=100, seed=3, pool_size=500, test_size=50)
    assert torch.equal(again.test.x, s.test.x) and np.array_equal(again.train_index, s.train_index)
    with pytest.raises(KdflError, match="pool_size=100000"):
        make_splits(digits, proxy_size=200, pool_size=100_000)
    with pytest.raises(KdflError, match="test_size=100000"):
        make_splits(digits, test_size=100_000)
    with pytest.raises(KdflError, match="pool_size must be an integer"):
        make_splits(digits, pool_size=-1)
