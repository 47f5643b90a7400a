"""Byzantine attacks: only malicious rows change, exact values, constraints, registry."""

from __future__ import annotations

import pytest
import torch

from kdfl.attacks import (
    ATTACKS,
    alie,
    alie_z,
    choose_malicious,
    flip_labels,
    gaussian,
    ipm,
    make_attack,
    min_max,
    min_sum,
    scaled,
    sign_flip,
)
from kdfl.types import KdflError

MASK = torch.tensor([False, True, False, False, True, False])


def _x(seed: int = 0, n: int = 6, d: int = 4) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("name", [n for n, s in ATTACKS.items() if s.space == "upload"])
def test_only_malicious_rows_change(name: str):
    x = _x()
    before = x.clone()
    out = make_attack(name)(x, MASK, _gen())
    assert torch.equal(x, before)  # input untouched
    assert torch.equal(out[~MASK], x[~MASK])
    assert not torch.equal(out[MASK], x[MASK])
    if ATTACKS[name].omniscient:  # colluding: one tensor for every malicious client
        assert torch.equal(out[1], out[4])


def test_no_malicious_clients_is_identity():
    x = _x()
    none = torch.zeros(6, dtype=torch.bool)
    for name, spec in ATTACKS.items():
        if spec.space == "upload":
            assert torch.equal(make_attack(name)(x, none, _gen()), x), name


def test_exact_values():
    x = _x()
    assert torch.equal(sign_flip(x, MASK, None, scale=2.0)[MASK], -2.0 * x[MASK])
    assert torch.equal(scaled(x, MASK, None)[MASK], 10.0 * x[MASK])
    hmean = x[~MASK].mean(0)
    out = ipm(x, MASK, None, eps=0.5)
    assert torch.allclose(out[1], -0.5 * hmean) and torch.allclose(out[4], -0.5 * hmean)
    # alie with fixed z: mu - z sigma over the four honest rows
    h = x[~MASK]
    assert torch.allclose(alie(x, MASK, None, z=1.5)[1], h.mean(0) - 1.5 * h.std(0))


def test_alie_z_matches_the_epfml_table():
    # algorithms.md section 13: (n, m) -> z with p = (n - m - s) / (n - m)
    table = {(20, 4): 0.157, (10, 2): 0.0, (50, 10): 0.253, (50, 24): 1.426, (100, 20): 0.286}
    for (n, f), z in table.items():
        assert abs(alie_z(n, f) - z) < 0.01, (n, f)
    # computed automatically from the mask: n = 20, f = 4
    x = _x(1, n=20, d=8)
    mask = torch.zeros(20, dtype=torch.bool)
    mask[[0, 5, 11, 17]] = True
    h = x[~mask]
    out = alie(x, mask, None)
    z = (h.mean(0) - out[0]) / h.std(0)
    assert torch.allclose(z, torch.full_like(z, 0.157), atol=0.01)
    # attackers in the majority: z stays finite
    assert abs(alie_z(10, 8)) < 5


@pytest.mark.parametrize("dev", ["unit_vec", "std", "sign"])
def test_min_max_and_min_sum_constraints(dev: str):
    x = _x(2, n=10, d=6) + 3.0
    mask = torch.zeros(10, dtype=torch.bool)
    mask[:3] = True
    h = x[~mask]
    pair = torch.cdist(h, h)
    mm = min_max(x, mask, None, dev=dev)[0]
    assert float((h - mm).norm(dim=1).max()) <= float(pair.max()) + 1e-9
    ms = min_sum(x, mask, None, dev=dev)[0]
    assert float(((h - ms) ** 2).sum()) <= float((pair**2).sum(1).max()) + 1e-9
    # the search found a real perturbation, not the honest mean itself
    mu = h.mean(0)
    assert float((mm - mu).norm()) > 0.1 and float((ms - mu).norm()) > 0.1
    # min-max tolerates more deviation than min-sum
    assert float((mm - mu).norm()) >= float((ms - mu).norm()) - 1e-9


