"""Aggregation rules: hand-computed values, breakdown properties, validation."""

from __future__ import annotations

import math

import pytest
import torch

from kdfl.aggregation import (
    AGGREGATORS,
    aggregate_tensors,
    bulyan,
    centered_clipping,
    geometric_median,
    krum,
    make_aggregator,
    mean,
    median,
    multi_krum,
    trimmed_mean,
)
from kdfl.types import KdflError

# 5 clients x 3 coordinates; the last client is an outlier.
X = torch.tensor(
    [
        [0.0, 0.0, 0.0],
        [1.0, 2.0, 0.0],
        [2.0, 1.0, 1.0],
        [4.0, 0.0, 3.0],
        [10.0, -10.0, 20.0],
    ]
)
ONES = torch.ones(5)


def close(a: torch.Tensor, b: list[float], atol: float = 1e-6) -> bool:
    return torch.allclose(a, torch.tensor(b, dtype=a.dtype), atol=atol, rtol=0)


# --- hand-computed values -------------------------------------------------------------


def test_mean_and_weighted_mean():
    assert close(mean(X, ONES), [17 / 5, -7 / 5, 24 / 5])
    # w = [1, 1, 1, 1, 4]: (0+1+2+4+40)/8, (0+2+1+0-40)/8, (0+0+1+3+80)/8
    assert close(mean(X, torch.tensor([1.0, 1, 1, 1, 4])), [5.875, -4.625, 10.5])


def test_median_odd_and_even():
    assert close(median(X, ONES), [2.0, 0.0, 1.0])
    # even n: average of the two middle values (0,1,2,4 -> 1.5; 0,0,1,2 -> 0.5; 0,0,1,3 -> 0.5)
    assert close(median(X[:4], torch.ones(4)), [1.5, 0.5, 0.5])


def test_trimmed_mean_values_and_beta_zero_is_mean():
    # b = floor(0.2 * 5) = 1: (1,2,4), (0,0,1), (0,1,3)
    assert close(trimmed_mean(X, ONES, beta=0.2), [7 / 3, 1 / 3, 4 / 3])
    w = torch.tensor([1.0, 2, 3, 4, 5])
    assert torch.allclose(trimmed_mean(X, w, beta=0.0), mean(X, w))
    # b = floor(0.1 * 5) = 0 as well
    assert torch.allclose(trimmed_mean(X, w, beta=0.1), mean(X, w))


def test_krum_and_multi_krum_hand_scores():
    # squared distances: d01=5 d02=6 d03=25 d12=3 d13=22 d23=9, row 4 >= 425 from all.
    # f=1 -> 2 nearest: scores 11, 8, 9, 31, 971 -> Krum picks row 1.
    assert close(krum(X, ONES, f=1), [1.0, 2.0, 0.0])
    # m=3 lowest scores: rows 1, 2, 0
    assert close(multi_krum(X, ONES, f=1, m=3), [1.0, 1.0, 1 / 3])
    # default m = n - f = 4: rows 0..3
    assert close(multi_krum(X, ONES, f=1), [1.75, 0.75, 1.0])
    # weighted average of the selected rows 0, 1, 2 with weights 1, 1, 2
    assert close(multi_krum(X, torch.tensor([1.0, 1, 2, 1, 1]), f=1, m=3), [1.25, 1.0, 0.5])
    assert torch.equal(multi_krum(X, ONES, f=1, m=1), krum(X, ONES, f=1))


def test_bulyan_hand_value():
    # column 0: v = -1, 1, 3, 4, 7, 50, 100; column 1 = 2v (same ordering); column 2 constant.
    # Recursive Krum with f=1 picks 3, 4, 1, then -1 (tie with 7, lowest index), then 7
    # (tie with 50). theta = 5, keep theta - 2f = 3 closest to the median 3: {3, 4, 1}.
    v = torch.tensor([-1.0, 1, 3, 4, 7, 50, 100])
    x = torch.stack([v, 2 * v, torch.full_like(v, 5.0)], dim=1)
    assert close(bulyan(x, torch.ones(7), f=1), [8 / 3, 16 / 3, 5.0], atol=1e-5)


