"""Data sets as in-memory tensors: digits, mnist1d, synthetic, CIFAR-10/100, Fashion-MNIST, npz.

``load(name, **options)`` returns a :class:`DataBundle` whose ``train``/``test`` hold
float32 inputs of shape ``(n, *input_shape)`` and int64 labels.

- ``digits`` and ``mnist1d`` ship with installed packages (no network ever).
- ``synthetic`` is the Synthetic(alpha, beta) generator of FedProx (Li et al., MLSys 2020),
  with a natural per-device partition.
- ``cifar10``, ``cifar100`` and ``fashion_mnist`` read the official archives from
  ``data_dir`` (or ``$KDFL_DATA_DIR``, or ``~/.cache/kdfl``); a missing file is downloaded
  when allowed, every file is checked against its MD5 before it is parsed, and a missing,
  altered or corrupt file raises :class:`KdflError` saying which file and how to fix it.
  Fashion-MNIST is also found where Debian's ``dataset-fashion-mnist`` package installs it
  (``/usr/share/datasets/fashion-mnist``, searched last; ``apt-get install
  dataset-fashion-mnist`` as root): Debian recompressed the archives, so a file whose
  archive MD5 differs is accepted when its decompressed content has the official MD5.
- ``npz`` reads arrays prepared elsewhere (another FL library's split, a private data
  set): one ``.npz`` file with ``x_train``, ``y_train``, ``x_test``, ``y_test`` and/or
  per-client ``x_train_<i>``/``y_train_<i>``/``x_test_<i>``/``y_test_<i>``, or a
  directory in PFLlib's layout (``train/<i>.npz``, ``test/<i>.npz``). Per-client
  training arrays give a natural partition (``partition.name = "natural"``), per-client
  test arrays the clients' held-out rows. See ``docs/partitions-and-data.md``.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib
import io
import logging
import math
import os
import pickle
import random
import re
import tarfile
import tempfile
import urllib.request
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from kdfl.registry import Registry, default_options, is_int
from kdfl.types import KdflError, TensorData

log = logging.getLogger(__name__)

# filename -> md5 of the official archives; a module-level dict so tests can patch it.
CHECKSUMS: dict[str, str] = {
    "cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a",
    "cifar-100-python.tar.gz": "eb9058c3a382ffc7106e4002c42a8d85",
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
URLS: dict[str, str] = {
    "cifar-10-python.tar.gz": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    "cifar-100-python.tar.gz": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    **{
        f: "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/" + f
        for f in (
            "train-images-idx3-ubyte.gz",
            "train-labels-idx1-ubyte.gz",
            "t10k-images-idx3-ubyte.gz",
            "t10k-labels-idx1-ubyte.gz",
        )
    },
}
# filename -> md5 of the *decompressed* official file: a recompressed copy (Debian's
# dataset-fashion-mnist package recompresses the archives) holds the same data
CONTENT_CHECKSUMS: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte.gz": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte.gz": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte.gz": "15d484375f8d13e6eb1aabb0c3f46965",
}
# where system packages install data sets, searched after data_dir / KDFL_DATA_DIR / the cache
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist package
SYSTEM_DIRS: dict[str, list[Path]] = {"fashion_mnist": [DEBIAN_FASHION_MNIST]}
DOWNLOAD_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class DataBundle:
    """A loaded data set.

    Attributes:
        name: registry name.
        train: training pool, x (n, *input_shape) float32, y (n,) int64.
        test: global test set.
        num_classes: C.
        input_shape: shape of one input, e.g. (1, 8, 8).
        natural_partition: per-device indices into ``train`` when the data set has a
            natural split (synthetic, per-client npz arrays), else None.
        natural_holdout: per-device held-out rows of ``train`` (a data set's own
            per-client test arrays), used with the natural split, else None. These rows
            are never drawn into the pool, the proxy or the validation slice otherwise.
    """

    name: str
    train: TensorData
    test: TensorData
    num_classes: int
    input_shape: tuple[int, ...]
    natural_partition: list[np.ndarray] | None = None
    natural_holdout: list[np.ndarray] | None = None


class DatasetSpec(NamedTuple):
    """A registry entry: ``loader(root, download, **options)``, description, defaults."""

    loader: Callable[..., DataBundle]
    description: str
    options: dict[str, Any]


def cache_dir(data_dir: str | Path | None = None) -> Path:
    """Where data files live: ``data_dir``, else ``$KDFL_DATA_DIR``, else ``~/.cache/kdfl``."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    env = os.environ.get("KDFL_DATA_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "kdfl"


