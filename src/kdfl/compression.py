"""Codecs for (rows, cols) tensors such as (N, C) proxy-set logits.

A codec turns a float tensor into a payload (named tensors: everything that crosses the
wire, scales and indices included) and back. Bytes are measured on the payload with
:func:`kdfl.wire.nbytes`, never estimated. ``decode`` validates what it receives and
raises :class:`~kdfl.types.PayloadError` naming the problem; ``encode`` raises
:class:`~kdfl.types.KdflError` on input it cannot represent.

Inputs are converted to float32 first; every error bound is with respect to that
float32 tensor. Byte arithmetic per value (research dossier, section 2.6): fp32 4 B,
fp16 2 B, int8 1 B + 4 B per row (scale), top-k ``k * (2 + index bytes)`` per row.

Specs for :func:`make_codec`: ``"fp32"``, ``"fp16"``, ``"int8"``, ``"topk:3"`` (also
``"topk:k=3,fill_gap=20"``), ``"svd:0.95"`` (truncated SVD keeping 95 % of the energy:
for weight deltas, FedKD's compression; any weight-sharing algorithm can use it through
``[compression] uplink``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from kdfl.registry import Check, Option, Registry, is_int, is_real, signature_options
from kdfl.types import KdflError, Payload, PayloadError


@runtime_checkable
class Codec(Protocol):
    """Encode (rows, cols) float tensors to payloads and back."""

    @property
    def name(self) -> str:
        """The spec that rebuilds this codec with :func:`make_codec`."""
        ...

    def encode(self, x: Tensor) -> Payload:
        """``x``: (rows, cols) finite float -> named tensors (what crosses the wire)."""
        ...

    def decode(self, payload: Payload, shape: tuple[int, int] | None = None) -> Tensor:
        """Payload -> float32 (rows, cols); checks it (and ``shape`` when given)."""
        ...

    def error_bound(self, x: Tensor) -> Tensor:
        """(rows, cols): the max abs reconstruction error guaranteed per entry of ``x``."""
        ...


# ---------------------------------------------------------------------------------------
# input checks (encode) and payload checks (decode)
# ---------------------------------------------------------------------------------------


def _check_input(x: Tensor, codec: str) -> Tensor:
    """``x`` as float32 (rows, cols), or KdflError."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise KdflError(f"{codec}: expected a float tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() != 2:
        raise KdflError(f"{codec}: expected a (rows, cols) tensor, got shape {tuple(x.shape)}")
    if x.shape[1] == 0:
        raise KdflError(f"{codec}: x has no columns (shape {tuple(x.shape)})")
    x = x.detach().float()
    if not bool(torch.isfinite(x).all()):
        raise KdflError(f"{codec}: input has {int((~torch.isfinite(x)).sum())} non-finite values (NaN/inf)")
    return x


def _get(payload: Payload, key: str, codec: str, dtypes: tuple[torch.dtype, ...], ndim: int) -> Tensor:
    """``payload[key]`` after checking presence, type, dtype and ndim (PayloadError otherwise)."""
    if not isinstance(payload, Mapping):
        raise PayloadError(f"{codec}: payload must be a dict of tensors, got {type(payload).__name__}")
    if key not in payload:
        raise PayloadError(f"{codec}: payload is missing key {key!r} (has {sorted(payload)})")
    t = payload[key]
    if not isinstance(t, Tensor):
        raise PayloadError(f"{codec}: payload {key!r} is {type(t).__name__}, expected a tensor")
    if t.dtype not in dtypes:
        want = " or ".join(str(d) for d in dtypes)
        raise PayloadError(f"{codec}: payload {key!r} has dtype {t.dtype}, expected {want}")
    if t.dim() != ndim:
        raise PayloadError(f"{codec}: payload {key!r} has shape {tuple(t.shape)}, expected {ndim} dimensions")
    return t


