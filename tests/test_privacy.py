"""Differential privacy (``[privacy]``): clipping, noise, the accountant, the modes and the
combinations they refuse."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kdfl import config, experiment, privacy
from kdfl.privacy import CentralDP, PrivacySettings
from kdfl.types import ClientUpdate, KdflError, ServerState

ROOT = Path(__file__).parents[1]
TINY = ["data.num_clients=5", "model.arch=mlp", "local.batch_size=32", "local.momentum=0.9", "local.epochs=2"]
DELTA = 1e-5


# -- the accountant --------------------------------------------------------------------------
def _phi(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def analytic_gaussian_epsilon(sensitivity_over_std: float, delta: float) -> float:
    """The exact ε of one Gaussian mechanism (Balle & Wang 2018, Theorem 8), by bisection:
    δ(ε) = Φ(Δ/2s − εs/Δ) − e^ε Φ(−Δ/2s − εs/Δ)."""
    r = sensitivity_over_std

    def d(eps: float) -> float:
        return _phi(r / 2 - eps / r) - math.exp(eps) * _phi(-r / 2 - eps / r)

    lo, hi = 0.0, 100.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if d(mid) > delta else (lo, mid)
    return hi


def test_accountant_matches_hand_computed_rdp_for_one_gaussian_round():
    """One round, every client, σ = 2: noise std 2C on a sum whose replace-one sensitivity
    is 2C, i.e. a Gaussian of multiplier 1 with RDP α/2 at order α."""
    sigma = 2.0
    got = privacy.epsilon(sigma, DELTA, rounds=1, num_clients=10, sampled=10)
    orders = [1 + x / 10 for x in range(1, 100)] + list(range(11, 64)) + [128, 256, 512, 1024]
    s_eff = sigma / 2
    # the RDP -> (ε, δ) conversion dp_accounting uses (Balle et al. 2020, Prop. 12), by hand
    improved = min(a / (2 * s_eff**2) + math.log1p(-1 / a) - math.log(DELTA * a) / (a - 1) for a in orders if a > 1.01)
    assert got == pytest.approx(improved, rel=1e-9)
    # the classic bound ε = min_α α/(2σ²) + log(1/δ)/(α−1) (α* = 1 + sqrt(2 log(1/δ)) σ): looser
    a_star = 1 + math.sqrt(2 * math.log(1 / DELTA)) * s_eff
    classic = a_star / (2 * s_eff**2) + math.log(1 / DELTA) / (a_star - 1)
    assert classic == pytest.approx(5.298, abs=1e-3)
    assert got < classic
    # and never below the exact ε of the Gaussian mechanism (Balle & Wang 2018)
    exact = analytic_gaussian_epsilon(1 / s_eff, DELTA)
    assert exact == pytest.approx(4.377, abs=1e-3)  # also what dp_accounting's PLD accountant gives
    assert exact <= got < 1.25 * exact


def test_composition_and_subsampling_lower_epsilon_as_expected():
    e1, e10 = privacy.epsilon(1.0, DELTA, 1), privacy.epsilon(1.0, DELTA, 10)
    assert 0 < e1 < e10 < 10 * e1  # composition: RDP adds, sub-linear in ε
    full = privacy.epsilon(1.0, DELTA, 10, num_clients=100, sampled=100)
    sub = privacy.epsilon(1.0, DELTA, 10, num_clients=100, sampled=10)
    assert full == pytest.approx(e10)
    assert sub < full / 2  # amplification by sampling 10 of 100 without replacement
    assert privacy.epsilon(1.0, DELTA, 0) == 0.0


def test_noise_for_epsilon_inverts_the_accountant():
    for target, sampled in ((1.0, 10), (8.0, 0)):  # subsampled (central) and not (local)
        s = privacy.noise_for_epsilon(target, DELTA, rounds=20, num_clients=20, sampled=sampled)
        assert privacy.epsilon(s, DELTA, 20, 20, sampled) <= target
        assert privacy.epsilon(s * 0.99, DELTA, 20, 20, sampled) > target


def test_missing_dp_accounting_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "dp_accounting", None)  # import raises ImportError
    with pytest.raises(KdflError, match=r'pip install "kdfl\[privacy\]"'):
        privacy.require_accounting()


def test_local_epsilon_counts_each_clients_participations():
    recs = [{"clients": [0, 1], "dropped": []}, {"clients": [0, 2], "dropped": [0]}, {"clients": [1], "dropped": []}]
    assert privacy.participations(recs) == 2  # client 1; client 0 dropped out of round 2
    s = PrivacySettings(mode="local", noise_multiplier=1.0)
    assert privacy.run_epsilon(s, recs, 3, 0) == pytest.approx(privacy.epsilon(1.0, DELTA, 2))


# -- clipping and noise ----------------------------------------------------------------------
payloads = st.dictionaries(
    st.sampled_from(["a", "b", "logits", "delta.w"]),
    st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=1, max_size=20), min_size=1,
)


@settings(max_examples=60, deadline=None)
@given(payloads, st.floats(1e-3, 100.0))
def test_clipping_bounds_the_norm_of_the_whole_upload(values, clip):
    payload = {k: torch.tensor(v, dtype=torch.float32) for k, v in values.items()}
    payload["label_counts"] = torch.tensor([3, 4])
    out, norm = privacy.clip_and_noise(payload, clip, 0.0, None)
    assert norm == pytest.approx(privacy.upload_norm(payload))
    assert privacy.upload_norm(out) <= clip * (1 + 1e-5) + 1e-6
    assert torch.equal(out["label_counts"], payload["label_counts"])  # integers pass untouched
    if norm <= clip:
        for k in payload:
            assert torch.equal(out[k], payload[k])
    else:  # one scale for every entry: the direction is kept
        flat = torch.cat([payload[k].double() for k in values])
        got = torch.cat([out[k].double() for k in values])
        torch.testing.assert_close(got, flat * (clip / norm), atol=1e-3 * clip, rtol=1e-4)


def test_noise_std_is_sigma_times_clip():
    s = PrivacySettings(mode="local", clip=2.0, noise_multiplier=1.5)
    u = ClientUpdate(0, 7, {"a": torch.zeros(150_000), "b": torch.zeros(50_000, 1)})
    (v,), diag = privacy.local_noise([u], s, seed=0, round_num=1)
    x = torch.cat([v.payload["a"], v.payload["b"].flatten()])
    assert float(x.std()) == pytest.approx(3.0, rel=0.01)
    assert abs(float(x.mean())) < 0.02
    assert v.num_examples == 1  # data-dependent weights are not sent
    assert diag == {"dp_clipped_fraction": 0.0, "dp_upload_norm": 0.0}


def test_noise_is_deterministic_per_seed_round_and_client():
    s = PrivacySettings(mode="local", clip=1.0, noise_multiplier=1.0)
    ups = [ClientUpdate(c, 1, {"z": torch.ones(100)}) for c in (0, 1)]

    def noisy(seed: int, round_num: int) -> list[torch.Tensor]:
        return [u.payload["z"] for u in privacy.local_noise(ups, s, seed, round_num)[0]]

    a, b = noisy(0, 1), noisy(0, 1)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], a[1])  # clients differ
    assert not torch.equal(a[0], noisy(0, 2)[0]) and not torch.equal(a[0], noisy(1, 1)[0])


def test_central_noise_on_the_mean_is_sigma_clip_over_n():
    seen = []

    class Mean:
        def server_update(self, task, state, updates):
            seen.append(torch.stack([u.payload["d"] for u in updates]).mean(0))
            assert all(u.num_examples == 1 for u in updates)
            return state, {}

    class T:
        seed = 3

    n, sigma, clip = 4, 2.0, 0.5
    alg = CentralDP(Mean(), PrivacySettings(mode="central", clip=clip, noise_multiplier=sigma))
    ups = [ClientUpdate(c, 10 * c + 1, {"d": torch.zeros(100_000)}) for c in range(n)]
    _, metrics = alg.server_update(T(), ServerState({}), ups)
    assert float(seen[0].std()) == pytest.approx(sigma * clip / n, rel=0.02)
    assert metrics["dp_clipped_fraction"] == 0.0


def test_integer_entries_are_refused_unless_allowed():
    u = ClientUpdate(2, 5, {"logits": torch.ones(3), "label_counts": torch.tensor([1, 2])})
    with pytest.raises(KdflError, match=r"label_counts.*allow_integer_entries = true"):
        privacy.local_noise([u], PrivacySettings(mode="local", noise_multiplier=1.0), 0, 1)
    ok = PrivacySettings(mode="local", noise_multiplier=1.0, allow_integer_entries=True)
    (v,), _ = privacy.local_noise([u], ok, 0, 1)
    assert torch.equal(v.payload["label_counts"], u.payload["label_counts"])
    bn = ClientUpdate(2, 5, {"delta.w": torch.ones(3), "delta.bn.num_batches_tracked": torch.tensor(4)})
    privacy.local_noise([bn], PrivacySettings(mode="local", noise_multiplier=1.0), 0, 1)  # exempt


# -- config: defaults, ranges and refused combinations ---------------------------------------
def test_noise_multiplier_alone_turns_on_local_mode():
    cfg = config.load(None, [*TINY, "privacy.noise_multiplier=1.0"])
    assert cfg["privacy"]["mode"] == "local" and cfg["privacy"]["clip"] == 1.0 and cfg["privacy"]["delta"] == DELTA
    assert config.load(None, TINY)["privacy"]["mode"] == "none"


@pytest.mark.parametrize("overrides,match", [
    (["privacy.sigma=1.0"], r"unknown config key 'privacy.sigma'.*noise_multiplier"),
    (["privacy.mode=gaussian"], r"privacy.mode must be one of none, local, central"),
    (["privacy.noise_multiplier=-1.0"], r"privacy.noise_multiplier must be >= 0"),
    (["privacy.noise_multiplier=1.0", "privacy.clip=0"], r"privacy.clip must be a finite number > 0"),
    (["privacy.noise_multiplier=1.0", "privacy.delta=1.5"], r"privacy.delta must be in \(0, 1\)"),
    (["privacy.mode=local"], r"needs privacy.noise_multiplier > 0"),
    (["privacy.mode=none", "privacy.noise_multiplier=1.0"], r"set privacy.mode = \"local\" or \"central\""),
])
def test_bad_privacy_settings_name_the_key_and_the_fix(overrides, match):
    with pytest.raises(KdflError, match=match):
        config.load(None, [*TINY, *overrides])


CENTRAL = ["privacy.mode=central", "privacy.noise_multiplier=1.0"]
PROXY = ["data.proxy=holdout", "data.proxy_size=200"]


@pytest.mark.parametrize("overrides,match", [
    (["algorithm.aggregator=median", *CENTRAL], r"not accounted for FedAvg: aggregator = 'median'.*mode = \"local\""),
    (["algorithm.name=fedavg", "algorithm.aggregator=krum:f=1", *CENTRAL], r"not accounted for FedAvg"),
    (["algorithm.name=fedema_distill", *PROXY, "algorithm.aggregator=median", "algorithm.class_weighting=true",
      *CENTRAL], r"FedEMADistill: aggregator = 'median'.*class_weighting = true.*space = 'probs'"),
    (["algorithm.name=fedema_distill", *PROXY, *CENTRAL],  # the defaults: trimmed mean of probabilities
     r"FedEMADistill: aggregator = 'trimmed_mean:beta=0.2' needs the individual uploads.*space = 'probs'"),
    (["algorithm.name=feddf", *PROXY, *CENTRAL], r"FedDF: its server does not aggregate the uploads with a plain mean"),
    (["algorithm.name=fd", *CENTRAL], r"not accounted for FD"),
    (["algorithm.name=dsfl", *PROXY, "algorithm.upload=logits", *CENTRAL], r"softmax to each upload"),
    (["algorithm.name=dsfl", *PROXY, "privacy.noise_multiplier=1.0"], r"noisy soft labels.*upload = \"logits\""),
    (["algorithm.name=fedema_distill", *PROXY, "algorithm.class_weighting=true", "privacy.noise_multiplier=1.0"],
     r"class_weighting = true: clients upload label counts.*class_weighting = false"),
])
def test_unaccounted_combinations_are_refused(overrides, match):
    with pytest.raises(KdflError, match=match):
        config.load(None, [*TINY, *overrides])


@pytest.mark.parametrize("overrides", [
    CENTRAL,
    ["algorithm.name=fedavgm", *CENTRAL],
    ["algorithm.name=fedema_distill", *PROXY, "algorithm.aggregator=mean", "algorithm.class_weighting=false",
     "algorithm.space=centered", *CENTRAL],
    ["algorithm.name=dsfl", *PROXY, *CENTRAL],
    ["algorithm.name=fedema_distill", *PROXY, "privacy.noise_multiplier=1.0"],  # defaults: no class weighting
    ["algorithm.name=fedema_distill", *PROXY, "algorithm.class_weighting=true", "privacy.allow_integer_entries=true",
     "privacy.noise_multiplier=1.0"],
    ["algorithm.name=feddf", *PROXY, "privacy.noise_multiplier=1.0"],  # local: any rule is post-processing
])
def test_accounted_combinations_load(overrides):
    config.load(None, [*TINY, *overrides])


# -- runs ------------------------------------------------------------------------------------
def test_quickstart_with_noise_multiplier_writes_epsilon(tmp_path):
    cfg = config.load(ROOT / "configs" / "quickstart.toml", ["privacy.noise_multiplier=1.0", "run.rounds=2"])
    experiment.run(cfg, out=tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert math.isfinite(summary["epsilon"]) and summary["epsilon"] > 0 and summary["delta"] == DELTA
    assert summary["privacy_mode"] == "local"
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    eps = [r["epsilon"] for r in recs]
    assert eps[0] < eps[1] == pytest.approx(summary["epsilon"])
    assert eps[1] == pytest.approx(privacy.epsilon(1.0, DELTA, 2))  # every client, every round
    assert 'mode = "local"' in (tmp_path / "config.toml").read_text()  # the resolved mode, for --resume


def test_local_dp_fedavg_learns_with_small_noise():
    cfg = config.load(None, [*TINY, "run.rounds=3", "privacy.noise_multiplier=0.001", "privacy.clip=10.0"])
    hist = experiment.run(cfg)
    assert hist.summary["final_accuracy"] > 0.6
    assert math.isfinite(hist.summary["epsilon"])


def test_local_dp_fedema_distill_learns_with_small_noise():
    cfg = config.load(None, [*TINY, *PROXY, "run.rounds=3", "algorithm.name=fedema_distill",
                             "algorithm.class_weighting=false", "algorithm.distill.steps=50",
                             "privacy.noise_multiplier=0.0001", "privacy.clip=1000.0"])
    hist = experiment.run(cfg)
    assert hist.summary["final_accuracy"] > 0.3
    assert hist.records[-1]["dp_clipped_fraction"] == 0.0


def test_central_dp_fedavg_accounts_subsampling():
    cfg = config.load(None, [*TINY, "run.rounds=2", "run.clients_per_round=2", *CENTRAL])
    hist = experiment.run(cfg)
    assert hist.summary["epsilon"] == pytest.approx(privacy.epsilon(1.0, DELTA, 2, 5, 2))
    assert hist.summary["epsilon"] < privacy.epsilon(1.0, DELTA, 2)
    assert "dp_upload_norm" in hist.records[0]


def test_local_dp_is_the_same_on_every_executor():
    base = [*TINY, "run.rounds=1", "privacy.noise_multiplier=0.5"]
    seq = experiment.run(config.load(None, base))
    vec = experiment.run(config.load(None, [*base, "run.executor=vectorized"]))
    for k, v in seq.state.params.items():
        torch.testing.assert_close(vec.state.params[k], v, atol=1e-4, rtol=0)


def test_resumed_private_run_equals_a_straight_one(tmp_path):
    base = [*TINY, "privacy.noise_multiplier=0.5", "run.clients_per_round=3"]
    straight = experiment.run(config.load(None, [*base, "run.rounds=2"]), out=tmp_path / "a")
    experiment.run(config.load(None, [*base, "run.rounds=1"]), out=tmp_path / "b")
    resumed = experiment.run(config.load(None, [*base, "run.rounds=2"]), out=tmp_path / "b", resume=True)
    assert [r["epsilon"] for r in resumed.records] == [r["epsilon"] for r in straight.records]
    assert resumed.summary["epsilon"] == straight.summary["epsilon"]
    for k, v in straight.state.params.items():
        assert torch.equal(resumed.state.params[k], v), k


def test_central_refuses_a_subclass_that_changes_the_aggregation():
    from kdfl.algorithms.fedavg import FedAvg

    class Mine(FedAvg):
        def server_update(self, task, state, updates):
            return super().server_update(task, state, updates[:1])

    with pytest.raises(KdflError, match="Mine overrides server_update"):
        privacy.check_combination(Mine(), PrivacySettings(mode="central", noise_multiplier=1.0))
    privacy.check_combination(Mine(), PrivacySettings(mode="local", noise_multiplier=1.0))  # local: fine


def test_cli_prints_epsilon(tmp_path, capsys):
    from kdfl import cli

    args = ["run", str(ROOT / "configs" / "quickstart.toml"), "--set", "privacy.noise_multiplier=1.0", "--set",
            "run.rounds=1", "--out", str(tmp_path / "r"), "--quiet"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    eps = json.loads((tmp_path / "r" / "summary.json").read_text())["epsilon"]
    assert f"differential privacy (local, noise multiplier 1.0, clip 1.0): epsilon {eps:.3g} at delta 1e-05" in out
