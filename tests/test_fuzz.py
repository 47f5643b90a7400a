"""Property-based fuzzing of everything that parses untrusted input: the wire format, the
codecs, the config loader and the data-set readers.

The property everywhere: malformed input raises only the documented errors
(:class:`~kdfl.types.PayloadError` for payloads, :class:`~kdfl.types.KdflError` for configs
and archives) with a non-empty reason; never a bare IndexError, struct.error, ValueError,
TypeError, RuntimeError or MemoryError. Example counts are bounded so the file runs in well
under 30 s; the coverage-guided harnesses in ``fuzz/`` (``make fuzz``) search longer.
The regression tests at the end pin the bugs these searches found.
"""

from __future__ import annotations

import copy
import gzip
import io
import logging
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdfl import config, wire
from kdfl.compression import CODECS, MAX_DECODED_VALUES, make_codec
from kdfl.data import datasets
from kdfl.transport import pack, unpack
from kdfl.types import KdflError, PayloadError

FAST = settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck), database=None)
ROOT = Path(__file__).parents[1]
SPECS = ["fp32", "fp16", "int8", "topk:3", "svd:0.9"]
assert {s.partition(":")[0] for s in SPECS} == set(CODECS), "a new codec: add it to the fuzzed specs"


def _payload() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 4, generator=g) @ torch.randn(4, 8, generator=g)  # rank 4: svd sends factors
    return {"w": w, "b": torch.randn(8, generator=g), "c": torch.randn(2, 3, 4, generator=g),
            "n": torch.tensor([3, 4]), "m": torch.tensor([True, False])}


PACKED = {s: pack(_payload(), make_codec(s)) for s in SPECS}
ENCODED = {s: wire.encode(p) for s, p in PACKED.items()}


def rejected(err: BaseException) -> None:
    assert str(err).strip(), f"{type(err).__name__} without a reason"


@st.composite
def mutated(draw, buf: bytes) -> bytes:
    """``buf`` with a few bytes overwritten, maybe truncated, maybe extended."""
    out = bytearray(buf)
    for _ in range(draw(st.integers(0, 6))):
        if out:
            out[draw(st.integers(0, len(out) - 1))] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        out = out[: draw(st.integers(0, len(out)))]
    if draw(st.booleans()):
        out += draw(st.binary(max_size=16))
    return bytes(out)


# -- the wire format --------------------------------------------------------------------


def _wire_property(buf: bytes) -> None:
    try:
        payload = wire.decode(buf)
    except PayloadError as e:
        rejected(e)
        return
    assert wire.encode(payload) == buf  # the format is canonical: what decodes re-encodes to itself


@FAST
@given(st.binary(max_size=200))
def test_wire_decode_random_bytes(buf):
    _wire_property(buf)
    _wire_property(wire.MAGIC + buf)


@FAST
@given(st.sampled_from(SPECS).flatmap(lambda s: mutated(ENCODED[s])))
def test_wire_decode_mutated_encodings(buf):
    _wire_property(buf)


@FAST
@given(st.integers(0, 6), st.integers(0, 255), st.lists(st.integers(0, 2**32 - 1), max_size=4), st.binary(max_size=40))
def test_wire_decode_hostile_headers(count, ndim, dims, tail):
    # headers that claim more than they hold: huge counts, dims, ranks
    buf = wire.MAGIC + struct.pack("<I", count) + struct.pack("<H", 1) + b"x" + struct.pack("<BB", 0, ndim)
    _wire_property(buf + b"".join(struct.pack("<I", d) for d in dims) + tail)


# -- the codecs -------------------------------------------------------------------------


def _codec_property(spec: str, payload: dict[str, torch.Tensor]) -> None:
    try:
        out = unpack(payload, make_codec(spec))
    except PayloadError as e:
        rejected(e)
        return
    assert all(isinstance(v, torch.Tensor) for v in out.values())


@FAST
@given(st.sampled_from(SPECS).flatmap(lambda s: st.tuples(st.just(s), mutated(ENCODED[s]))))
def test_codecs_on_mutated_wire_bytes(case):
    spec, buf = case
    try:
        payload = wire.decode(buf)
    except PayloadError as e:
        rejected(e)
        return
    _codec_property(spec, payload)


DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.uint8, torch.int16,
          torch.int32, torch.int64, torch.bool]


