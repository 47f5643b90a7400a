"""Codecs: error bounds, top-k guarantees, byte counts, malformed payloads."""

from __future__ import annotations

import pytest
import torch

from kdfl import wire
from kdfl.compression import CODECS, FP16, FP32, SVD, Int8, TopK, make_codec, svd_rank
from kdfl.types import KdflError, PayloadError


def _inputs() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 10, generator=g)
    x[3] = 0.0  # a row of zeros
    x[7] *= 1e4  # large magnitudes (still in fp16 range)
    x[8] *= 1e-6  # tiny ones
    x[9, 2] = 6.5e4
    big = torch.randn(20, 7, generator=g) * 1e30  # fine for fp32/int8, not fp16
    return [x, big, torch.zeros(4, 3)]


@pytest.mark.parametrize("codec", [FP32(), FP16(), Int8()])
def test_round_trip_within_error_bound(codec):
    for x in _inputs():
        if isinstance(codec, FP16) and x.abs().max() > 6e4 + 1e4:
            with pytest.raises(KdflError, match="overflows float16"):
                codec.encode(x)
            continue
        y = codec.decode(codec.encode(x), shape=tuple(x.shape))
        assert y.dtype == torch.float32 and y.shape == x.shape
        bound = codec.error_bound(x)
        assert bool(((y - x).abs() <= bound).all()), codec.name
    x = _inputs()[0]
    assert torch.equal(FP32().error_bound(x), torch.zeros_like(x))
    assert torch.equal(FP32().decode(FP32().encode(x)), x)


def test_int8_bound_is_half_a_step_and_tight():
    x = torch.tensor([[127.0, -63.4, 0.0, 1.26], [0.0, 0.0, 0.0, 0.0]])
    p = Int8().encode(x)
    assert torch.equal(p["scale"], torch.tensor([1.0, 1.0]))  # 127/127, zero row -> 1
    assert p["q"].tolist() == [[127, -63, 0, 1], [0, 0, 0, 0]]
    assert bool((Int8().error_bound(x) <= 0.5 + 1e-4).all())


def test_fp16_bound_values():
    b = FP16().error_bound(torch.tensor([[1.0, 1.5, 1024.0, 0.0]]))
    assert b.tolist() == [[2.0**-11, 2.0**-11, 0.5, 2.0**-25]]


def test_topk_guarantees():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 10, generator=g) * 5
    codec = TopK(3)
    y = codec.decode(codec.encode(x), shape=(200, 10))
    top = x.topk(3, dim=1).indices
    kept = torch.zeros_like(x, dtype=torch.bool).scatter_(1, top, True)
    bound = codec.error_bound(x)
    # kept entries: within the fp16 rounding bound; dropped: no bound (inf)
    assert bool(((y - x).abs()[kept] <= bound[kept]).all())
    assert bool(torch.isinf(bound[~kept]).all())
    # dropped entries strictly below every kept entry of their row, by fill_gap
    min_kept = torch.where(kept, y, torch.inf).min(1).values
    max_dropped = torch.where(kept, -torch.inf, y).max(1).values
    assert bool((max_dropped < min_kept).all())
    assert torch.allclose(max_dropped, min_kept - 10.0)
    # argmax preserved
    assert torch.equal(y.argmax(1), x.argmax(1))
    # softmax well defined
    assert bool(torch.isfinite(torch.softmax(y, 1)).all())
    # k = cols keeps everything (fp16 precision)
    full = TopK(10)
    assert torch.allclose(full.decode(full.encode(x)), x.half().float())


def test_topk_index_dtypes_and_k_check():
    assert TopK(2).encode(torch.randn(3, 256))["indices"].dtype == torch.uint8
    assert TopK(2).encode(torch.randn(3, 257))["indices"].dtype == torch.int16
    with pytest.raises(KdflError, match=r"k=5 exceeds the 4 columns of x; use k in 1..4"):
        TopK(5).encode(torch.randn(3, 4))


