"""Loaders: shipped data sets, and the CIFAR / Fashion-MNIST readers on small archives in the real format."""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from kdfl.data import datasets
from kdfl.data.datasets import load
from kdfl.types import KdflError


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------ shipped data sets


def test_digits_shapes_range_and_fixed_test_set():
    b = load("digits")
    assert b.input_shape == (1, 8, 8) and b.num_classes == 10
    assert b.train.x.dtype == torch.float32 and b.train.y.dtype == torch.int64
    assert b.train.x.shape == (1437, 1, 8, 8) and len(b.test) == 360
    assert float(b.train.x.min()) == 0.0 and float(b.train.x.max()) == 1.0
    again = load("digits")
    assert torch.equal(b.test.x, again.test.x) and torch.equal(b.train.y, again.train.y)
    # Stratified: every class is in the test set in about its share.
    assert np.bincount(b.test.y.numpy()).min() >= 30


def test_mnist1d_cache_and_global_rng_untouched(tmp_path, monkeypatch):
    random.seed(123)
    np.random.seed(123)
    expect_py, expect_np = random.random(), np.random.rand()
    random.seed(123)
    np.random.seed(123)
    b = load("mnist1d", data_dir=tmp_path, num_samples=600)
    assert (random.random(), np.random.rand()) == (expect_py, expect_np)
    assert b.input_shape == (1, 40) and b.train.x.shape == (480, 1, 40) and len(b.test) == 120
    assert b.train.x.dtype == torch.float32 and b.train.y.dtype == torch.int64
    assert set(b.train.y.tolist()) == set(range(10))
    assert list(tmp_path.glob("mnist1d_n600_seed*.npz"))

    import mnist1d.data

    def boom(*a, **k):
        raise AssertionError("cache miss: make_dataset called")

    monkeypatch.setattr(mnist1d.data, "make_dataset", boom)
    again = load("mnist1d", data_dir=tmp_path, num_samples=600)
    assert torch.equal(b.train.x, again.train.x) and torch.equal(b.test.y, again.test.y)


def test_synthetic_shapes_natural_partition_and_determinism():
    b = load("synthetic", num_devices=8, seed=3)
    c = load("synthetic", num_devices=8, seed=3)
    d = load("synthetic", num_devices=8, seed=4)
    assert b.input_shape == (60,) and b.num_classes == 10
    assert b.train.x.dtype == torch.float32 and b.train.y.dtype == torch.int64
    assert torch.equal(b.train.x, c.train.x) and torch.equal(b.test.y, c.test.y)
    assert b.train.x.shape != d.train.x.shape or not torch.equal(b.train.x, d.train.x)
    parts = b.natural_partition
    assert parts is not None and len(parts) == 8
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(b.train)))
    assert all(50 * 0.8 <= len(p) <= 800 for p in parts)
    # Different devices see different label mixes (that is the point of Synthetic(1, 1)).
    dists = [np.bincount(b.train.y.numpy()[p], minlength=10) / len(p) for p in parts]
    assert max(np.abs(dists[0] - q).sum() for q in dists[1:]) > 0.3


def test_unknown_name_and_option():
    with pytest.raises(KdflError, match="cifar10") as e:
        load("cifar")
    assert "digits" in str(e.value)
    with pytest.raises(KdflError, match="num_sample") as e:
        load("mnist1d", num_sample=10)
    assert "num_samples" in str(e.value)


# ------------------------------------------------------------- CIFAR in the real format


def _pickled(obj) -> bytes:
    return pickle.dumps(obj, protocol=2)


def _write_tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _images(rng, n):
    return rng.integers(0, 256, (n, 3072), dtype=np.uint8)


