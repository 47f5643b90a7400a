"""The fuzz targets shared by the atheris harnesses (``fuzz_*.py``) and the seed corpus
(``make_corpus.py``): each takes the fuzzer's bytes and fails (raises anything but the
documented errors, or an error without a reason) only on a bug.

Documented errors: :class:`~kdfl.types.PayloadError` for payloads (wire format, codecs),
:class:`~kdfl.types.KdflError` for configs and data-set archives.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from kdfl import config, wire
from kdfl.compression import make_codec
from kdfl.data import datasets
from kdfl.transport import unpack
from kdfl.types import KdflError, PayloadError

# the first byte of a codec input picks the codec
CODEC_SPECS = ["fp32", "fp16", "int8", "topk:3", "svd:0.9"]
# the first byte of a data-set input picks the reader (and whether the rest is compressed for it)
READERS = ["idx_images", "idx_labels", "cifar"]
_SCRATCH = Path(tempfile.mkdtemp(prefix="kdfl-fuzz-"))


def _reason(err: Exception) -> None:
    if not str(err).strip():
        raise AssertionError(f"{type(err).__name__} without a reason") from err


def wire_target(data: bytes) -> None:
    """``wire.decode``: a PayloadError with a reason, or a payload that re-encodes to ``data``."""
    try:
        payload = wire.decode(data)
    except PayloadError as e:
        _reason(e)
        return
    if wire.encode(payload) != data:
        raise AssertionError("decode accepted bytes that do not re-encode to themselves")


def codec_target(data: bytes) -> None:
    """``data[0]`` picks a codec; ``data[1:]`` is a wire encoding of a packed payload."""
    if not data:
        return
    codec = make_codec(CODEC_SPECS[data[0] % len(CODEC_SPECS)])
    try:
        unpack(wire.decode(data[1:]), codec)
    except PayloadError as e:
        _reason(e)


def config_target(data: bytes) -> None:
    """``data`` as a config file for ``config.load``."""
    path = _SCRATCH / "config.toml"
    path.write_bytes(data)
    try:
        config.load(path)
    except KdflError as e:
        _reason(e)


def dataset_target(data: bytes) -> None:
    """``data[0]`` picks the reader (bit 7: ``data[1:]`` is the archive itself, else its
    content, compressed here); the reader must answer KdflError naming the file."""
    import gzip
    import io
    import tarfile

    if not data:
        return
    kind, body = READERS[(data[0] & 0x7F) % len(READERS)], data[1:]
    if not data[0] & 0x80:  # content: build a well-formed archive around it
        if kind == "cifar":
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w:gz") as tar:
                info = tarfile.TarInfo("batch")
                info.size = len(body)
                tar.addfile(info, io.BytesIO(body))
            body = buf.getvalue()
        else:
            body = gzip.compress(body, mtime=0)
    path = _SCRATCH / f"{kind}.gz"
    path.write_bytes(body)
    try:
        if kind == "cifar":
            datasets._read_cifar("cifar10", path, {"train": ["batch"]}, b"labels")
        else:
            magic, ndim = (2051, 3) if kind == "idx_images" else (2049, 1)
            datasets._read_idx("fashion_mnist", path, magic, ndim)
    except KdflError as e:
        _reason(e)
        if path.name not in str(e):
            raise AssertionError(f"the reason does not name the file: {e}") from e


TARGETS = {"wire": wire_target, "codecs": codec_target, "config": config_target, "datasets": dataset_target}
