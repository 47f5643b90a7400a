"""data.name = "npz": arrays prepared elsewhere, PFLlib's per-client directories, clear errors."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from kdfl import config, experiment
from kdfl.data import load, split_config
from kdfl.types import KdflError


def arrays(rng: np.random.Generator, n: int, shape: tuple[int, ...] = (1, 4), classes: int = 3,
           offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    x = rng.normal(size=(n, *shape)).astype(np.float32)
    x.reshape(n, -1)[:, 0] = np.arange(offset, offset + n)  # a row id, to follow rows through the splits
    return x, (np.arange(n) % classes).astype(np.int64)


def per_client(tmp_path, sizes=(8, 6, 7), test_sizes=(3, 2, 4)):
    rng = np.random.default_rng(0)
    out, off = {}, 0
    for i, (n, m) in enumerate(zip(sizes, test_sizes, strict=True)):
        out[f"x_train_{i}"], out[f"y_train_{i}"] = arrays(rng, n, offset=off)
        off += n
        out[f"x_test_{i}"], out[f"y_test_{i}"] = arrays(rng, m, offset=1000 + off)
        off += m
    path = tmp_path / "clients.npz"
    np.savez(path, **out)
    return path, out


def test_global_arrays_load_as_they_are(tmp_path):
    rng = np.random.default_rng(1)
    (xtr, ytr), (xte, yte) = arrays(rng, 30), arrays(rng, 10)
    np.savez(tmp_path / "d.npz", x_train=xtr.astype(np.float64), y_train=ytr.astype(np.int32), x_test=xte, y_test=yte)
    b = load("npz", path=str(tmp_path / "d.npz"))
    assert b.name == "npz" and b.input_shape == (1, 4) and b.num_classes == 3
    assert b.train.x.dtype == torch.float32 and b.train.y.dtype == torch.int64
    assert torch.equal(b.train.x, torch.from_numpy(xtr)) and torch.equal(b.test.y, torch.from_numpy(yte))
    assert b.natural_partition is None and b.natural_holdout is None
    assert load("npz", path=str(tmp_path / "d.npz"), num_classes=10).num_classes == 10


def test_per_client_arrays_give_the_natural_split_and_held_out_rows(tmp_path):
    path, a = per_client(tmp_path)
    b = load("npz", path=str(path))
    # training rows first (21), then each client's test rows as its held-out rows
    assert len(b.train) == 21 + 9 and len(b.test) == 9
    assert [len(p) for p in b.natural_partition] == [8, 6, 7] and [len(h) for h in b.natural_holdout] == [3, 2, 4]
    assert torch.equal(b.train.x[torch.from_numpy(b.natural_holdout[2])], torch.from_numpy(a["x_test_2"]))
    assert torch.equal(b.test.x, torch.from_numpy(np.concatenate([a[f"x_test_{i}"] for i in range(3)])))
    cfg = config.load(None, ["data.name=npz", f"data.path={path}", "data.num_clients=3", "partition.name=natural",
                             "data.proxy=holdout", "data.proxy_size=4", "model.arch=mlp"])
    fd = split_config(cfg)
    ids = fd.splits.train.x[:, 0, 0]
    for i in range(3):  # each client holds its own rows (less those drawn for the proxy), and its own test rows
        own = set(a[f"x_train_{i}"][:, 0, 0].tolist())
        assert set(ids[torch.from_numpy(fd.parts[i])].tolist()) <= own
        assert set(ids[torch.from_numpy(fd.holdouts[i])].tolist()) == set(a[f"x_test_{i}"][:, 0, 0].tolist())
    assert sum(map(len, fd.parts)) == 21 - 4
    assert all(v < 1000 for v in fd.splits.proxy[:, 0, 0].tolist())  # the proxy never takes a test row
    # another partition leaves the per-client test rows out of the clients' pool
    cfg = config.load(None, ["data.name=npz", f"data.path={path}", "data.num_clients=2", "partition.name=iid"])
    fd = split_config(cfg)
    assert len(fd.splits.train) == 21 and fd.holdouts is None and (fd.splits.train.x[:, 0, 0] < 1000).all()


def test_a_run_on_per_client_npz_reports_held_out_accuracy(tmp_path):
    path, _ = per_client(tmp_path)
    cfg = config.load(None, ["data.name=npz", f"data.path={path}", "data.num_clients=3", "partition.name=natural",
                             "run.rounds=1", "model.arch=mlp", "local.epochs=1", "run.executor=sequential"])
    hist = experiment.run(cfg)
    assert hist.summary["client_accuracy_mean"] is not None
    assert sorted(hist.clients["client_eval"]["clients"]) == [0, 1, 2]


def save_pfllib(folder, split: str, i: int, x: np.ndarray, y: np.ndarray) -> None:
    (folder / split).mkdir(parents=True, exist_ok=True)
    with open(folder / split / f"{i}.npz", "wb") as f:  # as PFLlib's dataset_utils.save_file writes them
        np.savez_compressed(f, data={"x": x, "y": y})


def test_pfllib_directory_reads_its_pickled_dicts_without_running_code(tmp_path):
    rng = np.random.default_rng(2)
    for i, (n, m) in enumerate([(5, 2), (4, 3)]):
        save_pfllib(tmp_path / "ds", "train", i, *arrays(rng, n, shape=(1, 3, 3)))
        save_pfllib(tmp_path / "ds", "test", i, *arrays(rng, m, shape=(1, 3, 3)))
    b = load("npz", path=str(tmp_path / "ds"))
    assert b.input_shape == (1, 3, 3) and [len(p) for p in b.natural_partition] == [5, 4]
    assert [len(h) for h in b.natural_holdout] == [2, 3] and len(b.test) == 5

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(tmp_path / "ds" / "train" / "0.npz", "wb") as f:
        np.savez(f, data=np.array({"x": Evil()}, dtype=object))
    with pytest.raises(KdflError, match=r"is not a readable .npz file .*refusing to load posix.system"):
        load("npz", path=str(tmp_path / "ds"))
    (tmp_path / "ds" / "train" / "0.npz").unlink()
    with pytest.raises(KdflError, match=r"must be numbered 0.npz ... 0.npz without gaps, found 1.npz"):
        load("npz", path=str(tmp_path / "ds"))
    with pytest.raises(KdflError, match=r"holds no <client>.npz files"):
        load("npz", path=str(tmp_path))


@pytest.mark.parametrize("make, msg", [
    (lambda x, y: {"x_train": x, "y_train": y, "x_test": x}, r"has no array y_test"),
    (lambda x, y: {"x_train": x, "x_test": x, "y_test": y}, r"has no array y_train .*found x_test, x_train, y_test"),
    (lambda x, y: {"x_train": x, "y_train": y[:-1], "x_test": x, "y_test": y}, r"x_train has 6 rows but y_train has 5"),
    (lambda x, y: {"x_train": x, "y_train": y, "x_test": x[:, :, :2], "y_test": y},
     r"training inputs have shape \(1, 4\) but test inputs \(1, 2\)"),
    (lambda x, y: {"x_train": x, "y_train": y.astype(np.float32), "x_test": x, "y_test": y},
     r"y_train must be a 1-D integer array of labels, got shape \(6,\) dtype float32"),
    (lambda x, y: {"x_train": x.astype(str), "y_train": y, "x_test": x, "y_test": y}, r"x_train must be a numeric"),
    (lambda x, y: {"x_train": x[:, 0, 0], "y_train": y, "x_test": x, "y_test": y}, r"\(n, \*input_shape\)"),
    (lambda x, y: {"x_train": x, "y_train": y - 1, "x_test": x, "y_test": y}, r"label -1 is negative"),
    (lambda x, y: {"x_train": np.where(x > 0, np.nan, x), "y_train": y, "x_test": x, "y_test": y},
     r"x_train holds NaN or infinite values"),
    (lambda x, y: {"x_train": x, "y_train": y, "x_test": x, "y_test": y, "x_train_0": x, "y_train_0": y},
     r"has both x_train/y_train and per-client x_train_<i>"),
    (lambda x, y: {"x_train_0": x, "y_train_0": y, "x_train_2": x, "y_train_2": y, "x_test": x, "y_test": y},
     r"x_train_<i> must be numbered 0 ... 1 without gaps"),
    (lambda x, y: {"x_train_0": x, "x_test": x, "y_test": y}, r"has x_train_0 but no y_train_0"),
    (lambda x, y: {"x_train_0": x, "y_train_0": y, "x_train_1": x, "y_train_1": y, "x_test_0": x, "y_test_0": y},
     r"training arrays for 2 clients but test arrays for 1"),
])
def test_malformed_arrays_are_clear_errors(tmp_path, make, msg):
    x, y = arrays(np.random.default_rng(3), 6)
    np.savez(tmp_path / "d.npz", **make(x, y))
    with pytest.raises(KdflError, match=msg):
        load("npz", path=str(tmp_path / "d.npz"))


def test_labels_out_of_range_missing_and_unreadable_files(tmp_path):
    x, y = arrays(np.random.default_rng(4), 6, classes=5)
    np.savez(tmp_path / "d.npz", x_train=x, y_train=y, x_test=x, y_test=y)
    with pytest.raises(KdflError, match=r"label 4 is out of range for data.num_classes = 3; .*set data.num_classes = 5"):
        load("npz", path=str(tmp_path / "d.npz"), num_classes=3)
    with pytest.raises(KdflError, match=r"data.name = 'npz' needs data.path"):
        load("npz")
    with pytest.raises(KdflError, match=r"data.path .*nope.npz' does not exist"):
        load("npz", path=str(tmp_path / "nope.npz"))
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    with pytest.raises(KdflError, match=r"is not a readable .npz file"):
        load("npz", path=str(tmp_path / "bad.npz"))
    with open(tmp_path / "obj.npz", "wb") as f:  # a pickled object that is not arrays
        np.savez(f, x_train=np.array([pickle.Pickler], dtype=object))
    with pytest.raises(KdflError, match=r"not a readable .npz file .*refusing to load"):
        load("npz", path=str(tmp_path / "obj.npz"))


def test_config_names_the_key(tmp_path):
    with pytest.raises(KdflError, match=r"config key 'data.path' is required with data.name = 'npz'"):
        config.load(None, ["data.name=npz"])
    with pytest.raises(KdflError, match=r"config key 'data.path': .*gone.npz' does not exist"):
        config.load(None, ["data.name=npz", f"data.path={tmp_path / 'gone.npz'}"])
    with pytest.raises(KdflError, match=r"config key 'data.path' must be a string \(a path\), got 3"):
        config.load(None, ["data.name=npz", "data.path=3"])
    with pytest.raises(KdflError, match=r"unknown config key 'data.path' for data set 'digits'.*option of npz"):
        config.load(None, ["data.path=x.npz"])
