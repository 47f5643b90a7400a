"""Partition files: export -> file -> the same splits; every malformed file a clear error."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kdfl import config
from kdfl.data import export, load, make_splits, read_partition, split_config, write_partition
from kdfl.data.datasets import DataBundle
from kdfl.data.partition_file import labels_digest
from kdfl.data.proxy import FixedRows
from kdfl.types import KdflError, TensorData

SETS = ["data.num_clients=6", "data.proxy=holdout", "data.proxy_size=100", "data.val_size=50",
        "data.client_holdout=0.2", "data.test_size=200", "data.pool_size=900"]


@pytest.fixture(scope="module")
def digits():
    return load("digits")


@pytest.fixture(scope="module")
def exported():
    return export(config.load(None, SETS))


def toy(n: int = 20) -> DataBundle:
    x = torch.arange(n, dtype=torch.float32).reshape(n, 1)
    y = torch.arange(n) % 2
    return DataBundle("toy", TensorData(x, y), TensorData(x[:4], y[:4]), 2, (1,))


def test_export_covers_every_row_once_and_matches_the_run(exported, digits):
    d = exported
    assert d["format"] == "kdfl-partition/1" and d["dataset"] == "digits" and d["num_clients"] == 6
    assert d["num_train"] == len(digits.train) and d["labels_sha256"] == labels_digest(digits.train.y.numpy())
    assert len(d["proxy"]) == 100 and len(d["val"]) == 50 and len(d["test"]) == 200
    everything = np.concatenate([*d["clients"], *d["holdout"], d["proxy"], d["val"]])
    assert len(everything) == len(set(everything.tolist())) == 900 + 150  # disjoint; pool_size=900 clients' rows
    # The rows are the ones the run uses: the run's client data are the exported rows of the data set.
    fd = split_config(config.load(None, SETS))
    for rows, part in zip(d["clients"], fd.parts, strict=True):
        assert torch.equal(fd.splits.train.x[torch.from_numpy(part)], digits.train.x[torch.from_numpy(rows)])
    assert torch.equal(fd.splits.proxy, digits.train.x[torch.from_numpy(d["proxy"])])
    assert torch.equal(fd.splits.val.y, digits.train.y[torch.from_numpy(d["val"])])
    assert torch.equal(fd.splits.test.x, digits.test.x[torch.from_numpy(d["test"])])


@pytest.mark.parametrize("suffix", [".json", ".npz"])
def test_file_partition_reproduces_the_splits_exactly(exported, tmp_path, suffix):
    path = write_partition(exported, tmp_path / f"p{suffix}")
    a = split_config(config.load(None, SETS))
    b = split_config(config.load(None, [*SETS, "partition.name=file", f"partition.path={path}"]))
    assert np.array_equal(a.splits.train_index, b.splits.train_index)
    assert torch.equal(a.splits.train.x, b.splits.train.x) and torch.equal(a.splits.proxy, b.splits.proxy)
    assert torch.equal(a.splits.val.x, b.splits.val.x) and torch.equal(a.splits.test.y, b.splits.test.y)
    for p, q in zip(a.parts + a.holdouts, b.parts + b.holdouts, strict=True):
        assert np.array_equal(p, q)
    # the file also round-trips through its own export
    again = export(config.load(None, [*SETS, "partition.name=file", f"partition.path={path}"]))
    for key in ("proxy", "val", "test"):
        assert np.array_equal(again[key], exported[key])
    assert all(np.array_equal(p, q) for p, q in zip(again["clients"], exported["clients"], strict=True))


def test_hand_written_file_draws_proxy_and_val_from_the_rows_no_client_holds(tmp_path):
    bundle = toy(20)
    path = tmp_path / "p.json"
    path.write_text(json.dumps([[0, 1, 2, 3], [4, 5, 6, 7, 8]]))  # the bare-list form, no metadata
    pf = read_partition(path, bundle, 2, "toy")
    assert pf.holdouts is None and pf.proxy is None and pf.meta == {}
    s = make_splits(bundle, proxy="holdout", proxy_size=5, val_size=3, seed=1, fixed=pf.fixed_rows())
    assert s.train_index.tolist() == list(range(9))
    free = set(range(9, 20))
    assert set(s.proxy_index.tolist()) <= free and set(s.val_index.tolist()) <= free
    assert not set(s.proxy_index.tolist()) & set(s.val_index.tolist())
    with pytest.raises(KdflError, match=r"data.proxy_size = 12 but only 11 rows"):
        make_splits(bundle, proxy="holdout", proxy_size=12, seed=1, fixed=pf.fixed_rows())


def test_sizes_must_agree_with_the_rows_the_file_lists(tmp_path):
    bundle = toy(20)
    fixed = FixedRows(pool=np.arange(10), proxy=np.arange(10, 14), val=np.arange(14, 16), test=np.arange(2),
                      source="partition file p.json")
    s = make_splits(bundle, proxy="holdout", proxy_size=4, val_size=2, test_size=2, fixed=fixed)
    assert s.proxy_index.tolist() == [10, 11, 12, 13] and s.val_index.tolist() == [14, 15]
    assert s.test.x.ravel().tolist() == [0.0, 1.0]
    for kwargs, msg in (
        ({"proxy_size": 5, "val_size": 2, "test_size": 2}, r"data.proxy_size = 5 but partition file p.json lists 4 "
                                                           r"proxy rows: set data.proxy_size = 4"),
        ({"proxy_size": 4, "val_size": 0, "test_size": 2}, r"set data.val_size = 2"),
        ({"proxy_size": 4, "val_size": 2, "test_size": 0}, r"set data.test_size = 2"),
        ({"proxy_size": 4, "val_size": 2, "test_size": 2, "pool_size": 5}, r"set data.pool_size = 10 or 0"),
    ):
        with pytest.raises(KdflError, match=msg):
            make_splits(bundle, proxy="holdout", fixed=fixed, **kwargs)
    # another proxy kind ignores the file's proxy rows (they stay out of the clients' pool all the same)
    s = make_splits(bundle, proxy="none", val_size=2, test_size=2, fixed=fixed)
    assert s.proxy is None and len(s.train) == 10


@pytest.mark.parametrize("content, msg", [
    ({"clients": [[0, 1], [2, 25]]}, r"client 1's rows holds index 25, out of range for the 20 rows"),
    ({"clients": [[0, -1], [2, 3]]}, r"holds index -1, out of range"),
    ({"clients": [[0, 1, 1], [2, 3]]}, r"client 0's rows lists row 1 more than once"),
    ({"clients": [[0, 1, 2], [2, 3]]}, r"row 2 is in both client 0 and client 1"),
    ({"clients": [[0, 1], [2, 3]], "proxy": [3, 4]}, r"row 3 is in both client 1 and the proxy rows"),
    ({"clients": [[0, 1], [2, 3]], "holdout": [[4], [1]]}, r"row 1 is in both client 0 and client 1's held-out"),
    ({"clients": [[0, 1], [2, 3]], "holdout": [[4]]}, r"\"holdout\" must list one list of held-out rows per client"),
    ({"clients": [[0, 1], [2, 3], [4]]}, r"lists 3 clients but data.num_clients = 2: set data.num_clients = 3"),
    ({"clients": [[0, 1], []]}, r"client 1 has no training rows"),
    ({"clients": [[0, 1.5], [2]]}, r"client 0's rows holds 1.5, not an integer row index"),
    ({"clients": [[0, True], [2]]}, r"holds True, not an integer"),
    ({"clients": [[0], [2]], "test": [4]}, r"the test rows holds index 4, out of range for the 4 rows of the test"),
    ({"clients": "0,1"}, r"\"clients\" must be a list"),
    ({"clients": {"0": [0], "2": [1]}}, r"keys must be 0 ... 1 without gaps"),
    ({"split": [[0]]}, r"has no \"clients\" key"),
    ({"clients": [[0], [1]], "dataset": "cifar10"}, r"written for data set 'cifar10' but data.name = 'toy'"),
    ({"clients": [[0], [1]], "num_train": 60000}, r"indexes 60000 training rows but 'toy' has 20"),
    ({"clients": [[0], [1]], "labels_sha256": "0" * 64}, r"with other labels"),
    ({"clients": [[0], [1]], "format": "kdfl-partition/9"}, r"this kdfl reads 'kdfl-partition/1'"),
])
def test_malformed_json_files_are_clear_errors(tmp_path, content, msg):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(content))
    with pytest.raises(KdflError, match=msg):
        read_partition(path, toy(20), 2, "toy")


def test_dict_of_clients_and_npz_forms(tmp_path):
    bundle = toy(20)
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"clients": {"1": [5, 4], "0": [3]}}))
    assert [c.tolist() for c in read_partition(path, bundle, 2, "toy").clients] == [[3], [4, 5]]
    npz = tmp_path / "p.npz"
    np.savez(npz, client_0=np.array([3, 1]), client_1=np.array([0]), val=np.array([7, 8]))
    pf = read_partition(npz, bundle, 2, "toy")
    assert [c.tolist() for c in pf.clients] == [[1, 3], [0]] and pf.val.tolist() == [7, 8]
    np.savez(npz, client_0=np.array([3, 1]), client_2=np.array([0]))
    with pytest.raises(KdflError, match=r"client_<i> must be numbered 0 ... 1 without gaps"):
        read_partition(npz, bundle, 2, "toy")
    np.savez(npz, client_0=np.array([0.5]))
    with pytest.raises(KdflError, match=r"client 0's rows must be a 1-D array of integer row indices"):
        read_partition(npz, bundle, 1, "toy")
    np.savez(npz, rows=np.array([1]))
    with pytest.raises(KdflError, match=r"has no client_0, client_1"):
        read_partition(npz, bundle, 1, "toy")


def test_missing_unreadable_and_misnamed_files(tmp_path):
    bundle = toy(20)
    with pytest.raises(KdflError, match=r"partition.path .*nope.json' does not exist .*kdfl partition"):
        read_partition(tmp_path / "nope.json", bundle, 2, "toy")
    bad = tmp_path / "p.json"
    bad.write_text("{clients: [")
    with pytest.raises(KdflError, match=r"is not valid JSON"):
        read_partition(bad, bundle, 2, "toy")
    bad = tmp_path / "p.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(KdflError, match=r"is not a readable .npz file"):
        read_partition(bad, bundle, 2, "toy")
    txt = tmp_path / "p.txt"
    txt.write_text("[[0]]")
    with pytest.raises(KdflError, match=r"must end in .json or .npz"):
        read_partition(txt, bundle, 1, "toy")
    with pytest.raises(KdflError, match=r"must end in .json or .npz"):
        write_partition({"clients": [np.arange(2)]}, tmp_path / "p.csv")


def test_config_validation_names_the_key(tmp_path):
    with pytest.raises(KdflError, match=r"config key 'partition.path' is required with partition.name = 'file'"):
        config.load(None, ["partition.name=file"])
    with pytest.raises(KdflError, match=r"config key 'partition.path': .*missing.json' does not exist"):
        config.load(None, ["partition.name=file", f"partition.path={tmp_path / 'missing.json'}"])
    (tmp_path / "p.csv").write_text("")
    with pytest.raises(KdflError, match=r"'partition.path' must end in .json or .npz"):
        config.load(None, ["partition.name=file", f"partition.path={tmp_path / 'p.csv'}"])
    with pytest.raises(KdflError, match=r"unknown config key 'partition.alpha' for partition 'file'.*Allowed keys: "
                                        r"path"):
        config.load(None, ["partition.name=file", f"partition.path={tmp_path / 'p.csv'}", "partition.alpha=1.0"])
    with pytest.raises(KdflError, match=r"unknown config key 'partition.path' for partition 'dirichlet' \('path' is "
                                        r"an option of file\)"):
        config.load(None, ["partition.path=p.json"])


def test_file_with_a_run_of_another_config_is_checked_on_build(exported, tmp_path):
    path = write_partition(exported, tmp_path / "p.json")
    with pytest.raises(KdflError, match=r"lists 6 clients but data.num_clients = 20"):
        split_config(config.load(None, ["partition.name=file", f"partition.path={path}"]))
    with pytest.raises(KdflError, match=r"written for data set 'digits' but data.name = 'mnist1d'"):
        split_config(config.load(None, ["data.name=mnist1d", "data.num_samples=200", "data.num_clients=6",
                                        "partition.name=file", f"partition.path={path}"]))
    # the file's held-out rows are used as they are, whatever data.client_holdout says
    fd = split_config(config.load(None, [*SETS[:-1], "data.client_holdout=0.0", "partition.name=file",
                                         f"partition.path={path}"]))
    assert fd.holdouts is not None and sum(map(len, fd.holdouts)) == sum(map(len, exported["holdout"]))