def test_bytes_equal_the_wire_encoding():
    x = torch.randn(1000, 10)
    for spec in ["fp32", "fp16", "int8", "topk:3"]:
        p = make_codec(spec).encode(x)
        assert wire.nbytes(p) == len(wire.encode(p))
        assert torch.equal(make_codec(spec).decode(wire.decode(wire.encode(p))), make_codec(spec).decode(p))
    header = 5 + 4  # magic + count

    def entry(name: str, ndim: int, data: int) -> int:
        return 2 + len(name) + 1 + 1 + 4 * ndim + data  # name len, name, dtype, ndim, dims, data

    fp32 = header + entry("values", 2, 1000 * 10 * 4)
    int8 = header + entry("q", 2, 1000 * 10) + entry("scale", 1, 1000 * 4)
    fp16 = header + entry("values", 2, 1000 * 10 * 2)
    topk = header + entry("values", 2, 1000 * 3 * 2) + entry("indices", 2, 1000 * 3) + entry("cols", 1, 4)
    # fp32: 9 + (2+6+2+8 + 40000); int8: 9 + (2+1+2+8 + 10000) + (2+5+2+4 + 4000)
    # topk:3: 9 + (2+6+2+8 + 6000) + (2+7+2+8 + 3000) + (2+4+2+4 + 4)
    assert (fp32, int8, fp16, topk) == (40027, 14035, 20027, 9062)
    assert wire.nbytes(FP32().encode(x)) == fp32
    assert wire.nbytes(Int8().encode(x)) == int8
    assert wire.nbytes(FP16().encode(x)) == fp16
    assert wire.nbytes(TopK(3).encode(x)) == topk
    assert 0.25 < int8 / fp32 < 0.36  # 1/4 for the values plus 1/10 for the row scales


def _bad(payload: dict, **change) -> dict:
    out = {k: v.clone() for k, v in payload.items()}
    out.update(change)
    return out


def test_malformed_payloads_raise_payload_error():
    x = torch.randn(6, 5)
    p32, p16, p8, pk = FP32().encode(x), FP16().encode(x), Int8().encode(x), TopK(2).encode(x)
    nan32 = p32["values"].clone()
    nan32[2, 3] = float("nan")
    inf16 = p16["values"].clone()
    inf16[0, 0] = float("inf")
    cases = [
        (FP32(), _bad(p32, values=nan32), "non-finite"),
        (FP32(), _bad(p32, values=p32["values"].double()), "dtype"),
        (FP32(), _bad(p32, values=p32["values"][0]), "2 dimensions"),
        (FP32(), {}, "missing key 'values'"),
        (FP16(), _bad(p16, values=inf16), "non-finite"),
        (Int8(), _bad(p8, scale=torch.full((6,), float("nan"))), "finite and > 0"),
        (Int8(), _bad(p8, scale=torch.zeros(6)), "finite and > 0"),
        (Int8(), _bad(p8, scale=torch.ones(5)), "5 scales for 6 rows"),
        (Int8(), _bad(p8, q=p8["q"].to(torch.int16)), "dtype"),
        (Int8(), _bad(p8, scale=torch.full((6,), 3e38)), "non-finite"),
        (Int8(), {"q": p8["q"]}, "missing key 'scale'"),
        (TopK(2), _bad(pk, indices=torch.full((6, 2), 200, dtype=torch.uint8)), r"\[0, 5\)"),
        (TopK(2), _bad(pk, indices=torch.zeros((6, 2), dtype=torch.uint8)), "duplicate"),
        (TopK(2), _bad(pk, indices=pk["indices"][:, :1]), "differ in shape"),
        (TopK(2), _bad(pk, cols=torch.tensor([1], dtype=torch.int32)), "1 <= k <= cols"),
        (TopK(2), _bad(pk, values=pk["values"].float()), "dtype"),
    ]
    for codec, payload, msg in cases:
        with pytest.raises(PayloadError, match=msg):
            codec.decode(payload)
    # shape mismatch with the expected shape
    for codec, p in [(FP32(), p32), (FP16(), p16), (Int8(), p8), (TopK(2), pk)]:
        with pytest.raises(PayloadError, match=r"expected \(6, 4\)"):
            codec.decode(p, shape=(6, 4))


def test_truncated_wire_bytes():
    buf = wire.encode(Int8().encode(torch.randn(8, 4)))
    for cut in (3, 20, len(buf) - 1):
        with pytest.raises(PayloadError):
            wire.decode(buf[:cut])


def test_encode_rejects_bad_input():
    for codec in (FP32(), FP16(), Int8(), TopK(1)):
        with pytest.raises(KdflError, match="non-finite"):
            codec.encode(torch.tensor([[1.0, float("nan")]]))
        with pytest.raises(KdflError, match=r"\(rows, cols\)"):
            codec.encode(torch.zeros(3))


