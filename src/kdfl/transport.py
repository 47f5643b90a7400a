"""Codecs applied to whole payloads, between an algorithm and the wire.

An algorithm puts float tensors in its payload; the engine (or the Flower adapter)
compresses every floating entry with the configured codec, so compression works for any
algorithm: int8 logits for FedEMA-Distill, fp16 deltas for FedAvg. Entry ``name``
becomes ``name@<part>`` entries (e.g. ``logits@q``, ``logits@scale``); tensors that are
not 2-D are viewed as (shape[0], -1) (scalars and 1-D as one row; empty ones pass as they are) and carry their shape
in ``name@shape`` (int32) so the receiver can restore it. ``fp32`` is the identity.
:func:`unpack` refuses malformed parts, an entry sent both plain and encoded, and a
payload that decodes to more than :data:`~kdfl.compression.MAX_DECODED_VALUES` values.
"""

from __future__ import annotations

import torch

from kdfl.compression import MAX_DECODED_VALUES, Codec, make_codec, split_parts
from kdfl.types import Payload, PayloadError

SEP = "@"


def codec_of(spec: str | None) -> Codec | None:
    """The codec for a spec string; None (no-op) for "" or "fp32"."""
    return None if not spec or spec == "fp32" else make_codec(spec)


def pack(payload: Payload, codec: Codec | None) -> Payload:
    """Compress every floating entry of ``payload`` with ``codec``."""
    if codec is None:
        return payload
    out: Payload = {}
    for name, t in payload.items():
        if SEP in name:
            raise PayloadError(f"payload entry names may not contain {SEP!r}: {name!r}")
        if not t.is_floating_point() or t.numel() == 0:
            out[name] = t
            continue
        if t.dim() != 2:
            out[name + SEP + "shape"] = torch.tensor(t.shape, dtype=torch.int32)
        rows = t.reshape(1, -1) if t.dim() < 2 else t.reshape(t.shape[0], -1)  # (rows, cols)
        for part, v in codec.encode(rows.float()).items():
            out[name + SEP + part] = v
    return out


def unpack(payload: Payload, codec: Codec | None) -> Payload:
    """Inverse of :func:`pack`; raises PayloadError on anything malformed."""
    if codec is None:
        return payload
    out, groups = split_parts(payload, SEP)
    total = 0
    for name, parts in groups.items():
        if name in out:
            raise PayloadError(f"entry {name!r} is sent both plain and encoded (as {sorted(parts)}); send it once")
        shape = parts.pop("shape", None)
        if shape is not None and (not isinstance(shape, torch.Tensor) or shape.dtype != torch.int32
                                  or shape.dim() != 1):
            what = f"{shape.dtype} {tuple(shape.shape)}" if isinstance(shape, torch.Tensor) else type(shape).__name__
            raise PayloadError(f"entry {name!r}: '{name}{SEP}shape' must be a 1-D int32 tensor, got {what}")
        x = codec.decode(parts)
        total += x.numel()
        if total > MAX_DECODED_VALUES:
            raise PayloadError(f"payload decodes to more than {MAX_DECODED_VALUES} values (at entry {name!r}); "
                               "a corrupt or hostile payload")
        if shape is not None:
            dims = [int(d) for d in shape.tolist()]
            numel = 1
            for d in dims:
                numel *= d
            if numel != x.numel() or min(dims, default=1) < 0:
                raise PayloadError(f"entry {name!r}: shape {dims} does not match the {x.numel()} decoded values")
            x = x.reshape(dims)
        out[name] = x
    return out