@st.composite
def tensors(draw) -> torch.Tensor:
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.lists(st.integers(0, 4), max_size=3))
    n = int(np.prod(shape)) if shape else 1
    if dtype.is_floating_point:
        vals = draw(st.lists(st.floats(width=16), min_size=n, max_size=n))
        return torch.tensor(vals, dtype=torch.float32).to(dtype).reshape(shape)
    if dtype == torch.bool:
        return torch.tensor(draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=dtype).reshape(shape)
    info = torch.iinfo(dtype)
    special = st.sampled_from([info.min, info.max, 0, 1, -1 if info.min < 0 else 2])
    vals = draw(st.lists(st.one_of(st.integers(info.min, info.max), special), min_size=n, max_size=n))
    return torch.tensor(vals, dtype=dtype).reshape(shape)


PARTS = ["values", "q", "scale", "indices", "cols", "u", "s", "vt", "shape", "zz"]


@FAST
@given(st.sampled_from(SPECS), st.data())
def test_codecs_on_mutated_payloads(spec, data):
    payload = dict(PACKED[spec])
    for _ in range(data.draw(st.integers(1, 3))):
        op = data.draw(st.sampled_from(["replace", "delete", "add"]))
        key = data.draw(st.sampled_from(sorted(payload) or ["w@values"]))
        if op == "replace":
            payload[key] = data.draw(tensors())
        elif op == "delete":
            payload.pop(key, None)
        else:
            name = data.draw(st.sampled_from(["w", "b", "c", "n", "new"]))
            payload[f"{name}@{data.draw(st.sampled_from(PARTS))}"] = data.draw(tensors())
    _codec_property(spec, payload)


@FAST
@given(st.sampled_from(SPECS), st.dictionaries(st.sampled_from(PARTS), tensors(), max_size=4),
       st.none() | st.tuples(st.integers(0, 8), st.integers(0, 8)))
def test_every_codec_decode_on_random_parts(spec, parts, shape):
    try:
        out = make_codec(spec).decode(parts, shape)
    except PayloadError as e:
        rejected(e)
        return
    assert out.dim() == 2 and out.dtype == torch.float32 and bool(torch.isfinite(out).all())


# -- the config loader ------------------------------------------------------------------

# config.tomllib: tomllib, or tomli on Python 3.10
SHIPPED = {p.name: config.tomllib.loads(p.read_text()) for p in sorted((ROOT / "configs").glob("*.toml"))}
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1), st.floats(), st.text(max_size=10),
    st.sampled_from(["fedavg", "cnn", "mlp:hidden=0", "topk:0", "svd:2", "int8", "parallel:workers=0", "iid",
                     "cuda:9", "", "digits", "dataset:nope", "holdout", "median", "noise"]))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.text(max_size=8), inner, max_size=3), max_leaves=5)
KEYS = ["name", "rounds", "deadline", "speed_spread", "max_upload_bytes", "epochs", "steps", "lr", "batch_size",
        "client_archs", "uplink", "downlink", "proxy", "proxy_size", "num_clients", "executor", "alpha",
        "fraction", "distill", "threads", "client_holdout", "val_size", "assign", "arch", "dropout", "seed"]
SECTIONS = ["run", "data", "partition", "model", "local", "algorithm", "attack", "compression"]


def _config_property(raw: object) -> None:
    try:
        config.validate(raw)  # type: ignore[arg-type]
    except KdflError as e:
        rejected(e)


@FAST
@given(st.sampled_from(sorted(SHIPPED)), st.data())
def test_config_validate_mutated_shipped_configs(name, data):
    raw = copy.deepcopy(SHIPPED[name])
    for _ in range(data.draw(st.integers(1, 3))):
        section = data.draw(st.sampled_from(SECTIONS) | st.text(max_size=5))
        table = raw.setdefault(section, {})
        if data.draw(st.integers(0, 9)) == 0:
            raw[section] = data.draw(VALUES)  # a section that is not a table
            continue
        if not isinstance(table, dict):
            continue
        key = data.draw(st.sampled_from(sorted(table) or KEYS) | st.sampled_from(KEYS) | st.text(max_size=5))
        if data.draw(st.booleans()) and key in table:
            del table[key]
        else:
            table[key] = data.draw(VALUES)
    logging.disable(logging.WARNING)
    try:
        _config_property(raw)
    finally:
        logging.disable(logging.NOTSET)