def _check_shape(codec: str, got: tuple[int, ...], expected: tuple[int, int] | None) -> None:
    if expected is not None and tuple(got) != tuple(expected):
        raise PayloadError(f"{codec}: payload decodes to shape {tuple(got)}, expected {tuple(expected)}")


# the most values one decoded tensor (and one unpacked payload, :func:`kdfl.transport.unpack`)
# may hold: 2^26 float32 = 256 MiB, the default upload limit (:data:`kdfl.wire.DEFAULT_MAX_BYTES`).
# Top-k and SVD payloads expand on decoding (a few bytes can claim billions of columns); this
# bounds what a corrupt or hostile payload makes the receiver allocate.
MAX_DECODED_VALUES = 2**26


def _check_size(codec: str, rows: int, cols: int) -> None:
    if rows * cols > MAX_DECODED_VALUES:
        raise PayloadError(f"{codec}: payload decodes to {rows} x {cols} = {rows * cols} values, more than the "
                           f"limit of {MAX_DECODED_VALUES}; a corrupt or hostile payload")


def _check_finite(codec: str, what: str, t: Tensor) -> None:
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        raise PayloadError(f"{codec}: {what} has {int(bad.sum())} non-finite values (NaN/inf)")


def _to_fp16(x: Tensor, codec: str) -> Tensor:
    """``x`` (float32) as float16, or KdflError when it overflows the fp16 range."""
    h = x.half()
    if not bool(torch.isfinite(h).all()):
        big = float(x.abs().max())
        raise KdflError(f"{codec}: |x| up to {big:.3g} overflows float16 (max 65504); use fp32 or int8")
    return h


def fp16_bound(x: Tensor) -> Tensor:
    """Half an fp16 ulp at each entry of ``x``: the round-to-nearest error bound.

    For |x| in [2^(e-1), 2^e) the fp16 spacing is 2^(e-11), so the bound is 2^(e-12);
    below the smallest normal (2^-14) the spacing is 2^-24 and the bound 2^-25.
    """
    ax = x.detach().abs().double()
    _, e = torch.frexp(ax)  # ax = m * 2^e, m in [0.5, 1)
    b = torch.ldexp(torch.ones_like(ax), (e - 12).double())
    return torch.where(ax < 2.0**-14, torch.full_like(ax, 2.0**-25), b).float()


# ---------------------------------------------------------------------------------------
# codecs
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FP32:
    """Raw float32 (4 B per value): the reference, exact. Payload ``{"values"}``."""

    @property
    def name(self) -> str:
        return "fp32"

    def encode(self, x: Tensor) -> Payload:
        return {"values": _check_input(x, self.name).clone()}

    def decode(self, payload: Payload, shape: tuple[int, int] | None = None) -> Tensor:
        v = _get(payload, "values", self.name, (torch.float32,), 2)
        _check_shape(self.name, tuple(v.shape), shape)
        _check_finite(self.name, "values", v)
        return v.clone()

    def error_bound(self, x: Tensor) -> Tensor:
        return torch.zeros_like(_check_input(x, self.name))


@dataclass(frozen=True)
class FP16:
    """IEEE half precision (2 B per value); |x| must stay below 65504. Payload ``{"values"}``.

    Error bound: half an fp16 ulp per entry (relative ~2^-11), see :func:`fp16_bound`.
    """

    @property
    def name(self) -> str:
        return "fp16"

    def encode(self, x: Tensor) -> Payload:
        return {"values": _to_fp16(_check_input(x, self.name), self.name)}

    def decode(self, payload: Payload, shape: tuple[int, int] | None = None) -> Tensor:
        v = _get(payload, "values", self.name, (torch.float16,), 2)
        _check_shape(self.name, tuple(v.shape), shape)
        _check_finite(self.name, "values", v)
        return v.float()

    def error_bound(self, x: Tensor) -> Tensor:
        return fp16_bound(_check_input(x, self.name))


# |x/s - round(x/s)| <= 1/2 plus float32 rounding of the division and of q*s
# (each <= 127 * 2^-24 in units of s): 2^-15 covers both with margin.
_INT8_SLACK = 2.0**-15


