"""Explicit randomness: every stream derives from integers, never from global state.

``derive(seed, round, client_id, ...)`` hashes its arguments into a 63-bit seed, so the
same run seed gives the same numbers for a (round, client) pair whatever ran before,
which is what makes a resumed run bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch


def derive(*keys: int | str) -> int:
    """A 63-bit seed from a tuple of ints/strings (stable across processes and runs)."""
    text = "/".join(str(k) for k in keys).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def generator(*keys: int | str) -> torch.Generator:
    """A torch generator seeded from ``derive(*keys)``."""
    return torch.Generator().manual_seed(derive(*keys))


def numpy_rng(*keys: int | str) -> np.random.Generator:
    """A numpy generator seeded from ``derive(*keys)``."""
    return np.random.default_rng(derive(*keys))