def test_geometric_median_fermat_point():
    # right isosceles triangle (0,0), (4,0), (0,4): the Fermat point is (t, t) with
    # t^2 - 4t + 8/3 = 0, t = 2 - 2/sqrt(3) (all angles < 120 degrees).
    x = torch.tensor([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0]], dtype=torch.float64)
    t = 2 - 2 / math.sqrt(3)
    z = geometric_median(x, torch.ones(3), iters=500, eps=0.0)
    assert close(z, [t, t], atol=1e-6)
    # on a line it is the (weighted) median; here the middle point is a fixed point
    line = torch.tensor([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0]])
    assert close(geometric_median(line, torch.ones(3)), [1.0, 0.0])


def test_geometric_median_zero_weight_clients_are_ignored():
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    w = torch.tensor([1.0, 2, 1, 0, 0, 0])
    a = geometric_median(x, w, iters=50, eps=0.0)
    b = geometric_median(x[:3], w[:3], iters=50, eps=0.0)
    # different starts (median of 6 vs of 3 rows), same fixed point
    assert torch.allclose(a, b, atol=1e-4)


def test_centered_clipping_hand_value():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.5], [-6.0, -8.0]])
    # from v = 0 with tau = 1: clip (3,4)->(0.6,0.8), (0,0.5) unchanged, (-6,-8)->(-0.6,-0.8)
    z = centered_clipping(x, torch.ones(3), tau=1.0, init=torch.zeros(2))
    assert close(z, [0.0, 0.5 / 3])


