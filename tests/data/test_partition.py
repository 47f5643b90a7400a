"""Partitions: disjoint, covering, seeded; the skew each one promises; validation messages."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

from kdfl.data.partition import (
    PARTITIONS,
    dirichlet,
    format_label_table,
    label_counts,
    make_partition,
    shards,
)
from kdfl.types import KdflError

PARAMS = {"iid": {}, "dirichlet": {"alpha": 0.5, "min_size": 5}, "shards": {"classes_per_client": 2},
          "quantity_skew": {"alpha": 1.0, "min_size": 5}}


def labels_for(n: int, num_classes: int = 10, seed: int = 0) -> np.ndarray:
    # Imbalanced on purpose: class c has weight c + 1.
    p = np.arange(1, num_classes + 1) / np.arange(1, num_classes + 1).sum()
    return np.random.default_rng(seed).choice(num_classes, n, p=p)


@pytest.mark.parametrize("name", list(PARTITIONS))
def test_disjoint_covering_sorted_seeded(name):
    for n, clients in ((500, 5), (1000, 20), (2003, 7)):
        y = labels_for(n, seed=n)
        for seed in (0, 1, 2):
            parts = make_partition(name, y, clients, seed, **PARAMS[name])
            assert len(parts) == clients
            assert all(p.dtype == np.int64 and np.all(np.diff(p) > 0) for p in parts)
            allidx = np.concatenate(parts)
            assert len(allidx) == n and np.array_equal(np.sort(allidx), np.arange(n))
            again = make_partition(name, y, clients, seed, **PARAMS[name])
            assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
            other = make_partition(name, y, clients, seed + 100, **PARAMS[name])
            assert any(not np.array_equal(a, b) for a, b in zip(parts, other, strict=True))
            assert label_counts(y, parts, 10).sum() == n


def test_iid_sizes_balanced():
    parts = make_partition("iid", labels_for(1003), 10, 0)
    assert {len(p) for p in parts} <= {100, 101}


def test_dirichlet_min_size_and_skew():
    y = labels_for(3000)

    def classes_for_90(parts):
        counts = label_counts(y, parts, 10)
        out = []
        for row in counts:
            share = np.cumsum(np.sort(row)[::-1]) / row.sum()
            out.append(int(np.searchsorted(share, 0.9) + 1))
        return np.mean(out)

    for seed in range(3):
        skewed = make_partition("dirichlet", y, 20, seed, alpha=0.1, min_size=20)
        flat = make_partition("dirichlet", y, 20, seed, alpha=100.0, min_size=20)
        assert min(map(len, skewed)) >= 20 and min(map(len, flat)) >= 20
        assert classes_for_90(skewed) + 3 < classes_for_90(flat)


def test_dirichlet_impossible_says_how_to_fix():
    y = labels_for(200)
    with pytest.raises(KdflError, match="lower min_size"):
        dirichlet(y, 10, 0.01, np.random.default_rng(0), min_size=19, max_tries=5)
    with pytest.raises(KdflError, match="lower num_clients or min_size"):
        make_partition("dirichlet", y, 30, 0, alpha=1.0, min_size=10)


def test_shards_at_most_classes_per_client():
    y = labels_for(1500)
    for cpc in (1, 2, 3):
        for seed in range(3):
            parts = shards(y, 20, cpc, np.random.default_rng(seed))
            counts = label_counts(y, parts, 10)
            assert ((counts > 0).sum(axis=1) <= cpc).all()
            assert counts.sum() == 1500
    with pytest.raises(KdflError, match="cannot cover 10 classes"):
        make_partition("shards", y, 4, 0, classes_per_client=2)


def test_quantity_skew_sizes_vary_labels_do_not():
    y = labels_for(5000)
    parts = make_partition("quantity_skew", y, 10, 0, alpha=0.5, min_size=10)
    sizes = np.array([len(p) for p in parts])
    assert sizes.min() >= 10 and sizes.max() > 3 * sizes.min()
    big = parts[int(sizes.argmax())]
    share = np.bincount(y[big], minlength=10) / len(big)
    assert np.abs(share - np.bincount(y, minlength=10) / len(y)).max() < 0.05


def test_natural():
    y = np.zeros(10, dtype=np.int64)
    nat = [np.array([3, 1]), np.array([0, 2]), np.arange(4, 10)]
    parts = make_partition("natural", y, 3, 0, natural=nat)
    assert [p.tolist() for p in parts] == [[1, 3], [0, 2], list(range(4, 10))]
    with pytest.raises(KdflError, match="num_clients=3"):
        make_partition("natural", y, 4, 0, natural=nat)
    with pytest.raises(KdflError, match="natural split"):
        make_partition("natural", y, 3, 0)


@pytest.mark.parametrize(
    ("name", "params", "needle"),
    [
        ("dirichlet", {"alpha": 0.0}, "alpha must be a finite number > 0"),
        ("dirichlet", {"alpha": -1}, "alpha"),
        ("dirichlet", {"alpha": 1.0, "beta": 2}, "'beta'.*allowed: alpha, min_size=10, max_tries=1000"),
        ("dirichlet", {}, "needs parameter alpha"),
        ("iid", {"alpha": 1.0}, "'alpha'.*allowed: none"),
        ("shards", {"classes_per_client": 0}, "classes_per_client must be an integer >= 1"),
        ("quantity_skew", {"min_size": 2.5}, "min_size must be an integer"),
        ("dirchlet", {}, "unknown partition 'dirchlet'.*dirichlet"),
    ],
)
def test_bad_params_name_the_key(name, params, needle):
    with pytest.raises(KdflError, match=needle):
        make_partition(name, labels_for(100), 2, 0, **params)


def test_natural_and_partition_params():
    from kdfl.data.partition import partition_params

    with pytest.raises(KdflError, match="partition 'natural' takes no parameters, got 'alpha'"):
        make_partition("natural", labels_for(10), 1, 0, natural=[np.arange(10)], alpha=1.0)
    with pytest.raises(KdflError, match=r"unknown partition 'natrual'\. Did you mean 'natural'"):
        make_partition("natrual", labels_for(10), 1, 0)
    assert partition_params("natural") == {}
    assert partition_params("shards") == {"classes_per_client": inspect.Parameter.empty}
    assert partition_params("quantity_skew") == {"alpha": 1.0, "min_size": 10, "max_tries": 1000}


def test_bad_num_clients():
    with pytest.raises(KdflError, match="num_clients"):
        make_partition("iid", labels_for(100), 0, 0)


def test_format_label_table():
    y = np.array([0, 0, 1, 2, 2, 2])
    parts = [np.array([0, 1, 2]), np.array([3, 4, 5])]
    counts = label_counts(y, parts, 3)
    assert counts.tolist() == [[2, 1, 0], [0, 0, 3]]
    lines = format_label_table(counts).splitlines()
    assert lines[0].split() == ["client", "n", "0", "1", "2"]
    assert lines[1].split() == ["0", "3", "2", "1", "0"] and lines[-1].split() == ["all", "6", "2", "1", "3"]
    wide = format_label_table(np.eye(3, 100, dtype=np.int64) * 5)
    assert "top classes" in wide.splitlines()[0] and "1:5" in wide.splitlines()[2]
