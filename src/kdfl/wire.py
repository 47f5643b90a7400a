"""The wire format: a payload (named tensors) to bytes and back.

Every byte count kdfl reports is ``len(encode(payload))``: measured on what would cross
the network, never estimated. The format is small and self-describing:

    magic b"KDFL1" | u32 count | per tensor: u16 name length, name (utf-8),
    u8 dtype code, u8 ndim, ndim x u32 dims, raw little-endian data

``decode`` checks every length and dtype and raises :class:`PayloadError` with a clear
message on truncated or malformed input (duplicate names and bool bytes other than 0/1
included); it never returns a partly decoded payload. It refuses, before parsing anything,
a buffer longer than ``max_bytes`` (default :data:`DEFAULT_MAX_BYTES`): an upload's size is
bounded before a byte of it is trusted. The round driver sets the limit for uploads from
``[run] max_upload_bytes`` (:func:`upload_limit`, :func:`limit_uploads`).
"""

from __future__ import annotations

import contextlib
import contextvars
import struct
from collections.abc import Iterator

import torch
from torch import Tensor

from kdfl.types import Payload, PayloadError

MAGIC = b"KDFL1"
_DTYPES: list[torch.dtype] = [
    torch.float32, torch.float16, torch.bfloat16, torch.float64,
    torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool,
]
_CODE = {dt: i for i, dt in enumerate(_DTYPES)}

DEFAULT_MAX_BYTES = 256 * 2**20  # 256 MiB: ~67M float32 values, far above any model kdfl trains on a CPU
_UPLOAD_LIMIT: contextvars.ContextVar[int] = contextvars.ContextVar("kdfl_upload_limit", default=DEFAULT_MAX_BYTES)


def upload_limit() -> int:
    """The largest upload (bytes) the server decodes now: ``[run] max_upload_bytes`` of the
    round being driven (:func:`limit_uploads`), else :data:`DEFAULT_MAX_BYTES`; 0 = no limit.
    Transports pass it to :func:`decode` for every upload."""
    return _UPLOAD_LIMIT.get()


@contextlib.contextmanager
def limit_uploads(max_bytes: int) -> Iterator[None]:
    """Within the block, :func:`upload_limit` is ``max_bytes`` (0 = no limit). The round
    driver wraps each exchange in it, so a transport needs no settings of its own."""
    if max_bytes < 0:
        raise PayloadError(f"the upload limit must be >= 0 bytes (0 = none), got {max_bytes}")
    token = _UPLOAD_LIMIT.set(max_bytes)
    try:
        yield
    finally:
        _UPLOAD_LIMIT.reset(token)


def check_size(size: int, max_bytes: int) -> None:
    """Raise :class:`PayloadError` when ``size`` bytes exceed ``max_bytes`` (0 = no limit)."""
    if max_bytes and size > max_bytes:
        raise PayloadError(f"payload of {size} bytes exceeds the limit of {max_bytes} bytes and was not decoded "
                           "(for uploads: raise [run] max_upload_bytes if they are legitimate; 0 = no limit)")


def encode(payload: Payload) -> bytes:
    """Serialise a payload. Tensors are detached, moved to CPU and made contiguous."""
    parts = [MAGIC, struct.pack("<I", len(payload))]
    for name, t in payload.items():
        if not isinstance(t, Tensor):
            raise PayloadError(f"payload entry {name!r} is {type(t).__name__}, expected a torch.Tensor")
        if t.dtype not in _CODE:
            raise PayloadError(f"payload entry {name!r} has unsupported dtype {t.dtype}")
        key = name.encode()
        t = t.detach().cpu().contiguous()
        parts.append(struct.pack("<H", len(key)) + key)
        parts.append(struct.pack("<BB", _CODE[t.dtype], t.dim()))
        parts.append(struct.pack(f"<{t.dim()}I", *t.shape))
        # view as bytes: works for every dtype including bf16/bool
        parts.append(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return b"".join(parts)


def decode(buf: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> Payload:
    """Parse bytes from :func:`encode`; raise :class:`PayloadError` when malformed or, before
    parsing, when ``buf`` is longer than ``max_bytes`` (0 = no limit)."""
    check_size(len(buf), max_bytes)
    view = memoryview(buf)
    pos = 0

    def take(n: int, what: str) -> memoryview:
        nonlocal pos
        if pos + n > len(view):
            raise PayloadError(
                f"payload truncated: needed {n} bytes for {what} at offset {pos}, "
                f"only {len(view) - pos} left (total {len(view)} bytes)"
            )
        out = view[pos : pos + n]
        pos += n
        return out

    if bytes(take(len(MAGIC), "the header")) != MAGIC:
        raise PayloadError("not a kdfl payload: bad magic bytes (expected KDFL1)")
    (count,) = struct.unpack("<I", take(4, "the entry count"))
    out: Payload = {}
    for _ in range(count):
        (klen,) = struct.unpack("<H", take(2, "a name length"))
        try:
            name = bytes(take(klen, "a name")).decode()
        except UnicodeDecodeError as e:
            raise PayloadError(f"payload entry name is not valid utf-8: {e}") from None
        if name in out:
            raise PayloadError(f"payload entry {name!r} appears twice")
        code, ndim = struct.unpack("<BB", take(2, f"the dtype of {name!r}"))
        if code >= len(_DTYPES):
            raise PayloadError(f"payload entry {name!r} has unknown dtype code {code}")
        dtype = _DTYPES[code]
        shape = struct.unpack(f"<{ndim}I", take(4 * ndim, f"the shape of {name!r}"))
        numel, span = 1, 1
        for s in shape:
            numel *= s
            span *= max(s, 1)
        if span >= 2**63:  # even an empty tensor's strides must fit in int64
            raise PayloadError(f"payload entry {name!r} has shape {tuple(shape)}, too large to index")
        itemsize = torch.empty((), dtype=dtype).element_size()
        raw = take(numel * itemsize, f"the data of {name!r} {tuple(shape)}")
        data = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if numel else torch.empty(0, dtype=torch.uint8)
        if dtype == torch.bool and numel and int(data.max()) > 1:
            raise PayloadError(f"payload entry {name!r} is bool but holds bytes other than 0 and 1")
        out[name] = data.view(dtype).reshape(shape).clone()
    if pos != len(view):
        raise PayloadError(f"payload has {len(view) - pos} trailing bytes after {count} entries")
    return out


def nbytes(payload: Payload) -> int:
    """Bytes on the wire for ``payload``: the length of its encoding."""
    return len(encode(payload))