def _denormalise_check(x: torch.Tensor, written: np.ndarray) -> None:
    """x came from written/255 standardised per channel with *train* stats: undo and compare."""
    raw = written.reshape(-1, 3, 32, 32).astype(np.float64) / 255.0
    xn = x.numpy().astype(np.float64)
    for ch in range(3):
        slope, intercept = np.polyfit(raw[:, ch].ravel(), xn[:, ch].ravel(), 1)
        assert np.allclose(raw[:, ch] * slope + intercept, xn[:, ch], atol=1e-4)


def make_cifar10(root: Path, rng) -> dict[str, np.ndarray]:
    members, xs, ys = {}, [], []
    for i in range(1, 6):
        x, y = _images(rng, 4), rng.integers(0, 10, 4).tolist()
        xs.append(x)
        ys.extend(y)
        members[f"cifar-10-batches-py/data_batch_{i}"] = _pickled(
            {b"batch_label": b"training batch", b"labels": y, b"data": x, b"filenames": [b"a"] * 4})
    xt, yt = _images(rng, 3), rng.integers(0, 10, 3).tolist()
    members["cifar-10-batches-py/test_batch"] = _pickled({b"labels": yt, b"data": xt})
    members["cifar-10-batches-py/batches.meta"] = _pickled({b"label_names": [b"x"] * 10})
    _write_tar(root / "cifar-10-python.tar.gz", members)
    return {"xtr": np.concatenate(xs), "ytr": np.array(ys), "xte": xt, "yte": np.array(yt)}


@pytest.fixture
def cifar10_dir(tmp_path, monkeypatch):
    written = make_cifar10(tmp_path, np.random.default_rng(0))
    monkeypatch.setitem(datasets.CHECKSUMS, "cifar-10-python.tar.gz", md5(tmp_path / "cifar-10-python.tar.gz"))
    return tmp_path, written