def _bundle(name: str, xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, yte: np.ndarray,
            num_classes: int, natural: list[np.ndarray] | None = None,
            natural_holdout: list[np.ndarray] | None = None) -> DataBundle:
    train = TensorData(torch.from_numpy(np.ascontiguousarray(xtr, dtype=np.float32)),
                       torch.from_numpy(np.asarray(ytr, dtype=np.int64)))
    test = TensorData(torch.from_numpy(np.ascontiguousarray(xte, dtype=np.float32)),
                      torch.from_numpy(np.asarray(yte, dtype=np.int64)))
    return DataBundle(name, train, test, num_classes, tuple(xtr.shape[1:]), natural, natural_holdout)


# --------------------------------------------------------------------------- digits


def _load_digits(root: Path, download: bool, test_fraction: float = 0.2) -> DataBundle:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not 0.0 < float(test_fraction) < 1.0:
        raise KdflError(f"digits: test_fraction must be in (0, 1), got {test_fraction}")
    d = load_digits()
    x = (d.data / 16.0).reshape(-1, 1, 8, 8)
    # Fixed seed 0, not the run seed: every run and every seed sees the same test set.
    xtr, xte, ytr, yte = train_test_split(
        x, d.target, test_size=float(test_fraction), stratify=d.target, random_state=0
    )
    return _bundle("digits", xtr, ytr, xte, yte, 10)


# -------------------------------------------------------------------------- mnist1d


def _load_mnist1d(root: Path, download: bool, num_samples: int = 10000) -> DataBundle:
    from mnist1d.data import get_dataset_args, make_dataset

    num_samples = int(num_samples)
    if num_samples < 10:
        raise KdflError(f"mnist1d: num_samples must be >= 10 (one per class), got {num_samples}")
    args = get_dataset_args()
    args.num_samples = num_samples
    path = root / f"mnist1d_n{num_samples}_seed{args.seed}.npz"
    if path.is_file():
        try:
            with np.load(path) as z:
                arrays = {k: z[k] for k in ("x", "y", "x_test", "y_test")}
            log.debug("mnist1d: read cache %s", path)
            return _mnist1d_bundle(arrays)
        except (OSError, ValueError, KeyError, zlib.error) as e:
            log.warning("mnist1d: ignoring unreadable cache %s (%s); regenerating", path, e)
    # make_dataset reseeds Python's and numpy's global generators; put them back so
    # loading data never changes anyone else's random stream.
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    arrays = {k: np.asarray(data[k]) for k in ("x", "y", "x_test", "y_test")}
    try:
        root.mkdir(parents=True, exist_ok=True)
        # Write then rename so a concurrent or interrupted run never reads half a file.
        with tempfile.NamedTemporaryFile(dir=root, suffix=".npz", delete=False) as f:
            np.savez(f, **arrays)
        os.replace(f.name, path)
    except OSError as e:
        log.warning("mnist1d: could not write cache %s (%s)", path, e)
    return _mnist1d_bundle(arrays)


def _mnist1d_bundle(a: dict[str, np.ndarray]) -> DataBundle:
    return _bundle("mnist1d", a["x"].reshape(-1, 1, 40), a["y"], a["x_test"].reshape(-1, 1, 40),
                   a["y_test"], 10)


# ------------------------------------------------------------------------ synthetic