@FAST
@given(st.dictionaries(st.sampled_from(SECTIONS) | st.text(max_size=4),
                       VALUES | st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=4), max_size=4))
def test_config_validate_random_dicts(raw):
    _config_property(raw)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@FAST
@given(st.sampled_from(sorted(SHIPPED)).flatmap(lambda n: mutated((ROOT / "configs" / n).read_bytes())))
def test_config_load_mutated_files(scratch, text):
    path = scratch / "config.toml"
    path.write_bytes(text)
    try:
        config.load(path)
    except KdflError as e:
        rejected(e)


# -- the data-set readers ---------------------------------------------------------------


def _idx_raw(magic: int, shape: tuple[int, ...]) -> bytes:
    data = np.random.default_rng(0).integers(0, 256, int(np.prod(shape)), dtype=np.uint8).tobytes()
    return magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in shape) + data


IDX = {"images": (_idx_raw(2051, (3, 28, 28)), 2051, 3), "labels": (_idx_raw(2049, (3,)), 2049, 1)}


def _tar(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


BATCH = pickle.dumps({b"labels": [1, 2], b"data": np.random.default_rng(1).integers(0, 256, (2, 3072),
                                                                                     dtype=np.uint8)}, protocol=2)


def _read(kind: str, path: Path) -> None:
    try:
        if kind in IDX:
            _, magic, ndim = IDX[kind]
            datasets._read_idx("fashion_mnist", path, magic, ndim)
        else:
            datasets._read_cifar("cifar10", path, {"train": ["batch"]}, b"labels")
    except KdflError as e:
        rejected(e)
        assert path.name in str(e)  # the reason names the file


@FAST
@given(st.sampled_from(["images", "labels", "cifar"]), st.sampled_from(["content", "archive"]), st.data())
def test_dataset_readers_on_mutated_archives(scratch, kind, layer, data):
    content = IDX[kind][0] if kind in IDX else BATCH
    if layer == "content":  # a well-formed archive of damaged content
        archive = gzip.compress(data.draw(mutated(content))) if kind in IDX else _tar({"batch": data.draw(
            mutated(content))})
    else:  # a damaged archive
        archive = data.draw(mutated(gzip.compress(content) if kind in IDX else _tar({"batch": content})))
    path = scratch / f"{kind}.gz"
    path.write_bytes(archive)
    _read(kind, path)


@FAST
@given(st.sampled_from(["images", "labels"]), st.integers(0, 2), st.integers(0, 2**32 - 1))
def test_idx_reader_on_hostile_dims(scratch, kind, which, value):
    raw = bytearray(IDX[kind][0])
    which = min(which, IDX[kind][2] - 1)
    raw[4 + 4 * which: 8 + 4 * which] = value.to_bytes(4, "big")
    path = scratch / f"{kind}-dims.gz"
    path.write_bytes(gzip.compress(bytes(raw)))
    _read(kind, path)


# -- regressions: bugs the fuzzers found ------------------------------------------------


@pytest.mark.parametrize("shape", [torch.tensor([[6, 8]], dtype=torch.int32), torch.tensor(48, dtype=torch.int32),
                                   torch.tensor([float("nan"), 8.0]), torch.tensor([True, False])])
def test_unpack_malformed_shape_entry(shape):
    # was TypeError ('int' object is not iterable) or ValueError (NaN to integer)
    payload = dict(PACKED["fp16"])
    payload["c@shape"] = shape
    with pytest.raises(PayloadError, match="'c@shape' must be a 1-D int32 tensor"):
        unpack(payload, make_codec("fp16"))


def test_unpack_entry_sent_plain_and_encoded():
    payload = {**PACKED["int8"], "w": torch.zeros(6, 8)}  # was: silently overwritten
    with pytest.raises(PayloadError, match="both plain and encoded"):
        unpack(payload, make_codec("int8"))


def test_topk_claiming_huge_columns_is_refused_before_allocating():
    # 4 bytes of values claimed 2^31 - 1 columns per row: the decoder tried to allocate 16 GB
    parts = {"values": torch.ones(2, 1, dtype=torch.float16), "indices": torch.zeros(2, 1, dtype=torch.int32),
             "cols": torch.tensor([2**31 - 1], dtype=torch.int32)}
    with pytest.raises(PayloadError, match=f"more than the limit of {MAX_DECODED_VALUES}"):
        make_codec("topk:1").decode(parts)


def test_svd_factors_claiming_a_huge_product_are_refused():
    parts = {"u": torch.ones(2**15, 1), "s": torch.ones(1), "vt": torch.ones(1, 2**14)}  # 2^29 values
    with pytest.raises(PayloadError, match="more than the limit"):
        make_codec("svd:0.9").decode(parts)


def test_unpack_bounds_the_total_decoded_size():
    parts = {f"e{i}@{k}": v for i in range(3) for k, v in
             {"u": torch.ones(2**13, 1), "s": torch.ones(1), "vt": torch.ones(1, 2**12)}.items()}  # 3 x 2^25
    with pytest.raises(PayloadError, match="payload decodes to more than"):
        unpack(parts, make_codec("svd:0.9"))


def test_wire_duplicate_names_and_bool_bytes():
    one = wire.encode({"a": torch.ones(2)})
    twice = wire.MAGIC + struct.pack("<I", 2) + one[9:] * 2
    with pytest.raises(PayloadError, match="'a' appears twice"):  # was: the second silently replaced the first
        wire.decode(twice)
    bools = bytearray(wire.encode({"m": torch.tensor([True, False])}))
    bools[-1] = 7  # a bool tensor holding byte 7
    with pytest.raises(PayloadError, match="bool but holds bytes other than 0 and 1"):
        wire.decode(bytes(bools))


def test_config_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "x.toml"
    path.write_bytes(b'[run]\nrounds = "\xff"\n')  # was: UnicodeDecodeError
    with pytest.raises(KdflError, match="is not valid TOML"):
        config.load(path)


def test_idx_dims_whose_product_overflows_int64(tmp_path):
    # 2^31 x 2^31 x 4 = 2^64 wrapped to 0 in np.prod, so an empty file "matched": ValueError from reshape
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress((2051).to_bytes(4, "big") + b"".join(
        d.to_bytes(4, "big") for d in (2**31, 2**31, 4))))
    with pytest.raises(KdflError, match="18446744073709551616 bytes of data, found 0"):
        datasets._read_idx("fashion_mnist", path, 2051, 3)