def test_make_codec():
    assert isinstance(make_codec("fp32"), FP32) and isinstance(make_codec("int8"), Int8)
    assert make_codec("topk:3") == TopK(3) == make_codec("topk:k=3")
    assert make_codec("topk:k=2,fill_gap=20").fill_gap == 20
    for codec in (FP32(), FP16(), Int8(), TopK(4), TopK(2, fill_gap=3.0)):
        assert make_codec(codec.name) == codec
    assert set(CODECS) == {"fp32", "fp16", "int8", "topk", "svd"}
    assert make_codec("svd:0.9") == SVD(0.9) == make_codec("svd:energy=0.9") and make_codec("svd") == SVD(0.95)
    with pytest.raises(KdflError, match="'int8'"):
        make_codec("int9")
    with pytest.raises(KdflError, match="needs parameter k"):
        make_codec("topk")
    with pytest.raises(KdflError, match="integer >= 1"):
        make_codec("topk:0")
    with pytest.raises(KdflError, match="integer >= 1"):
        make_codec("topk:abc")
    with pytest.raises(KdflError, match="no parameters"):
        make_codec("fp32:3")
    with pytest.raises(KdflError, match="no parameter 'bits'; allowed: k, fill_gap"):
        make_codec("topk:k=3,bits=4")
    with pytest.raises(KdflError, match="codec 'topk': k is given twice"):
        make_codec("topk:3,k=3")
    with pytest.raises(KdflError, match="codec spec 'topk:k='"):
        make_codec("topk:k=")
    with pytest.raises(KdflError, match=r"codec 'topk': fill_gap must be a finite number >= 0.01, got 0"):
        TopK(2, fill_gap=0)  # built directly: the same check and message


# ----------------------------------------------------------------------------- SVD
def test_svd_rank_rule():
    s = torch.tensor([3.0, 2.0, 1.0])  # energies 9, 4, 1 of 14: cumulative 0.643, 0.929, 1
    assert [svd_rank(s, t) for t in (0.5, 0.643, 0.9, 0.93, 1.0)] == [1, 2, 2, 3, 3]
    assert svd_rank(torch.zeros(3), 0.9) == 1  # never rank 0 (the reference's bug)
    assert svd_rank(torch.tensor([1.0]), 1e-9) == 1


def test_svd_round_trip_within_error_bound_and_bytes():
    g = torch.Generator().manual_seed(0)
    low = torch.randn(64, 3, generator=g) @ torch.randn(3, 100, generator=g)  # rank 3
    noisy = low + 0.05 * torch.randn(64, 100, generator=g)
    for energy in (0.5, 0.9, 0.99, 1.0):
        codec = SVD(energy)
        for x in (low, noisy, *_inputs()):
            p = codec.encode(x)
            y = codec.decode(p, shape=tuple(x.shape))
            assert y.dtype == torch.float32 and y.shape == x.shape
            assert bool(((y - x).abs() <= codec.error_bound(x)).all()), (energy, x.shape)
    p = SVD(0.999).encode(low)  # rank 3 holds all the energy
    assert {k: tuple(v.shape) for k, v in p.items()} == {"u": (64, 3), "s": (3,), "vt": (3, 100)}
    # magic + count, then per entry: name length, name, dtype, ndim, dims, data (as above)
    framing = 9 + (2 + 1 + 2 + 8) + (2 + 1 + 2 + 4) + (2 + 2 + 2 + 8)
    assert wire.nbytes(p) == framing + 4 * 3 * (64 + 100 + 1) == 2025  # vs 25,627 B dense
    # dense when the factors would not be smaller: one row, a full-rank square, zeros
    for x in (torch.randn(1, 50, generator=g), torch.randn(4, 4, generator=g), torch.zeros(5, 6)):
        p = SVD(0.95).encode(x)
        assert set(p) == {"values"} and torch.equal(SVD().decode(p), x)


def test_svd_rejects_malformed_payloads():
    codec = SVD(0.9)
    good = codec.encode(torch.randn(20, 2) @ torch.randn(2, 30))
    k = good["s"].shape[0]
    cases = {
        "inconsistent rank": {**good, "s": torch.ones(k + 1)},
        "missing key 'vt'": {"u": good["u"], "s": good["s"]},
        "non-finite": {**good, "u": good["u"].clone().fill_(float("nan"))},
        "dtype": {**good, "s": good["s"].double()},
        "only 'values'": {"values": torch.zeros(2, 2), "u": good["u"]},
    }
    for reason, payload in cases.items():
        with pytest.raises(PayloadError, match=reason):
            codec.decode(payload)
    with pytest.raises(PayloadError, match="expected"):
        codec.decode(good, shape=(21, 30))
    with pytest.raises(KdflError, match=r"energy must be a number in \(0, 1\]"):
        SVD(0.0)