@dataclass(frozen=True)
class Int8:
    """Per-row symmetric int8 (1 B per value + a 4 B float32 scale per row).

    ``scale_r = max_c |x_rc| / 127`` (rows of zeros get scale 1), ``q = round(x / scale)``
    as int8 in [-127, 127]; decoding is ``q * scale_r``. Payload ``{"q": (rows, cols)
    int8, "scale": (rows,) float32}``. Error bound: ``scale_r / 2`` per entry (plus
    ``2^-15 scale_r`` for float32 rounding).
    """

    @property
    def name(self) -> str:
        return "int8"

    @staticmethod
    def _scale(x: Tensor) -> Tensor:
        scale = x.abs().amax(dim=1) / 127  # (rows,)
        return torch.where(scale > 0, scale, torch.ones_like(scale))

    def encode(self, x: Tensor) -> Payload:
        x = _check_input(x, self.name)
        scale = self._scale(x)  # (rows,)
        q = (x / scale[:, None]).round().clamp(-127, 127).to(torch.int8)  # (rows, cols)
        return {"q": q, "scale": scale}

    def decode(self, payload: Payload, shape: tuple[int, int] | None = None) -> Tensor:
        q = _get(payload, "q", self.name, (torch.int8,), 2)
        scale = _get(payload, "scale", self.name, (torch.float32,), 1)
        if scale.shape[0] != q.shape[0]:
            raise PayloadError(f"{self.name}: {scale.shape[0]} scales for {q.shape[0]} rows of q")
        _check_shape(self.name, tuple(q.shape), shape)
        bad = ~torch.isfinite(scale) | (scale <= 0)
        if bool(bad.any()):
            r = int(bad.nonzero()[0, 0])
            raise PayloadError(f"{self.name}: scales must be finite and > 0; row {r} has {float(scale[r])}")
        if q.numel() and int(q.min()) < -127:
            raise PayloadError(f"{self.name}: q holds -128; the symmetric code uses [-127, 127]")
        out = q.float() * scale[:, None]  # (rows, cols)
        _check_finite(self.name, "decoded result", out)
        return out

    def error_bound(self, x: Tensor) -> Tensor:
        x = _check_input(x, self.name)
        return (self._scale(x) * (0.5 + _INT8_SLACK))[:, None].expand_as(x).clone()


def _index_dtype(cols: int) -> torch.dtype:
    """Smallest signed/unsigned int dtype that holds column indices 0..cols-1."""
    if cols <= 256:
        return torch.uint8
    if cols <= 2**15:
        return torch.int16
    return torch.int32