def test_gaussian_reproducible_and_modes():
    x = _x()
    a = gaussian(x, MASK, _gen(7), sigma=2.0)
    b = gaussian(x, MASK, _gen(7), sigma=2.0)
    c = gaussian(x, MASK, _gen(8), sigma=2.0)
    assert torch.equal(a, b) and not torch.equal(a, c)
    add = gaussian(x, MASK, _gen(7), sigma=2.0, mode="add")
    assert torch.allclose(add[MASK] - x[MASK], a[MASK])
    with pytest.raises(KdflError, match="Generator"):
        gaussian(x, MASK, None)


def test_flip_labels():
    y = torch.tensor([0, 1, 9, 4])
    assert torch.equal(flip_labels(y, 10), torch.tensor([9, 8, 0, 5]))
    assert torch.equal(flip_labels(y, 10, mode="shift"), torch.tensor([1, 2, 0, 5]))
    assert flip_labels(y, 10).dtype == y.dtype
    with pytest.raises(KdflError, match=r"\[0, 5\)"):
        flip_labels(y, 5)
    with pytest.raises(KdflError, match=r"reverse \| shift"):
        flip_labels(y, 10, mode="random")
    fn = make_attack("label_flip", mode="shift")
    assert torch.equal(fn(y, 10), torch.tensor([1, 2, 0, 5]))


def test_choose_malicious():
    a = choose_malicious(10, 0.3, seed=5)
    assert a == choose_malicious(10, 0.3, seed=5)
    assert len(a) == 3 and all(0 <= i < 10 for i in a)
    assert any(choose_malicious(10, 0.3, seed=s) != a for s in range(6, 12))
    assert choose_malicious(7, 0.0, seed=0) == frozenset()
    assert len(choose_malicious(100, 0.25, seed=1)) == 25
    with pytest.raises(KdflError, match=r"\[0, 1\)"):
        choose_malicious(10, 1.0, seed=0)


def test_registry_and_validation():
    assert ATTACKS["label_flip"].space == "data" and ATTACKS["label_flip"].fn is flip_labels
    assert ATTACKS["alie"].omniscient and not ATTACKS["sign_flip"].omniscient
    with pytest.raises(KdflError, match="'alie'"):
        make_attack("alei")
    with pytest.raises(KdflError, match=r"no hyperparameter 'lam'; allowed: scale"):
        make_attack("sign_flip", lam=3.0)
    with pytest.raises(KdflError, match=r"unit_vec \| std \| sign"):
        make_attack("min_max", dev="l2")
    with pytest.raises(KdflError, match=r"replace \| add"):
        make_attack("gaussian", mode="swap")
    with pytest.raises(KdflError, match="> 0"):
        make_attack("min_sum", gamma_init=0.0)
    with pytest.raises(KdflError, match="all 6 are malicious"):
        ipm(_x(), torch.ones(6, dtype=torch.bool), None)
    with pytest.raises(KdflError, match="bool mask"):
        sign_flip(_x(), torch.tensor([0, 1, 0, 0, 1, 0]), None)


def test_attack_specs_and_direct_calls_share_one_validation():
    x = _x()
    assert torch.equal(make_attack("scaled", _=5.0)(x, MASK, None), scaled(x, MASK, None, lam=5.0))
    with pytest.raises(KdflError, match=r"attack 'gaussian': mode must be replace \| add, got 'swap'"):
        gaussian(x, MASK, _gen(), mode="swap")  # the Literal annotation is the check
    with pytest.raises(KdflError, match=r"attack 'label_flip': mode must be reverse \| shift"):
        flip_labels(torch.tensor([0, 1]), 2, mode="up")  # type: ignore[arg-type]
    with pytest.raises(KdflError, match="attack 'label_flip' has no hyperparameter 'rng'"):
        make_attack("label_flip", rng=None)  # supplied by the engine, not a hyperparameter
