"""kdfl payloads <-> Flower records.

A payload (named tensors, already compressed by :func:`kdfl.transport.pack`) travels as
an ``ArrayRecord`` of named arrays in their native dtype: fp16 or int8 logits cross the
wire as they are. Client state (what a stateful client keeps between rounds, never sent)
lives in the ClientApp's ``context.state``.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord

from kdfl.types import ClientState, Payload, PayloadError


def payload_to_record(payload: Payload) -> ArrayRecord:
    """Named tensors -> ``ArrayRecord`` (same names, same dtypes and shapes)."""
    arrays = {}
    for name, t in payload.items():
        if not isinstance(t, torch.Tensor):
            raise PayloadError(f"payload entry {name!r} is {type(t).__name__}, expected a torch.Tensor")
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16: Flower's Array cannot carry it
            raise PayloadError(f"payload entry {name!r} is bfloat16, which Flower's Array cannot carry; use fp16")
        arrays[name] = Array(t.detach().cpu().contiguous().numpy())
    return ArrayRecord(arrays)


def record_to_payload(record: ArrayRecord) -> Payload:
    """Inverse of :func:`payload_to_record`; raises PayloadError on an unreadable array."""
    out: Payload = {}
    for name, arr in record.items():
        try:
            x = arr.numpy()
        except Exception as e:  # a malformed array from a remote node
            raise PayloadError(f"array {name!r} cannot be decoded: {e}") from None
        out[name] = torch.from_numpy(np.array(x, copy=True))
    return out


def nbytes(record: ArrayRecord) -> int:
    """Bytes of the array data in ``record``: sum over arrays of numel x itemsize, read from
    the arrays as Flower delivered them (``Array.data`` adds NumPy's ``.npy`` header of
    about 128 bytes per array; ``kdfl.wire.nbytes`` adds kdfl's own small per-entry header)."""
    total = 0
    for arr in record.values():
        total += int(np.prod(arr.shape, dtype=np.int64)) * np.dtype(arr.dtype).itemsize
    return total


STATE_KEY = "kdfl.client-state"


def save_client_state(state: ClientState | None) -> ConfigRecord:
    """A client's state as a ``ConfigRecord`` holding its ``torch.save`` bytes."""
    buf = io.BytesIO()
    torch.save(state, buf)
    return ConfigRecord({"state": buf.getvalue()})


def load_client_state(record: Any) -> ClientState | None:
    """Inverse of :func:`save_client_state` (None when nothing was stored)."""
    if record is None or "state" not in record:
        return None
    return torch.load(io.BytesIO(record["state"]), weights_only=False)