@dataclass(frozen=True)
class TopK:
    """Per row, the ``k`` largest values (fp16) and their column indices.

    Payload ``{"values": (rows, k) float16 (descending), "indices": (rows, k) uint8 when
    cols <= 256, int16 when cols <= 32768, else int32, "cols": (1,) int32}``, so
    ``k * (2 + index bytes)`` per row plus a few bytes.

    Decoding fills every dropped entry of row r with ``min(kept values of r) - fill_gap``,
    so a softmax stays well defined and the kept entries dominate.

    What is guaranteed (and what :meth:`error_bound` reports): kept entries are within
    the fp16 rounding bound of the input; dropped entries have *no* error bound (inf),
    but each is strictly below every kept entry of its row; the row's argmax column is
    kept, so its decoded value equals the decoded row maximum (argmax preserved, up to
    ties created by fp16 rounding).

    Args:
        k: entries kept per row, 1 <= k <= cols (checked at encode time).
        fill_gap: how far below the smallest kept value the dropped entries are put
            (>= 0.01, so the gap survives float32 rounding of fp16-range values).
    """

    k: int
    fill_gap: float = 10.0

    def __post_init__(self) -> None:
        CODECS.check("topk", k=self.k, fill_gap=self.fill_gap)

    @property
    def name(self) -> str:
        return f"topk:{self.k}" if self.fill_gap == 10.0 else f"topk:k={self.k},fill_gap={self.fill_gap}"

    def _select(self, x: Tensor) -> tuple[Tensor, Tensor]:
        cols = x.shape[1]
        if self.k > cols:
            raise KdflError(f"topk: k={self.k} exceeds the {cols} columns of x; use k in 1..{cols}")
        vals, idx = x.topk(self.k, dim=1)  # (rows, k) each, descending
        return vals, idx

    def encode(self, x: Tensor) -> Payload:
        x = _check_input(x, self.name)
        vals, idx = self._select(x)
        cols = x.shape[1]
        return {
            "values": _to_fp16(vals, self.name),
            "indices": idx.to(_index_dtype(cols)),
            "cols": torch.tensor([cols], dtype=torch.int32),
        }

    def decode(self, payload: Payload, shape: tuple[int, int] | None = None) -> Tensor:
        vals = _get(payload, "values", self.name, (torch.float16,), 2)
        idx = _get(payload, "indices", self.name, (torch.uint8, torch.int16, torch.int32), 2)
        cols_t = _get(payload, "cols", self.name, (torch.int32,), 1)
        if cols_t.shape != (1,):
            raise PayloadError(f"{self.name}: payload 'cols' must hold one value, has shape {tuple(cols_t.shape)}")
        cols = int(cols_t[0])
        if idx.shape != vals.shape:
            raise PayloadError(f"{self.name}: indices {tuple(idx.shape)} and values {tuple(vals.shape)} differ in shape")
        rows, k = vals.shape
        if not 1 <= k <= cols:
            raise PayloadError(f"{self.name}: {k} kept values per row for {cols} columns; need 1 <= k <= cols")
        _check_shape(self.name, (rows, cols), shape)
        _check_size(self.name, rows, cols)
        _check_finite(self.name, "values", vals)
        idx = idx.long()  # (rows, k)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= cols):
            raise PayloadError(
                f"{self.name}: column indices must lie in [0, {cols}), got [{int(idx.min())}, {int(idx.max())}]"
            )
        s = idx.sort(dim=1).values
        dup = (s[:, 1:] == s[:, :-1]).any(dim=1)  # (rows,)
        if bool(dup.any()):
            raise PayloadError(f"{self.name}: duplicate column indices in row {int(dup.nonzero()[0, 0])}")
        v = vals.float()  # (rows, k)
        fill = v.min(dim=1).values - self.fill_gap  # (rows,)
        out = fill[:, None].expand(rows, cols).clone()  # (rows, cols)
        out.scatter_(1, idx, v)
        _check_finite(self.name, "decoded result", out)
        return out

    def error_bound(self, x: Tensor) -> Tensor:
        """fp16 rounding bound on the kept entries; inf on the dropped ones."""
        x = _check_input(x, self.name)
        vals, idx = self._select(x)
        out = torch.full_like(x, float("inf"))
        return out.scatter_(1, idx, fp16_bound(vals))


def svd_rank(s: Tensor, energy: float) -> int:
    """The smallest k whose first k singular values hold at least ``energy`` of the total
    energy ``sum(s**2)``, clamped to [1, len(s)] (FedKD's rule; its reference code can
    return rank 0 and drop a whole update: not here). ``s`` descending, float64 advised."""
    e = s.double() ** 2
    total = float(e.sum())
    if total <= 0:
        return 1
    cum = torch.cumsum(e, 0) / total
    k = int((cum < energy).sum()) + 1  # first index with cum >= energy, 1-based
    return max(1, min(k, int(s.numel())))


# relative float32 slack of a reconstruction from float32 factors: each term u*s*v carries
# a few ulps of rounding and there are k of them (k * sigma_1 * 2^-20 covers it with margin)
_SVD_SLACK = 2.0**-20
# wire framing of "u", "s", "vt" (13 + 9 + 14 B) minus that of "values" (18 B)
_SVD_FRAMING = 18