def _load_synthetic(root: Path, download: bool, alpha: float = 1.0, beta: float = 1.0,
                    num_devices: int = 30, num_features: int = 60, num_classes: int = 10,
                    seed: int = 0, max_device_size: int = 1000) -> DataBundle:
    """Synthetic(alpha, beta) of FedProx, following the authors' generator.

    As in their code, ``alpha`` and ``beta`` are standard deviations (``np.random.normal``
    scale) although the paper writes N(0, alpha). Device sizes are lognormal(4, 2) + 50,
    capped at ``max_device_size`` to keep the data set small.
    """
    for key, val in (("alpha", alpha), ("beta", beta)):
        if not float(val) >= 0.0:
            raise KdflError(f"synthetic: {key} must be >= 0, got {val}")
    for key, val, lo in (("num_devices", num_devices, 1), ("num_features", num_features, 1),
                         ("num_classes", num_classes, 2), ("max_device_size", max_device_size, 50)):
        if int(val) < lo:
            raise KdflError(f"synthetic: {key} must be >= {lo}, got {val}")
    rng = np.random.default_rng(int(seed))
    k, d, c = int(num_devices), int(num_features), int(num_classes)
    sizes = np.minimum(rng.lognormal(4, 2, k).astype(np.int64) + 50, int(max_device_size))
    u = rng.normal(0.0, float(alpha), k)  # mean of W_k and b_k
    big_b = rng.normal(0.0, float(beta), k)  # mean of v_k
    sd = np.power(np.arange(1, d + 1, dtype=np.float64), -1.2) ** 0.5  # sqrt of diag(Sigma)
    xtr, ytr, xte, yte, natural = [], [], [], [], []
    offset = 0
    for i in range(k):
        v = rng.normal(big_b[i], 1.0, d)
        w = rng.normal(u[i], 1.0, (d, c))
        b = rng.normal(u[i], 1.0, c)
        x = v + sd * rng.standard_normal((int(sizes[i]), d))  # (n_k, d), Sigma diagonal
        y = np.argmax(x @ w + b, axis=1)  # argmax of softmax == argmax of the logits
        n_tr = int(0.8 * len(x))
        xtr.append(x[:n_tr])
        ytr.append(y[:n_tr])
        xte.append(x[n_tr:])
        yte.append(y[n_tr:])
        natural.append(np.arange(offset, offset + n_tr, dtype=np.int64))
        offset += n_tr
    return _bundle("synthetic", np.concatenate(xtr), np.concatenate(ytr), np.concatenate(xte),
                   np.concatenate(yte), c, natural)


# ------------------------------------------------------------- files on disk: common


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fix_hint(filename: str, root: Path) -> str:
    """How to get ``filename``: every file of its data set with its address, where to
    put them (the config key or the environment variable), and the Debian package where
    there is one."""
    group = [f for f in URLS if f.endswith("-ubyte.gz")] if filename in CONTENT_CHECKSUMS else [filename]
    where = "; ".join(f"{f} from {URLS.get(f, '(its official site)')}" for f in group)
    debian = ""
    if filename in CONTENT_CHECKSUMS:
        debian = (" (or, on Debian/Ubuntu as root: apt-get install dataset-fashion-mnist, which kdfl finds in "
                  f"{DEBIAN_FASHION_MNIST})")
    return (f"download {where} into {root} (or another directory named by --set data.data_dir=DIR or "
            f"KDFL_DATA_DIR){debian}")


def _content_md5(path: Path) -> str | None:
    h = hashlib.md5()
    try:
        with gzip.open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except (OSError, EOFError, zlib.error):
        return None
    return h.hexdigest()


def _check_md5(dataset: str, path: Path, root: Path) -> None:
    expected = CHECKSUMS.get(path.name)
    if expected is None:
        return
    actual = _md5(path)
    content = CONTENT_CHECKSUMS.get(path.name)
    if actual != expected and content is not None and _content_md5(path) == content:
        log.info("%s: %s is a recompressed copy of the official file (its decompressed MD5 matches)",
                 dataset, path)
        return
    if actual != expected:
        raise KdflError(
            f"{dataset}: checksum mismatch for {path}: expected MD5 {expected}, got {actual}. "
            f"The file is incomplete or altered: delete it and re-download ({_fix_hint(path.name, root)}); "
            f"for a deliberately modified copy pass verify_checksum=False"
        )


