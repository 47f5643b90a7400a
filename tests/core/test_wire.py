import pytest
import torch

from kdfl import wire
from kdfl.types import PayloadError


def sample_payload():
    return {
        "delta.w": torch.randn(3, 4),
        "logits": torch.randn(5, 10).half(),
        "q": torch.randint(-127, 127, (5, 10), dtype=torch.int8),
        "count": torch.tensor(7, dtype=torch.int64),
        "empty": torch.zeros(0, 3),
    }


def test_round_trip_exact_for_every_dtype():
    p = sample_payload()
    q = wire.decode(wire.encode(p))
    assert list(q) == list(p)
    for k in p:
        assert q[k].dtype == p[k].dtype and q[k].shape == p[k].shape and torch.equal(q[k], p[k])


def test_byte_count_is_the_encoded_size():
    p = {"w": torch.zeros(10, 10), "s": torch.zeros(10, dtype=torch.float16)}
    # header 5 + count 4; per entry: 2 + len(name) + 2 (dtype, ndim) + 4*ndim + data
    expected = 9 + (2 + 1 + 2 + 8 + 400) + (2 + 1 + 2 + 4 + 20)
    assert wire.nbytes(p) == len(wire.encode(p)) == expected


@pytest.mark.parametrize("cut", [1, 4, 10, 50])
def test_truncated_bytes_rejected(cut):
    buf = wire.encode(sample_payload())
    with pytest.raises(PayloadError, match="truncated"):
        wire.decode(buf[:-cut])


def test_garbage_rejected():
    with pytest.raises(PayloadError, match="magic"):
        wire.decode(b"hello world")
    with pytest.raises(PayloadError, match="trailing"):
        wire.decode(wire.encode({"a": torch.ones(2)}) + b"x")