@dataclass(frozen=True)
class SVD:
    """Truncated SVD of a (rows, cols) matrix: ``x ≈ U diag(s) Vt`` with the smallest rank k
    whose singular values keep ``energy`` of ``sum(s**2)`` (:func:`svd_rank`).

    Payload ``{"u": (rows, k) float32, "s": (k,) float32, "vt": (k, cols) float32}``, so
    ``4 k (rows + cols + 1)`` bytes of data; when that (plus 18 B of framing) is not smaller than the dense matrix (a
    single row, a tiny matrix, or a rank close to full) or ``x`` is all zeros, the dense
    values ``{"values": (rows, cols) float32}`` are sent instead (exact). The SVD runs in
    float64 and the factors are rounded to float32. Decoding is ``(u * s) @ vt``.

    Error bound: every entry of ``x - decode(encode(x))`` is at most the first dropped
    singular value (the spectral norm of the residual bounds every entry), plus float32
    rounding of the factors (``k * s_1 * 2^-20``).

    Args:
        energy: the fraction of the energy kept, in (0, 1]; 1 keeps every nonzero singular value.
    """

    energy: float = 0.95

    def __post_init__(self) -> None:
        CODECS.check("svd", energy=self.energy)

    @property
    def name(self) -> str:
        return f"svd:{self.energy}"

    @staticmethod
    def _factored(rows: int, cols: int, k: int) -> bool:
        """Whether rank-k factors are smaller on the wire than the dense matrix: their
        data plus the framing of two more entries (:mod:`kdfl.wire`: 18 B with these
        part names) against the dense data."""
        return 4 * k * (rows + cols + 1) + _SVD_FRAMING < 4 * rows * cols

    def _factors(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, int]:
        u, s, vt = torch.linalg.svd(x.double(), full_matrices=False)
        return u, s, vt, svd_rank(s, self.energy)

    def encode(self, x: Tensor) -> Payload:
        x = _check_input(x, self.name)
        rows, cols = x.shape
        if not bool(x.any()):
            return {"values": x.clone()}
        u, s, vt, k = self._factors(x)
        if not self._factored(rows, cols, k):
            return {"values": x.clone()}
        return {"u": u[:, :k].float().contiguous(), "s": s[:k].float().contiguous(),
                "vt": vt[:k].float().contiguous()}

    def decode(self, payload: Payload, shape: tuple[int, int] | None = None) -> Tensor:
        if isinstance(payload, Mapping) and "values" in payload:
            extra = sorted(set(payload) - {"values"})
            if extra:
                raise PayloadError(f"{self.name}: a dense payload holds only 'values', got also {extra}")
            v = _get(payload, "values", self.name, (torch.float32,), 2)
            _check_shape(self.name, tuple(v.shape), shape)
            _check_finite(self.name, "values", v)
            return v.clone()
        u = _get(payload, "u", self.name, (torch.float32,), 2)
        s = _get(payload, "s", self.name, (torch.float32,), 1)
        vt = _get(payload, "vt", self.name, (torch.float32,), 2)
        k = s.shape[0]
        if k < 1 or u.shape[1] != k or vt.shape[0] != k:
            raise PayloadError(f"{self.name}: factors of inconsistent rank: u {tuple(u.shape)}, s {tuple(s.shape)}, "
                               f"vt {tuple(vt.shape)} (need u (rows, k), s (k,), vt (k, cols), k >= 1)")
        _check_shape(self.name, (u.shape[0], vt.shape[1]), shape)
        _check_size(self.name, u.shape[0], vt.shape[1])
        for what, t in (("u", u), ("s", s), ("vt", vt)):
            _check_finite(self.name, what, t)
        out = (u * s) @ vt  # (rows, cols)
        _check_finite(self.name, "decoded result", out)
        return out

    def error_bound(self, x: Tensor) -> Tensor:
        x = _check_input(x, self.name)
        rows, cols = x.shape
        if not bool(x.any()):
            return torch.zeros_like(x)
        _, s, _, k = self._factors(x)
        if not self._factored(rows, cols, k):
            return torch.zeros_like(x)
        dropped = float(s[k]) if k < s.numel() else 0.0
        return torch.full_like(x, dropped + (k + 1) * float(s[0]) * _SVD_SLACK)