def _download(url: str, dest: Path, dataset: str, root: Path, verify: bool) -> None:
    root.mkdir(parents=True, exist_ok=True)
    log.info("%s: downloading %s to %s", dataset, url, dest)
    # Download to a temporary file and rename only after the checksum passes, so an
    # interrupted download never leaves a half file under the real name.
    fd, tmp_name = tempfile.mkstemp(dir=root, prefix=dest.name + ".", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as resp:
            for chunk in iter(lambda: resp.read(1 << 20), b""):
                out.write(chunk)
        if verify:
            expected = CHECKSUMS.get(dest.name)
            actual = _md5(tmp)
            if expected is not None and actual != expected:
                raise KdflError(
                    f"{dataset}: downloaded {dest.name} has MD5 {actual}, expected {expected}; "
                    f"{_fix_hint(dest.name, root)}"
                )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _resolve(dataset: str, filenames: list[str], root: Path, download: bool, verify: bool) -> list[Path]:
    """Find (or fetch) each file and check its MD5; raise a KdflError with the fix if not."""
    paths = []
    for name in filenames:
        # Also accept torchvision's layout so an existing copy can be reused as is.
        candidates = [root / name, root / dataset / name, root / "FashionMNIST" / "raw" / name,
                      *(d / name for d in SYSTEM_DIRS.get(dataset, []))]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            path = root / name
            reason = "download=False"
            if download:
                try:
                    _download(URLS[name], path, dataset, root, verify)
                except KdflError:
                    raise
                except Exception as e:  # any network or disk failure gets the same fix
                    reason = f"download failed: {type(e).__name__}: {e}"
            if not path.is_file():
                raise KdflError(
                    f"{dataset}: file {name} not found in {root} ({reason}); expected files: "
                    f"{', '.join(filenames)}. Fix: {_fix_hint(name, root)}"
                )
        elif verify:
            _check_md5(dataset, path, root)
        paths.append(path)
    return paths


def _corrupt(dataset: str, path: Path, err: BaseException | str) -> KdflError:
    return KdflError(
        f"{dataset}: {path} is corrupt or not in the expected format ({err}); "
        f"delete it and re-download ({_fix_hint(path.name, path.parent)})"
    )


# ------------------------------------------------------------------------ CIFAR


class _ArrayUnpickler(pickle._Unpickler):
    """Unpickles only plain containers and numpy arrays: an archive cannot run code.

    The pure-Python unpickler, whose memo is a dict: the C one grows its memo table to the
    largest index a (corrupt) ``LONG_BINPUT`` names, gigabytes for a 5-byte opcode."""

    _ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        if module.startswith("numpy") and name in ("_reconstruct", "scalar"):
            # Archives pickled by numpy 1 name numpy.core, by numpy 2 numpy._core.
            try:
                multiarray = importlib.import_module("numpy._core.multiarray")
            except ImportError:  # numpy < 2
                multiarray = importlib.import_module("numpy.core.multiarray")
            return getattr(multiarray, name)
        return super().find_class(module, name)


def _read_cifar(dataset: str, path: Path, members: dict[str, list[str]], label_key: bytes
                ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Read ``{split: [member names]}`` from the tar.gz: x (n, 3, 32, 32) uint8, y (n,)."""
    out = {}
    try:
        with tarfile.open(path, "r:gz") as tar:
            for split, names in members.items():
                xs, ys = [], []
                for member in names:
                    f = tar.extractfile(member)
                    if f is None:
                        raise KeyError(f"{member} is not a file")
                    try:
                        batch = _ArrayUnpickler(io.BytesIO(f.read()), encoding="bytes").load()
                    except Exception as e:  # a corrupt pickle raises any type (struct.error, LookupError, ...)
                        raise pickle.UnpicklingError(f"{member}: {type(e).__name__}: {e}") from e
                    data = batch[b"data"]
                    if not isinstance(data, np.ndarray) or data.dtype != np.uint8:  # not nested lists: a few
                        raise ValueError(f"{member}: data is {type(data).__name__} {getattr(data, 'dtype', '')}, "
                                         "expected a uint8 array")  # bytes of references can claim GBs
                    labels = np.fromiter(batch[label_key], dtype=np.int64, count=len(batch[label_key]))
                    if data.ndim != 2 or data.shape[1] != 3072 or labels.ndim != 1 or len(data) != len(labels):
                        raise ValueError(f"{member}: data {data.shape}, {len(labels)} labels")
                    xs.append(data.reshape(-1, 3, 32, 32))  # rows are R(1024) G(1024) B(1024)
                    ys.append(labels)
                out[split] = (np.concatenate(xs), np.concatenate(ys))
    except (tarfile.TarError, EOFError, OSError, zlib.error, pickle.UnpicklingError,
            KeyError, ValueError, TypeError, IndexError, AttributeError,
            LookupError, OverflowError, MemoryError, RecursionError) as e:  # what a corrupt pickle raises
        raise _corrupt(dataset, path, e) from e
    return out


def _channel_normalise(xtr: np.ndarray, xte: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scale uint8 to [0, 1], then standardise per channel with the train split's stats."""
    axes = (0, *range(2, xtr.ndim))
    xtr = xtr.astype(np.float32) / 255.0
    xte = xte.astype(np.float32) / 255.0
    mean = xtr.mean(axis=axes, dtype=np.float64).astype(np.float32).reshape(1, -1, *([1] * (xtr.ndim - 2)))
    std = xtr.std(axis=axes, dtype=np.float64).astype(np.float32).reshape(mean.shape)
    std = np.where(std > 0, std, 1.0).astype(np.float32)  # a constant channel stays finite
    xtr -= mean
    xtr /= std
    xte -= mean
    xte /= std
    return xtr, xte


def _load_cifar10(root: Path, download: bool, verify_checksum: bool = True) -> DataBundle:
    (path,) = _resolve("cifar10", ["cifar-10-python.tar.gz"], root, download, verify_checksum)
    d = _read_cifar("cifar10", path, {
        "train": [f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6)],
        "test": ["cifar-10-batches-py/test_batch"],
    }, b"labels")
    (xtr, ytr), (xte, yte) = d["train"], d["test"]
    _check_labels("cifar10", path, (ytr, yte), 10)
    xtr, xte = _channel_normalise(xtr, xte)
    return _bundle("cifar10", xtr, ytr, xte, yte, 10)


def _load_cifar100(root: Path, download: bool, label_type: str = "fine",
                   verify_checksum: bool = True) -> DataBundle:
    if label_type not in ("fine", "coarse"):
        raise KdflError(f"cifar100: label_type must be 'fine' or 'coarse', got {label_type!r}")
    (path,) = _resolve("cifar100", ["cifar-100-python.tar.gz"], root, download, verify_checksum)
    d = _read_cifar("cifar100", path, {"train": ["cifar-100-python/train"],
                                       "test": ["cifar-100-python/test"]},
                    b"fine_labels" if label_type == "fine" else b"coarse_labels")
    (xtr, ytr), (xte, yte) = d["train"], d["test"]
    num_classes = 100 if label_type == "fine" else 20
    _check_labels("cifar100", path, (ytr, yte), num_classes)
    xtr, xte = _channel_normalise(xtr, xte)
    return _bundle("cifar100", xtr, ytr, xte, yte, num_classes)


def _check_labels(dataset: str, path: Path, ys: tuple[np.ndarray, ...], num_classes: int) -> None:
    for y in ys:
        if len(y) and (y.min() < 0 or y.max() >= num_classes):
            raise _corrupt(dataset, path, f"labels outside [0, {num_classes})")


# ---------------------------------------------------------------- Fashion-MNIST


def _read_idx(dataset: str, path: Path, magic: int, ndim: int) -> np.ndarray:
    """Read a gzipped IDX file: big-endian magic, ``ndim`` u32 dims, then uint8 data."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise _corrupt(dataset, path, e) from e
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise _corrupt(dataset, path, f"{len(raw)} bytes, shorter than the IDX header")
    got = int.from_bytes(raw[:4], "big")
    if got != magic:
        raise _corrupt(dataset, path, f"IDX magic {got}, expected {magic}")
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    size = math.prod(dims)  # exact: np.prod wraps around in int64 (2^31 x 2^31 x 4 "= 0")
    if len(raw) - header != size:
        raise _corrupt(dataset, path, f"header says {dims} = {size} bytes of data, found {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _load_fashion_mnist(root: Path, download: bool, verify_checksum: bool = True) -> DataBundle:
    files = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
    p = _resolve("fashion_mnist", files, root, download, verify_checksum)
    xtr, ytr = _read_idx("fashion_mnist", p[0], 2051, 3), _read_idx("fashion_mnist", p[1], 2049, 1)
    xte, yte = _read_idx("fashion_mnist", p[2], 2051, 3), _read_idx("fashion_mnist", p[3], 2049, 1)
    for images, labels, ip, lp in ((xtr, ytr, p[0], p[1]), (xte, yte, p[2], p[3])):
        if images.shape[1:] != (28, 28):
            raise _corrupt("fashion_mnist", ip, f"images are {images.shape[1:]}, expected (28, 28)")
        if len(images) != len(labels):
            raise _corrupt("fashion_mnist", lp, f"{len(labels)} labels for {len(images)} images in {ip.name}")
        _check_labels("fashion_mnist", lp, (labels.astype(np.int64),), 10)
    xtr, xte = _channel_normalise(xtr[:, None], xte[:, None])  # one channel: (n, 1, 28, 28)
    return _bundle("fashion_mnist", xtr, ytr.astype(np.int64), xte, yte.astype(np.int64), 10)



# -------------------------------------------------------------------------- npz


_CLIENT_KEY = re.compile(r"^(x|y)_(train|test)_(\d+)$")


def _load_npz(root: Path, download: bool, path: str = "", num_classes: int = 0) -> DataBundle:
    """Arrays prepared elsewhere: an ``.npz`` file or a PFLlib data set directory.

    Args:
        root: unused (``path`` names the data, relative to the working directory).
        download: unused.
        path: the ``.npz`` file, or a directory holding ``train/<i>.npz`` and
            ``test/<i>.npz`` (PFLlib's layout; each holds ``x`` and ``y`` arrays, or
            PFLlib's pickled ``data`` dict of them, read without running any code).
        num_classes: C; 0 = one more than the largest label.

    Raises:
        KdflError: missing path, file or array; unreadable file; arrays whose shapes,
            dtypes or lengths disagree; labels outside ``[0, num_classes)``; NaN inputs.
    """
    if not path:
        raise KdflError("data.name = 'npz' needs data.path: an .npz file with arrays x_train, y_train, x_test, "
                        "y_test (or per-client x_train_<i>, y_train_<i>, x_test_<i>, y_test_<i>), or a PFLlib "
                        "data set directory holding train/<i>.npz and test/<i>.npz")
    src = Path(path).expanduser()
    if not src.exists():
        raise KdflError(f"data.path {str(src)!r} does not exist (data.name = 'npz'; a relative path is read "
                        f"from the working directory {os.getcwd()})")
    if src.is_dir():
        arrays = _read_client_dir(src)
    else:
        arrays = _flatten(_read_npz_file(src))
    if not is_int(num_classes) or int(num_classes) < 0:
        raise KdflError(f"npz: data.num_classes must be an integer >= 0 (0 = largest label + 1), got {num_classes!r}")
    return _npz_bundle(str(src), arrays, int(num_classes))


def _read_npz_file(path: Path) -> dict[str, Any]:
    """Every array of an ``.npz``; object arrays (pickles) are read by the restricted
    unpickler, so a file can hold PFLlib's ``data = {"x": ..., "y": ...}`` but no code."""
    out: dict[str, Any] = {}
    try:
        with zipfile.ZipFile(path) as z:
            for member in z.namelist():
                if not member.endswith(".npy"):
                    continue
                with z.open(member) as f:
                    out[member[:-4]] = _read_npy(f)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, zlib.error, pickle.UnpicklingError, KeyError,
            TypeError, IndexError, AttributeError, LookupError, OverflowError, MemoryError, RecursionError) as e:
        raise KdflError(f"npz: {path} is not a readable .npz file ({type(e).__name__}: {e}); write it with "
                        "numpy.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)") from None
    if not out:
        raise KdflError(f"npz: {path} holds no arrays")
    return out


def _read_npy(f: Any) -> Any:
    try:
        return np.lib.format.read_array(f, allow_pickle=False)
    except ValueError as e:
        if "allow_pickle" not in str(e):
            raise
    f.seek(0)
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        np.lib.format.read_array_header_1_0(f)
    else:
        np.lib.format.read_array_header_2_0(f)
    try:
        value = _ArrayUnpickler(f, encoding="latin1").load()
    except Exception as e:  # a corrupt pickle raises any type
        raise pickle.UnpicklingError(f"{type(e).__name__}: {e}") from e
    if isinstance(value, np.ndarray) and value.dtype == object and value.shape == ():
        value = value.item()  # np.savez(f, data={...}) stores the dict as a 0-d object array
    return value


def _flatten(arrays: dict[str, Any]) -> dict[str, np.ndarray]:
    """``{"data": {"x": X, "y": Y}}`` -> ``{"x": X, "y": Y}``; every value an array."""
    out: dict[str, np.ndarray] = {}
    for key, value in arrays.items():
        if isinstance(value, dict):
            out.update(_flatten({str(k): v for k, v in value.items()}))
        elif isinstance(value, np.ndarray) and value.dtype != object:
            out[key] = value
        else:
            raise KdflError(f"npz: array {key!r} holds {type(value).__name__} "
                            f"{getattr(value, 'dtype', '')}, not a numeric array")
    return out


def _read_client_dir(root: Path) -> dict[str, np.ndarray]:
    """PFLlib's layout: ``train/<i>.npz`` and ``test/<i>.npz`` with ``x`` and ``y``."""
    out: dict[str, np.ndarray] = {}
    for split in ("train", "test"):
        folder = root / split
        files = sorted((p for p in folder.glob("*.npz") if p.stem.isdigit()), key=lambda p: int(p.stem)) \
            if folder.is_dir() else []
        if not files:
            raise KdflError(f"npz: {root} is a directory but {folder} holds no <client>.npz files; give data.path "
                            "a PFLlib data set directory (train/0.npz, ..., test/0.npz, ...) or an .npz file")
        if [int(p.stem) for p in files] != list(range(len(files))):
            raise KdflError(f"npz: the files in {folder} must be numbered 0.npz ... {len(files) - 1}.npz without gaps, "
                            f"found {', '.join(p.name for p in files[:8])}")
        for p in files:
            arrays = _flatten(_read_npz_file(p))
            for a in ("x", "y"):
                if a not in arrays:
                    raise KdflError(f"npz: {p} has no array {a!r} (found {', '.join(sorted(arrays))}); each client "
                                    "file holds x and y")
                out[f"{a}_{split}_{p.stem}"] = arrays[a]
    return out


def _npz_bundle(source: str, a: dict[str, np.ndarray], num_classes: int) -> DataBundle:
    clients: dict[str, dict[int, dict[str, np.ndarray]]] = {"train": {}, "test": {}}
    for key, value in a.items():
        m = _CLIENT_KEY.match(key)
        if m:
            clients[m.group(2)].setdefault(int(m.group(3)), {})[m.group(1)] = value
    for split, per in clients.items():
        if per and sorted(per) != list(range(len(per))):
            raise KdflError(f"npz: {source}: per-client arrays x_{split}_<i> must be numbered 0 ... {len(per) - 1} "
                            f"without gaps, found clients {sorted(per)[:8]}")
        for i, xy in per.items():
            for k in ("x", "y"):
                if k not in xy:
                    raise KdflError(f"npz: {source} has {next(iter(xy))}_{split}_{i} but no {k}_{split}_{i}")
    have = set(a)
    if clients["train"] and ({"x_train", "y_train"} & have):
        raise KdflError(f"npz: {source} has both x_train/y_train and per-client x_train_<i>: keep one of them")
    if not clients["train"]:
        missing = [k for k in ("x_train", "y_train") if k not in have]
        if missing:
            raise KdflError(f"npz: {source} has no array {', '.join(missing)} (found {', '.join(sorted(have))}); "
                            "it needs x_train, y_train, x_test, y_test, or per-client x_train_<i>, y_train_<i>")
    if not clients["test"] or ({"x_test", "y_test"} & have):
        missing = [k for k in ("x_test", "y_test") if k not in have]
        if missing:
            raise KdflError(f"npz: {source} has no array {', '.join(missing)} (found {', '.join(sorted(have))}); "
                            "give the test set as x_test, y_test or as per-client x_test_<i>, y_test_<i>")
    if clients["train"] and clients["test"] and len(clients["test"]) != len(clients["train"]):
        raise KdflError(f"npz: {source} has per-client training arrays for {len(clients['train'])} clients but "
                        f"test arrays for {len(clients['test'])}: give one of each per client")

    def pair(x: np.ndarray, y: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
        if not (np.issubdtype(x.dtype, np.number) or x.dtype == bool) or x.ndim < 2:
            raise KdflError(f"npz: {source}: x_{name} must be a numeric array (n, *input_shape), got shape "
                            f"{x.shape} dtype {x.dtype}")
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise KdflError(f"npz: {source}: y_{name} must be a 1-D integer array of labels, got shape {y.shape} "
                            f"dtype {y.dtype}")
        if len(x) != len(y):
            raise KdflError(f"npz: {source}: x_{name} has {len(x)} rows but y_{name} has {len(y)} labels")
        if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
            raise KdflError(f"npz: {source}: x_{name} holds NaN or infinite values")
        return x, y.astype(np.int64)

    natural = holdout = None
    if clients["train"]:
        tr = [pair(c["x"], c["y"], f"train_{i}") for i, c in sorted(clients["train"].items())]
        xtr, ytr = _concat([x for x, _ in tr]), np.concatenate([y for _, y in tr])
        sizes = [len(y) for _, y in tr]
        natural = np.split(np.arange(len(ytr), dtype=np.int64), np.cumsum(sizes)[:-1])
    else:
        xtr, ytr = pair(a["x_train"], a["y_train"], "train")
    te: list[tuple[np.ndarray, np.ndarray]] = []
    if clients["test"]:
        te = [pair(c["x"], c["y"], f"test_{i}") for i, c in sorted(clients["test"].items())]
    if "x_test" in have or "y_test" in have:
        xte, yte = pair(a.get("x_test", np.zeros(0)), a.get("y_test", np.zeros(0)), "test")
    else:
        xte, yte = _concat([x for x, _ in te]), np.concatenate([y for _, y in te])
    if clients["train"] and clients["test"]:
        # Each client's test rows join the training array (after all training rows) as its
        # held-out rows: per-client accuracy is then measured on exactly those rows.
        start, holdout = len(ytr), []
        for _, y in te:
            holdout.append(np.arange(start, start + len(y), dtype=np.int64))
            start += len(y)
        xtr = _concat([xtr, *(x for x, _ in te)])
        ytr = np.concatenate([ytr, *(y for _, y in te)])
    shapes = {tuple(xtr.shape[1:]), tuple(xte.shape[1:])}
    if len(shapes) > 1:
        raise KdflError(f"npz: {source}: training inputs have shape {xtr.shape[1:]} but test inputs {xte.shape[1:]}")
    labels = np.concatenate([ytr, yte])
    top = int(labels.max()) if len(labels) else -1
    if len(labels) and labels.min() < 0:
        raise KdflError(f"npz: {source}: label {int(labels.min())} is negative; labels must be 0 ... C-1")
    if num_classes and top >= num_classes:
        raise KdflError(f"npz: {source}: label {top} is out of range for data.num_classes = {num_classes}; "
                        f"labels must be in [0, {num_classes}) (set data.num_classes = {top + 1}, or 0 to infer it)")
    classes = num_classes or top + 1
    if classes < 2:
        raise KdflError(f"npz: {source}: {classes} class(es) found; a classification task needs at least 2 "
                        "(set data.num_classes)")
    if len(ytr) == 0:
        raise KdflError(f"npz: {source} has no training rows")
    return _bundle("npz", xtr, ytr, xte, yte, classes, natural, holdout)


def _concat(xs: list[np.ndarray]) -> np.ndarray:
    shapes = {tuple(x.shape[1:]) for x in xs}
    if len(shapes) > 1:
        raise KdflError(f"npz: per-client input arrays disagree in shape: {', '.join(map(str, sorted(shapes)))}")
    return np.concatenate(xs)


# --------------------------------------------------------------------- registry


DATASETS: Registry[DatasetSpec] = Registry("data set", {
    "digits": DatasetSpec(_load_digits, "sklearn 8x8 handwritten digits, fixed stratified split, (1, 8, 8)",
                          {"test_fraction": 0.2}),
    "mnist1d": DatasetSpec(_load_mnist1d, "MNIST-1D (Greydanus 2020), generated locally and cached, (1, 40)",
                           {"num_samples": 10000}),
    "synthetic": DatasetSpec(
        _load_synthetic, "FedProx Synthetic(alpha, beta) with a natural per-device split, (60,)",
        {"alpha": 1.0, "beta": 1.0, "num_devices": 30, "num_features": 60, "num_classes": 10,
         "seed": 0, "max_device_size": 1000}),
    "cifar10": DatasetSpec(_load_cifar10, "CIFAR-10 from cifar-10-python.tar.gz, (3, 32, 32)",
                           {"verify_checksum": True}),
    "cifar100": DatasetSpec(_load_cifar100, "CIFAR-100 from cifar-100-python.tar.gz, (3, 32, 32)",
                            {"label_type": "fine", "verify_checksum": True}),
    "fashion_mnist": DatasetSpec(_load_fashion_mnist, "Fashion-MNIST from the four IDX .gz files, (1, 28, 28)",
                                 {"verify_checksum": True}),
    "npz": DatasetSpec(_load_npz, "arrays from an .npz file or a PFLlib directory (data.path); per-client "
                       "arrays give a natural split", {"path": "", "num_classes": 0}),
}, options_of=lambda spec: default_options(spec.options))


def load(name: str, data_dir: str | Path | None = None, download: bool = True, **options: Any) -> DataBundle:
    """Load a data set by registry name.

    Args:
        name: a key of :data:`DATASETS`.
        data_dir: where files are read, downloaded and cached (see :func:`cache_dir`).
        download: fetch a missing archive from its official URL.
        **options: data-set options; see ``DATASETS[name].options`` for names and defaults.

    Returns:
        The :class:`DataBundle`.

    Raises:
        KdflError: unknown name or option, or a missing, altered or corrupt file.
    """
    spec = DATASETS.get(name)
    options = DATASETS.bind(name, options)  # unknown options and wrong types, named with the allowed ones
    return spec.loader(cache_dir(data_dir), download, **{**spec.options, **options})