@pytest.mark.parametrize("batch", [
    BATCH.replace(b"latin1", b"latix1"),  # was LookupError: unknown encoding
    b"\x80\x04\x8e\xff\xff\xff\xff\xff\xff\xff\xff.",  # BINBYTES8 of 2^64 - 1 bytes: was OverflowError
    pickle.dumps({b"labels": [[1], [2]], b"data": np.zeros((2, 3072), np.uint8)}, protocol=2),  # 2-D labels
    # found by fuzz/run.py datasets: LONG_BINPUT at memo index 2^28 - 1 made the C unpickler
    # allocate a 2 GB memo table (out of memory); the pure-Python one keeps a dict
    b"\x80\x02}r\xff\xff\xff\x0f.",
    b"G",  # found by fuzz/run.py datasets: a truncated BINFLOAT, struct.error from the pure-Python unpickler
    # rows as nested lists: memo references let a few bytes claim N x 3072 values for np.asarray
    pickle.dumps({b"labels": [1, 2], b"data": [[0] * 3072] * 2}, protocol=2),
])
def test_corrupt_cifar_pickles_are_corrupt_archives(tmp_path, batch):
    path = tmp_path / "cifar-10-python.tar.gz"
    path.write_bytes(_tar({"batch": batch}))
    with pytest.raises(KdflError, match="cifar-10-python.tar.gz is corrupt"):
        datasets._read_cifar("cifar10", path, {"train": ["batch"]}, b"labels")


def test_wire_empty_tensor_whose_strides_overflow():
    # found by fuzz/run.py wire: shape (4, 0, 2^32 - 1, 2^32 - 1) holds no data, yet torch's
    # reshape raised RuntimeError("Stride calculation overflowed")
    head = wire.MAGIC + struct.pack("<I", 1) + struct.pack("<H", 1) + b"x" + struct.pack("<BB", 0, 4)
    with pytest.raises(PayloadError, match="too large to index"):
        wire.decode(head + struct.pack("<4I", 4, 0, 2**32 - 1, 2**32 - 1))
    assert wire.decode(head + struct.pack("<4I", 4, 0, 2**16, 2**16))["x"].shape == (4, 0, 2**16, 2**16)