FACTOR_SEP = "#"  # payload entries "<name>#u", "#s", "#vt" (or "#values"): one SVD-encoded matrix


def split_parts(payload: Payload, sep: str) -> tuple[Payload, dict[str, Payload]]:
    """Entries ``<name><sep><part>`` grouped by name (``{name: {part: tensor}}``), and the
    entries without ``sep`` as they are."""
    plain: Payload = {}
    groups: dict[str, Payload] = {}
    for key, t in payload.items():
        name, found, part = key.partition(sep)
        if found:
            groups.setdefault(name, {})[part] = t
        else:
            plain[key] = t
    return plain, groups


def unfactor(payload: Payload) -> tuple[Payload, dict[str, int]]:
    """The payload with every SVD-encoded matrix (``<name>#u/#s/#vt`` or ``<name>#values``,
    :class:`SVD`'s parts under :data:`FACTOR_SEP`) rebuilt as one entry ``<name>``, and the
    rank each was sent at (0 = dense). Used where uploads are compared or manipulated
    entry by entry (Byzantine attacks): factors of different ranks do not stack."""
    out, groups = split_parts(payload, FACTOR_SEP)
    ranks = {}
    for name, parts in groups.items():
        out[name] = SVD().decode(parts)
        ranks[name] = 0 if "values" in parts else int(parts["s"].shape[0])
    return out, ranks


def refactor(payload: Payload, ranks: Mapping[str, int]) -> Payload:
    """Inverse of :func:`unfactor`: the entries named in ``ranks`` as SVD parts of that
    rank (the best rank-k approximation; 0 = dense values), the rest unchanged."""
    out: Payload = {}
    for k, v in payload.items():
        if k not in ranks:
            out[k] = v
        elif ranks[k] == 0:
            out[k + FACTOR_SEP + "values"] = v.float()
        else:
            u, s, vt = torch.linalg.svd(v.double(), full_matrices=False)
            r = ranks[k]
            parts = {"u": u[:, :r], "s": s[:r], "vt": vt[:r]}
            out.update({k + FACTOR_SEP + p: t.float().contiguous() for p, t in parts.items()})
    return out


# parameter -> what it accepts (TopK checks the same when built directly)
_CHECKS: dict[str, Check] = {
    "k": Check(lambda v: is_int(v) and v >= 1, "an integer >= 1 (and <= cols)"),
    "fill_gap": Check(lambda v: is_real(v) and v >= 0.01, "a finite number >= 0.01"),
    "energy": Check(lambda v: is_real(v) and 0 < v <= 1, "a number in (0, 1]"),
}


def _parameters(cls: type) -> dict[str, Option]:
    return signature_options(cls, checks=_CHECKS)


CODECS: Registry[type] = Registry(
    "codec",
    {"fp32": FP32, "fp16": FP16, "int8": Int8, "topk": TopK, "svd": SVD},
    word="parameter",
    positional=True,  # "topk:3" means k=3, "svd:0.9" energy=0.9
    options_of=_parameters,
)


def make_codec(spec: str) -> Codec:
    """Build a codec from a spec string: ``"fp32"``, ``"fp16"``, ``"int8"``, ``"topk:3"``.

    Parameters follow ``name:``, either bare (the first field, ``k`` for top-k) or as
    ``key=value`` (``"topk:k=3,fill_gap=20"``).

    Raises:
        KdflError: a malformed spec, unknown codec (with close matches), unknown or
            missing parameter, or a value out of range.
    """
    cls, params = CODECS.resolve(spec)
    codec: Codec = cls(**params)
    return codec