def test_centered_clipping_limits():
    x = torch.randn(7, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    w = torch.ones(7)
    # huge tau: one step from any start is the mean
    assert torch.allclose(centered_clipping(x, w, tau=1e9, init=torch.full((5,), 3.0)), mean(x, w))
    # tiny tau: the default start (coordinate-wise median) barely moves
    assert torch.allclose(centered_clipping(x, w, tau=1e-12), median(x, w), atol=1e-10)


# --- robustness properties ------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("mag", [10.0, 1e3, 1e6])
def test_median_breakdown(seed: int, mag: float):
    g = torch.Generator().manual_seed(seed)
    n, f, d = 9, 4, 6
    honest = torch.randn(n, d, generator=g)
    x = honest.clone()
    bad = torch.randperm(n, generator=g)[:f]
    x[bad] = mag * torch.randn(f, d, generator=g)
    lo, hi = honest.min(0).values, honest.max(0).values
    m = median(x, torch.ones(n))
    assert bool(((m >= lo) & (m <= hi)).all())
    # rows above the median moved further up: the median does not change at all
    m0 = median(honest, torch.ones(n))
    y = honest.clone()
    y[honest > m0] += mag
    assert torch.equal(median(y, torch.ones(n)), m0)


def _planted(seed: int, n_honest: int, f: int, d: int = 5, mag: float = 1e6):
    g = torch.Generator().manual_seed(seed)
    honest = torch.randn(n_honest, d, generator=g, dtype=torch.float64)
    outliers = mag * (1 + torch.rand(f, d, generator=g, dtype=torch.float64)) * torch.sign(
        torch.randn(f, d, generator=g, dtype=torch.float64)
    )
    return honest, torch.cat([honest, outliers])


@pytest.mark.parametrize("seed", range(3))
def test_krum_picks_the_honest_cluster(seed: int):
    honest, x = _planted(seed, 10, 3)
    w = torch.ones(13)
    k = krum(x, w, f=3)
    assert any(torch.equal(k, h) for h in honest)
    assert torch.allclose(multi_krum(x, w, f=3), honest.mean(0))


@pytest.mark.parametrize("seed", range(3))
def test_bulyan_and_geometric_median_stay_in_the_honest_hull(seed: int):
    honest, x = _planted(seed, 12, 3)
    lo, hi = honest.min(0).values, honest.max(0).values
    w = torch.ones(15)
    for z in (bulyan(x, w, f=3), geometric_median(x, w), centered_clipping(x, w, tau=1.0, iters=3)):
        assert bool(((z >= lo) & (z <= hi)).all()), z


def test_trimmed_mean_ignores_trimmed_outliers():
    honest, x = _planted(0, 8, 2)
    tm = trimmed_mean(x, torch.ones(10), beta=0.2)  # b = 2 per side
    lo, hi = honest.min(0).values, honest.max(0).values
    assert bool(((tm >= lo) & (tm <= hi)).all())


# --- shapes, dtypes, n == 1 -----------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_rule_runs_on_any_d_and_dtype(dtype: torch.dtype):
    hyper = {"krum": {"f": 1}, "multi_krum": {"f": 1}, "bulyan": {"f": 1}, "centered_clipping": {"tau": 1.0}}
    x = torch.randn(7, 11, dtype=dtype)
    for name in AGGREGATORS:
        out = make_aggregator(name, **hyper.get(name, {}))(x, torch.ones(7))
        assert out.shape == (11,) and out.dtype == dtype, name


def test_single_client():
    x = torch.tensor([[1.0, -2.0, 3.0]])
    w = torch.tensor([5.0])
    for fn in (mean, median, trimmed_mean, geometric_median):
        assert torch.allclose(fn(x, w), x[0])
    assert torch.allclose(centered_clipping(x, w, tau=0.5), x[0])
    with pytest.raises(KdflError, match="sample at least 3 clients"):
        krum(x, w, f=0)


def test_aggregate_tensors_reshapes():
    logits = [torch.full((4, 3), float(i)) for i in range(5)]
    out = aggregate_tensors(make_aggregator("median"), logits, torch.ones(5))
    assert out.shape == (4, 3) and torch.equal(out, torch.full((4, 3), 2.0))
    with pytest.raises(KdflError, match="shape"):
        aggregate_tensors(mean, [torch.zeros(2, 2), torch.zeros(3)], torch.ones(2))


# --- errors ---------------------------------------------------------------------------


def test_byzantine_preconditions():
    x, w = torch.randn(5, 3), torch.ones(5)
    with pytest.raises(KdflError) as e:
        krum(x, w, f=2)
    assert str(e.value) == (
        "krum needs n >= 2f+3 clients (got n=5, f=2): lower f to 1 or sample at least 7 clients per round"
    )
    with pytest.raises(KdflError, match=r"bulyan needs n >= 4f\+3 clients \(got n=5, f=1\)"):
        bulyan(x, w, f=1)
    with pytest.raises(KdflError, match="m=9 exceeds"):
        multi_krum(x, w, f=1, m=9)


def test_bad_inputs():
    with pytest.raises(KdflError, match=r"w must have shape \(5,\)"):
        mean(X, torch.ones(4))
    with pytest.raises(KdflError, match=">= 0"):
        mean(X, torch.tensor([1.0, -1, 1, 1, 1]))
    with pytest.raises(KdflError, match="sum to 0"):
        mean(X, torch.zeros(5))
    with pytest.raises(KdflError, match=r"\(clients, d\)"):
        median(torch.zeros(3), torch.ones(3))


def test_make_aggregator_validation():
    with pytest.raises(KdflError, match="'median'"):
        make_aggregator("medain")
    with pytest.raises(KdflError, match=r"no hyperparameter 'gamma'; allowed: beta"):
        make_aggregator("trimmed_mean", gamma=0.1)
    with pytest.raises(KdflError, match=r"\[0, 0.5\)"):
        make_aggregator("trimmed_mean", beta=0.5)
    with pytest.raises(KdflError, match=">= 0"):
        make_aggregator("krum", f=-1)
    with pytest.raises(KdflError, match="> 0"):
        make_aggregator("centered_clipping", tau=0.0)
    with pytest.raises(KdflError, match="needs hyperparameter"):
        make_aggregator("krum")
    with pytest.raises(KdflError, match="allowed: none"):
        make_aggregator("mean", beta=0.1)
    with pytest.raises(KdflError, match="takes no hyperparameters"):
        make_aggregator("median", _=3)
    # a bare spec value ("krum:1" -> _=1) binds the first hyperparameter
    assert torch.equal(make_aggregator("krum", _=1)(X, ONES), krum(X, ONES, f=1))
    fn = make_aggregator("trimmed_mean", beta=0.2)
    assert torch.allclose(fn(X, ONES), trimmed_mean(X, ONES, beta=0.2))


def test_aggregator_specs_and_direct_calls_share_one_validation():
    from kdfl.spec import parse_spec

    name, hyper = parse_spec("krum:1")
    assert torch.equal(make_aggregator(name, **hyper)(X, ONES), krum(X, ONES, f=1))
    name, hyper = parse_spec("multi_krum:f=1,m=2")
    assert torch.equal(make_aggregator(name, **hyper)(X, ONES), multi_krum(X, ONES, f=1, m=2))
    with pytest.raises(KdflError, match="aggregator 'krum': f is given twice"):
        make_aggregator("krum", _=1, f=1)
    with pytest.raises(KdflError, match=r"aggregator 'trimmed_mean': beta must be a number in \[0, 0.5\), got 0.7"):
        trimmed_mean(X, ONES, beta=0.7)  # called directly: the same check and message
    assert list(AGGREGATORS.defaults("multi_krum")) == ["f", "m"]