def test_cifar10_round_trip(cifar10_dir):
    root, w = cifar10_dir
    b = load("cifar10", data_dir=root, download=False)
    assert b.input_shape == (3, 32, 32) and b.num_classes == 10
    assert b.train.x.shape == (20, 3, 32, 32) and b.train.x.dtype == torch.float32
    assert b.train.y.tolist() == w["ytr"].tolist() and b.test.y.tolist() == w["yte"].tolist()
    _denormalise_check(b.train.x, w["xtr"])
    # Train-split statistics: every channel of the train split has mean 0, std 1.
    assert torch.allclose(b.train.x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(b.train.x.std(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-4)
    # The test split uses the same (train) transform.
    flat_tr = torch.cat([b.train.x[:, 0].ravel(), b.test.x[:, 0].ravel()])
    raw = np.concatenate([w["xtr"].reshape(-1, 3, 1024)[:, 0].ravel(), w["xte"].reshape(-1, 3, 1024)[:, 0].ravel()])
    assert np.all(np.diff(flat_tr.numpy()[np.argsort(raw, kind="stable")]) >= -1e-6)


def test_cifar100_fine_and_coarse(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    x, xt = _images(rng, 6), _images(rng, 2)
    fine, coarse = rng.integers(0, 100, 6).tolist(), rng.integers(0, 20, 6).tolist()
    _write_tar(tmp_path / "cifar-100-python.tar.gz", {
        "cifar-100-python/train": _pickled({b"data": x, b"fine_labels": fine, b"coarse_labels": coarse}),
        "cifar-100-python/test": _pickled({b"data": xt, b"fine_labels": [1, 2], b"coarse_labels": [3, 4]}),
    })
    monkeypatch.setitem(datasets.CHECKSUMS, "cifar-100-python.tar.gz", md5(tmp_path / "cifar-100-python.tar.gz"))
    b = load("cifar100", data_dir=tmp_path, download=False)
    assert b.num_classes == 100 and b.train.y.tolist() == fine and b.test.y.tolist() == [1, 2]
    _denormalise_check(b.train.x, x)
    c = load("cifar100", data_dir=tmp_path, download=False, label_type="coarse")
    assert c.num_classes == 20 and c.train.y.tolist() == coarse and c.test.y.tolist() == [3, 4]
    with pytest.raises(KdflError, match="label_type"):
        load("cifar100", data_dir=tmp_path, download=False, label_type="medium")


def test_cifar_truncated_archive_is_corrupt(cifar10_dir, monkeypatch):
    root, _ = cifar10_dir
    path = root / "cifar-10-python.tar.gz"
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    monkeypatch.setitem(datasets.CHECKSUMS, path.name, md5(path))  # get past the MD5 to the parser
    with pytest.raises(KdflError, match="cifar-10-python.tar.gz.*corrupt"):
        load("cifar10", data_dir=root, download=False)
    with pytest.raises(KdflError, match="corrupt"):
        load("cifar10", data_dir=root, download=False, verify_checksum=False)


def test_cifar_pickle_cannot_run_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    _write_tar(tmp_path / "cifar-10-python.tar.gz", {
        f"cifar-10-batches-py/data_batch_{i}": pickle.dumps(Evil()) for i in range(1, 6)})
    with pytest.raises(KdflError, match="refusing to load builtins.print"):
        load("cifar10", data_dir=tmp_path, download=False, verify_checksum=False)


def test_checksum_mismatch_names_both_md5s(cifar10_dir, monkeypatch):
    root, _ = cifar10_dir
    actual = md5(root / "cifar-10-python.tar.gz")
    monkeypatch.setitem(datasets.CHECKSUMS, "cifar-10-python.tar.gz", "0" * 32)
    with pytest.raises(KdflError) as e:
        load("cifar10", data_dir=root, download=False)
    msg = str(e.value)
    assert "0" * 32 in msg and actual in msg and "cifar-10-python.tar.gz" in msg and "re-download" in msg
    # A custom copy can opt out.
    assert len(load("cifar10", data_dir=root, download=False, verify_checksum=False).train) == 20


def test_missing_file_message(tmp_path, monkeypatch):
    with pytest.raises(KdflError) as e:
        load("cifar100", data_dir=tmp_path, download=False)
    msg = str(e.value)
    assert "cifar-100-python.tar.gz" in msg and "--set data.data_dir=DIR" in msg and str(tmp_path) in msg
    assert "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz" in msg and "KDFL_DATA_DIR" in msg


def test_failed_download_gives_the_fix(tmp_path, monkeypatch):
    import urllib.error

    def offline(url, timeout=None):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(datasets.urllib.request, "urlopen", offline)
    monkeypatch.setitem(datasets.SYSTEM_DIRS, "fashion_mnist", [])  # not Debian's copy either
    with pytest.raises(KdflError, match="download failed.*no network.*--set data.data_dir=DIR") as e:
        load("fashion_mnist", data_dir=tmp_path, download=True)
    assert not list(tmp_path.glob("*.part"))  # no half file left behind
    msg = str(e.value)  # every file of the data set with its address, and Debian's package
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                 "t10k-labels-idx1-ubyte.gz"):
        assert f"{name} from http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/{name}" in msg
    assert "apt-get install dataset-fashion-mnist" in msg


def test_kdfl_data_dir_env(tmp_path, monkeypatch):
    monkeypatch.setenv("KDFL_DATA_DIR", str(tmp_path))
    assert datasets.cache_dir() == tmp_path
    assert datasets.cache_dir("/x") == Path("/x")


# ------------------------------------------------------------ Fashion-MNIST (IDX gz)


def _idx(magic: int, arr: np.ndarray) -> bytes:
    head = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in arr.shape)
    return gzip.compress(head + arr.astype(np.uint8).tobytes())


@pytest.fixture
def fmnist_dir(tmp_path, monkeypatch):
    rng = np.random.default_rng(2)
    w = {"xtr": rng.integers(0, 256, (7, 28, 28)), "ytr": rng.integers(0, 10, 7),
         "xte": rng.integers(0, 256, (3, 28, 28)), "yte": rng.integers(0, 10, 3)}
    files = {"train-images-idx3-ubyte.gz": _idx(2051, w["xtr"]), "train-labels-idx1-ubyte.gz": _idx(2049, w["ytr"]),
             "t10k-images-idx3-ubyte.gz": _idx(2051, w["xte"]), "t10k-labels-idx1-ubyte.gz": _idx(2049, w["yte"])}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        monkeypatch.setitem(datasets.CHECKSUMS, name, hashlib.md5(data).hexdigest())
    return tmp_path, w


def test_fashion_mnist_round_trip(fmnist_dir):
    root, w = fmnist_dir
    b = load("fashion_mnist", data_dir=root, download=False)
    assert b.input_shape == (1, 28, 28) and b.train.x.shape == (7, 1, 28, 28)
    assert b.train.y.tolist() == w["ytr"].tolist() and b.test.y.tolist() == w["yte"].tolist()
    raw = w["xtr"].astype(np.float64) / 255
    mean, std = raw.mean(), raw.std()
    assert np.allclose(b.train.x.numpy()[:, 0] * std + mean, raw, atol=1e-5)
    assert np.allclose(b.test.x.numpy()[:, 0] * std + mean, w["xte"] / 255, atol=1e-5)


@pytest.mark.parametrize("damage", ["truncate", "magic", "count"])
def test_fashion_mnist_corrupt(fmnist_dir, monkeypatch, damage):
    root, w = fmnist_dir
    name = "train-images-idx3-ubyte.gz" if damage != "count" else "train-labels-idx1-ubyte.gz"
    path = root / name
    if damage == "truncate":
        data = path.read_bytes()[:-20]
    elif damage == "magic":
        data = _idx(2049, w["xtr"])
    else:
        data = _idx(2049, w["ytr"][:5])
    path.write_bytes(data)
    monkeypatch.setitem(datasets.CHECKSUMS, name, hashlib.md5(data).hexdigest())
    with pytest.raises(KdflError, match=f"{name}.*corrupt"):
        load("fashion_mnist", data_dir=root, download=False)


def test_fashion_mnist_recompressed_copy_accepted_by_its_content(fmnist_dir, monkeypatch):
    """Debian recompresses the archives: the archive MD5 differs, the decompressed one is official."""
    root, w = fmnist_dir
    name = "train-images-idx3-ubyte.gz"
    content = gzip.decompress((root / name).read_bytes())
    monkeypatch.setitem(datasets.CONTENT_CHECKSUMS, name, hashlib.md5(content).hexdigest())
    (root / name).write_bytes(gzip.compress(content, compresslevel=1, mtime=12345))  # another archive
    assert hashlib.md5((root / name).read_bytes()).hexdigest() != datasets.CHECKSUMS[name]
    assert load("fashion_mnist", data_dir=root, download=False).train.x.shape == (7, 1, 28, 28)
    monkeypatch.setitem(datasets.CONTENT_CHECKSUMS, name, "0" * 32)  # altered content: still refused
    with pytest.raises(KdflError, match="checksum mismatch"):
        load("fashion_mnist", data_dir=root, download=False)


def test_fashion_mnist_found_in_a_system_directory(fmnist_dir, tmp_path_factory, monkeypatch):
    root, _ = fmnist_dir
    monkeypatch.setitem(datasets.SYSTEM_DIRS, "fashion_mnist", [root])
    empty = tmp_path_factory.mktemp("empty")
    assert len(load("fashion_mnist", data_dir=empty, download=False).train) == 7


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists(),
                    reason="Debian's dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)")
def test_debian_fashion_mnist_is_the_official_data(tmp_path):
    b = load("fashion_mnist", data_dir=tmp_path, download=False)  # found in /usr/share, checked by content
    assert len(b.train) == 60000 and len(b.test) == 10000
    assert np.bincount(b.train.y.numpy()).tolist() == [6000] * 10
