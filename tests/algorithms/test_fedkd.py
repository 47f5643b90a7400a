"""FedKD: the adaptive mutual loss by hand, SVD payloads and their bytes, the server step
and the downlink chain by hand, options, and a run that learns at a fraction of FedAvg's
uplink."""

from __future__ import annotations

import json
import math

import pytest
import torch

from kdfl import config as config_mod
from kdfl import experiment, wire
from kdfl.algorithms import ALGORITHMS, FedKD
from kdfl.algorithms.fedkd import (
    MENTEE,
    MENTOR,
    PROJ,
    SYNC,
    FedKDClientState,
    FedKDLoss,
    compress,
    decompress,
)
from kdfl.algorithms.program import DELTA, Phase
from kdfl.losses import Batch, Outputs
from kdfl.train import LocalSGD
from kdfl.types import Client, ClientInfo, ClientUpdate, KdflError, PayloadError, TensorData

# one sample of label 0; mentor logits [2, 0], mentee logits [0, 1]
T, S, Y = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 1.0]]), torch.tensor([0])
PT = [math.e**2 / (math.e**2 + 1), 1 / (math.e**2 + 1)]
PS = [1 / (1 + math.e), math.e / (1 + math.e)]
LT, LS = math.log(1 + math.exp(-2)), math.log(1 + math.e)
KL_ST = sum(s * (math.log(s) - math.log(t)) for s, t in zip(PS, PT, strict=True))  # KL(p_S || p_T)
KL_TS = sum(t * (math.log(t) - math.log(s)) for s, t in zip(PS, PT, strict=True))
A = 1 / (LT + LS)
HS, HT = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 1.0, 3.0]])
W = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # the projection: P(h_S) = [1, 2, 3]
MSE = ((1 - 0) ** 2 + (2 - 1) ** 2 + (3 - 3) ** 2) / 3


def outputs(t=T, s=S):
    values = {MENTOR: {"logits": t, "features": HT}, MENTEE: {"logits": s, "features": HS}}

    def call(model, method, x):
        assert (model, method) == (PROJ, "forward")
        return x @ W.T

    return Outputs(values, {}, call), Batch(torch.zeros(1, 1), Y, torch.arange(1))


def test_adaptive_mutual_loss_by_hand():
    out, batch = outputs()
    # the references' nn.KLDivLoss() averages over the B·C = 2 elements: KL / 2
    base = LT + LS + A * (KL_ST + KL_TS) / 2
    assert float(FedKDLoss(hidden=0.0)(out, batch, {})) == pytest.approx(base)
    assert float(FedKDLoss(hidden=0.0, kl_reduction="batchmean")(out, batch, {})) == pytest.approx(
        LT + LS + A * (KL_ST + KL_TS))
    assert float(FedKDLoss(hidden=1.0, project=True)(out, batch, {})) == pytest.approx(base + A * MSE)
    assert float(FedKDLoss(hidden=0.5, project=True)(out, batch, {})) == pytest.approx(base + 0.5 * A * MSE)
    assert float(FedKDLoss(project=True)(out, batch, {})) == pytest.approx(base + 2 * A * MSE)  # hidden = 2
    # a = 1/(L_T + L_S) is differentiated through by default (the reference), not when detached
    grads = []
    for detach in (False, True):
        t, s = T.clone().requires_grad_(), S.clone().requires_grad_()
        out, batch = outputs(t, s)
        FedKDLoss(hidden=0.0, detach_weight=detach)(out, batch, {}).backward()
        grads.append(s.grad.clone())
    assert not torch.allclose(grads[0], grads[1])
    assert FedKDLoss.per_sample_mean is False  # the vectorized executor never pads its batches


def test_kl_is_the_references_nn_kldivloss():
    from torch import nn
    from torch.nn import functional as F

    from kdfl.losses import mutual_kl

    def _kl(target, logits, reduction="mean"):  # FedKD's term: gradients into both, nn.KLDivLoss()'s reduction
        return mutual_kl(target, logits, reduction=reduction, detach_target=False)

    g = torch.Generator().manual_seed(0)
    t, s = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    with pytest.warns(UserWarning):  # torch warns that "mean" divides by the classes too: the point here
        ref = nn.KLDivLoss()(F.log_softmax(s, -1), F.softmax(t, -1))  # PFLlib clientkd.py: KL(input log p_S, target p_T)
    torch.testing.assert_close(_kl(t, s), ref)
    torch.testing.assert_close(_kl(t, s, "batchmean"), ref * 7)


def test_a_perfectly_fitted_batch_keeps_a_finite_loss_and_gradient():
    # both models put all mass on the label: both cross-entropies are 0 in float32, so
    # 1/(L_T + L_S) is inf without eps (and inf * 0 = NaN)
    t = torch.tensor([[200.0, -200.0]], requires_grad=True)
    s = torch.tensor([[150.0, -150.0]], requires_grad=True)
    out, batch = outputs(t, s)
    assert float(F_ce(t.detach())) == 0.0 and float(F_ce(s.detach())) == 0.0
    loss = FedKDLoss(project=True)(out, batch, {})
    loss.backward()
    assert math.isfinite(float(loss.detach())) and bool(torch.isfinite(t.grad).all() and torch.isfinite(s.grad).all())
    assert not math.isfinite(float(FedKDLoss(hidden=0.0, eps=0.0)(*outputs(t.detach(), s.detach()), {})))


def F_ce(logits):
    return torch.nn.functional.cross_entropy(logits, Y)


def test_compress_payload_bytes_and_round_trip():
    u, v = torch.tensor([1.0, -2.0, 0.5, 3.0, 1.0, 1.0, 2.0, -1.0]), torch.tensor([2.0, 0.0, -1.0, 1.0, 1.0, 1.0])
    delta = {"w": torch.outer(u, v), "b": torch.tensor([0.1, 0.2, 0.3]), "n": torch.tensor(7)}
    p = compress(delta, 0.95, DELTA)
    assert {k: tuple(t.shape) for k, t in p.items()} == {
        "delta.w#u": (8, 1), "delta.w#s": (1,), "delta.w#vt": (1, 6), "delta.b": (3,), "delta.n": ()}
    # the factors cost 4 (8 + 6 + 1) = 60 B of data instead of 192; bytes are measured on the encoding
    assert wire.nbytes(p) == len(wire.encode(p))
    assert wire.nbytes(p) < wire.nbytes({DELTA + k: t for k, t in delta.items()})
    back = decompress(p, delta, DELTA)
    torch.testing.assert_close(back["w"], delta["w"])
    assert torch.equal(back["b"], delta["b"]) and back["n"].item() == 7
    # conv kernels are factorised as (out, in * k)
    conv = {"k": torch.randn(6, 2, 3)}
    assert compress(conv, 1.0, "")["k#values"].shape == (6, 6) or compress(conv, 0.5, "")["k#u"].shape[0] == 6
    torch.testing.assert_close(decompress(compress(conv, 1.0, ""), conv, ""), conv)
    bad = {
        "missing the factors": {k: t for k, t in p.items() if not k.startswith("delta.w")},
        "unexpected entries": {**p, "delta.zzz": torch.zeros(1)},
        "expected \\(3,\\)": {**p, "delta.b": torch.zeros(4)},
        "NaN": {**p, "delta.b": torch.tensor([0.0, float("nan"), 0.0])},
        "inconsistent rank": {**p, "delta.w#s": torch.ones(2)},
    }
    for reason, payload in bad.items():
        with pytest.raises(PayloadError, match=reason):
            decompress(payload, delta, DELTA)


def test_energy_schedule_follows_the_reference():
    alg = FedKD(energy_rounds=10)
    assert alg.energy(0) == pytest.approx(0.95 + 0.003) and alg.energy(9) == pytest.approx(0.98)
    assert alg.energy(30) == pytest.approx(0.98)  # held at T_end after R rounds
    for bad in ({"energy_start": 0.0}, {"energy_rounds": 0}, {"hidden": -1.0}, {"weighting": "size"},
                {"aggregator": "nope"}, {"kl_reduction": "sum"}, {"projection": "never"}, {"mentor_init": "x"},
                {"eps": -1.0}, {"clip_grad_norm": -1.0}):
        with pytest.raises(KdflError):
            FedKD(**bad)
    with pytest.raises(KdflError, match="adapters"):
        Phase(FedKDLoss(), LocalSGD(), train=(MENTOR,), adapters=(PROJ,))


BASE = ["run.seed=3", "run.threads=1", "data.name=digits", "data.num_clients=6", "data.val_size=20",
        "partition.name=dirichlet", "partition.alpha=0.5", "model.arch=mlp:hidden=8", "local.epochs=1",
        "local.batch_size=32", "local.lr=0.05", "local.momentum=0.5", "algorithm.name=fedkd"]


def federation(*extra: str):
    return experiment.build(config_mod.load(None, [*BASE, *extra]))


def client(fed, cid: int, state=None, round_num: int = 1) -> Client:
    return Client(cid, TensorData(torch.zeros(0, 64), torch.zeros(0, dtype=torch.long)), "mlp:hidden=8", round_num,
                  0, state)


def updates_of(alg, params, deltas, examples, ids=(0, 1)):
    return [ClientUpdate(i, n, compress(d, alg.energy(0), DELTA), {}) for i, d, n in zip(ids, deltas, examples,
                                                                                         strict=True)]


def rank_one_deltas(params, scales):
    """Deltas c_i * (a rank-one matrix per weight, a vector per bias): their averages stay rank one."""
    g = torch.Generator().manual_seed(0)
    base = {k: (torch.outer(torch.randn(v.shape[0], generator=g), torch.randn(v.shape[1], generator=g)) if v.dim() == 2
                else torch.randn(v.shape, generator=g)) for k, v in params.items()}
    return [{k: c * v for k, v in base.items()} for c in scales]


@pytest.mark.parametrize("weighting", ["uniform", "examples"])
def test_server_step_and_downlink_by_hand(weighting):
    fed = federation(f"algorithm.weighting={weighting}")
    task, alg = fed.task, fed.algorithm
    s0 = alg.init(task)
    w0 = s0.params
    deltas = rank_one_deltas(w0, [1.0, 3.0])
    ups = updates_of(alg, w0, deltas, [10, 30])
    for u in ups:
        alg.validate(task, s0, u)
    s1, metrics = alg.server_update(task, s0, ups)
    mean = 2.0 if weighting == "uniform" else (1.0 * 10 + 3.0 * 30) / 40  # of the scales
    for k, v in w0.items():
        torch.testing.assert_close(s1.params[k], v + mean * deltas[0][k] / 1.0, rtol=0, atol=1e-5)
    assert s1.round == 1 and dict(s1.synced) == {0: 0, 1: 0} and [h[0] for h in s1.history] == [1]
    assert metrics["downlink_update_bytes"] == s1.history[0][1] < s0.dense_bytes

    # client 0 (synced at round 0) gets the factors; client 4 (never took part) dense weights
    d0 = alg.configure(task, s1, ClientInfo(0, "mlp:hidden=8", 1))
    d4 = alg.configure(task, s1, ClientInfo(4, "mlp:hidden=8", 1))
    assert wire.nbytes(d0) < wire.nbytes(d4) and d0["rounds"].tolist() == [1] and "from_round" not in d4
    kept = FedKDClientState({SYNC: w0}, 0)
    for down, state in ((d0, kept), (d4, None)):
        got = alg.mentee_weights(task, down, client(fed, 0, state))
        assert all(torch.equal(got[k], s1.params[k]) for k in w0)  # bit for bit the server's mentee

    # one more round without client 0: it then receives both updates, applied in order
    s2, _ = alg.server_update(task, s1, updates_of(alg, s1.params, rank_one_deltas(w0, [0.5, 0.5]), [1, 1], (1, 2)))
    d0 = alg.configure(task, s2, ClientInfo(0, "mlp:hidden=8", 2))
    assert d0["rounds"].tolist() == [1, 2] and d0["from_round"].item() == 0
    got = alg.mentee_weights(task, d0, client(fed, 0, kept, 2))
    assert all(torch.equal(got[k], s2.params[k]) for k in w0)
    # a client whose kept copy is newer than the server believes (its upload was rejected) skips what it has
    newer = FedKDClientState({SYNC: s1.params}, 1)
    got = alg.mentee_weights(task, d0, client(fed, 0, newer, 2))
    assert all(torch.equal(got[k], s2.params[k]) for k in w0)
    with pytest.raises(KdflError, match="kept state was lost"):
        alg.mentee_weights(task, d0, client(fed, 0, None, 2))


def test_dense_downlink_when_the_updates_cost_more():
    fed = federation("algorithm.compress_downlink=false")
    task, alg = fed.task, fed.algorithm
    s0 = alg.init(task)
    s1, _ = alg.server_update(task, s0, updates_of(alg, s0.params, rank_one_deltas(s0.params, [1.0, 2.0]), [1, 1]))
    s2, _ = alg.server_update(task, s1, updates_of(alg, s1.params, rank_one_deltas(s0.params, [1.0, 2.0]), [1, 1],
                                                   (1, 2)))
    assert len(s2.history) == 1  # two dense updates would cost more than the weights
    assert "from_round" in alg.configure(task, s2, ClientInfo(1, "mlp:hidden=8", 2))  # one update behind: factors
    down = alg.configure(task, s2, ClientInfo(0, "mlp:hidden=8", 2))  # two behind: dense weights
    assert "from_round" not in down and torch.equal(down["mentee.classifier.weight"], s2.params["classifier.weight"])


def test_malformed_uploads_are_rejected():
    fed = federation()
    task, alg = fed.task, fed.algorithm
    s0 = alg.init(task)
    good = updates_of(alg, s0.params, rank_one_deltas(s0.params, [1.0]), [1], (0,))[0]
    for reason, payload in {"unexpected entries": {**good.payload, "logits": torch.zeros(2)},
                            "missing": {k: v for k, v in good.payload.items() if "classifier" not in k}}.items():
        with pytest.raises(PayloadError, match=reason):
            alg.validate(task, s0, ClientUpdate(0, 1, payload, {}))


def test_mentor_projection_kept_and_learns_at_a_fraction_of_fedavgs_uplink(tmp_path):
    common = ["model.arch=mlp:hidden=32", "run.rounds=6", "data.num_clients=5", "local.momentum=0.9",
              "data.client_holdout=0.2"]
    kd = experiment.run(config_mod.load(None, [*BASE, *common, "algorithm.mentor=mlp:hidden=128",
                                               "algorithm.energy_rounds=6"]), out=tmp_path / "kd")
    avg = experiment.run(config_mod.load(None, [*BASE, *common, "algorithm.name=fedavg"]))
    up = [r["uplink_bytes_per_client"] for r in kd.records]
    up_avg = [r["uplink_bytes_per_client"] for r in avg.records]
    assert sum(up) <= 0.3 * sum(up_avg)
    assert kd.records[-1]["accuracy"] > 0.4  # chance: 0.1
    own = json.loads((tmp_path / "kd" / "clients.json").read_text())["client_eval"]["accuracy"]
    assert len(own) == 5 and min(own) > 0.3  # the mentors, each on its own held-out data
    assert ALGORITHMS["fedkd"] is FedKD


def test_svd_codec_serves_other_weight_sharing_algorithms():
    common = [*BASE, "algorithm.name=fedavg", "model.arch=mlp:hidden=32", "run.rounds=4", "local.momentum=0.9"]
    dense = experiment.run(config_mod.load(None, common))
    svd = experiment.run(config_mod.load(None, [*common, "compression.uplink=svd:0.9"]))
    assert svd.records[-1]["uplink_bytes"] < 0.6 * dense.records[-1]["uplink_bytes"]
    assert svd.records[-1]["accuracy"] > 0.3


@pytest.mark.parametrize("projection", ["always", "width"])
def test_projection_always_or_only_where_the_feature_widths_differ(projection):
    same = "linear:in_features=8,out_features=8" if projection == "always" else None
    for mentor, proj in (("mlp:hidden=16", "linear:in_features=8,out_features=16"), ("", same)):
        fed = federation(f"algorithm.mentor={mentor}", f"algorithm.projection={projection}")
        task, alg = fed.task, fed.algorithm
        down = alg.configure(task, alg.init(task), ClientInfo(0, "mlp:hidden=8", 0))
        prog = alg.client_program(task, down, client(fed, 0))
        assert prog.models[MENTOR].arch == (mentor or "mlp:hidden=8")  # "" = the client's own architecture
        assert (prog.models[PROJ].arch if PROJ in prog.models else None) == proj
        assert prog.keep == ((MENTOR, PROJ) if proj else (MENTOR,))
        assert prog.phases[0].adapters == ((PROJ,) if proj else ())
        assert prog.phases[0].local.clip_grad_norm == 10.0  # PFLlib's clipping, the default


@pytest.mark.parametrize("init", ["mentee", "fresh"])
def test_mentor_starts_from_the_mentees_initial_weights(init):
    fed = federation(f"algorithm.mentor_init={init}")
    task, alg = fed.task, fed.algorithm
    state = alg.init(task)
    for cid in (0, 3):
        prog = alg.client_program(task, alg.configure(task, state, ClientInfo(cid, "mlp:hidden=8", 1)), client(fed, cid))
        same = all(torch.equal(prog.models[MENTOR].weights[k], v) for k, v in state.params.items())
        assert same == (init == "mentee")
    other = federation("algorithm.mentor=mlp:hidden=16")  # another architecture: always fresh
    prog = other.algorithm.client_program(other.task, other.algorithm.configure(
        other.task, other.algorithm.init(other.task), ClientInfo(0, "mlp:hidden=8", 1)), client(other, 0))
    assert prog.models[MENTOR].weights["body.1.weight"].shape == (16, 64)


def test_reports_the_mentor_and_the_shared_mentee_on_each_clients_split(tmp_path):
    cfg = config_mod.load(None, [*BASE, "run.rounds=2", "data.client_holdout=0.2"])
    experiment.run(cfg, out=tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert 0 <= summary["client_mentee_accuracy_mean"] <= 1 and 0 <= summary["client_accuracy_mean"] <= 1
    per = json.loads((tmp_path / "clients.json").read_text())["client_eval"]
    assert len(per["mentee_accuracy"]) == len(per["accuracy"]) == 6
    assert "test_mentee_accuracy" not in per  # the mentee on the test set is the run's test_accuracy


def test_shipped_config_sends_at_most_0_3x_fedavgs_uplink():
    """configs/fedkd.toml (first 3 rounds) against the same file with algorithm.name = fedavg."""
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "configs" / "fedkd.toml"
    short = ["run.rounds=3", "data.num_samples=4000", "local.epochs=1"]
    kd = experiment.run(config_mod.load(path, short))
    avg = experiment.run(config_mod.load(path, [*short, "algorithm.name=fedavg"]))
    up_kd = sum(r["uplink_bytes"] for r in kd.records)
    up_avg = sum(r["uplink_bytes"] for r in avg.records)
    assert up_kd <= 0.3 * up_avg, (up_kd, up_avg)


def test_upload_attacks_act_on_the_matrices_the_factors_encode():
    from kdfl.attacks import make_attack
    from kdfl.compression import unfactor
    from kdfl.rng import generator
    from kdfl.threat import make_threat

    fed = federation()
    g = torch.Generator().manual_seed(1)
    deltas = [{"w": torch.randn(12, r, generator=g) @ torch.randn(r, 9, generator=g), "b": torch.randn(9, generator=g)}
              for r in (1, 2, 3, 2)]  # four clients whose factors have different ranks
    ups = [ClientUpdate(i, 1, compress(d, 0.999, DELTA), {}) for i, d in enumerate(deltas)]
    assert [u.payload["delta.w#s"].shape[0] for u in ups] == [1, 2, 3, 2]
    flip = make_threat({"name": "sign_flip", "fraction": 0.25}, 10)
    out = flip.tamper(ups, [False, False, False, True], 0, fed.task)
    assert out[3].payload["delta.w#s"].shape == (2,)  # sent at the attacker's own rank
    torch.testing.assert_close(unfactor(out[3].payload)[0]["delta.w"], -deltas[3]["w"], atol=1e-4, rtol=0)
    torch.testing.assert_close(out[3].payload["delta.b"], -deltas[3]["b"])
    for i in range(3):  # honest uploads untouched
        assert all(torch.equal(out[i].payload[k], ups[i].payload[k]) for k in ups[i].payload)
    alie = make_threat({"name": "alie", "fraction": 0.25}, 10).tamper(ups, [False, False, False, True], 0, fed.task)
    dense = torch.stack([unfactor(u.payload)[0]["delta.w"].reshape(-1) for u in ups])  # (clients, 108)
    want = make_attack("alie")(dense, torch.tensor([False, False, False, True]), generator(fed.task.seed, "attack", 0))
    u, s, vt = torch.linalg.svd(want[3].reshape(12, 9).double(), full_matrices=False)
    rank2 = (u[:, :2] * s[:2]) @ vt[:2]  # what the attacker sends: the best rank-2 approximation
    assert alie[3].payload["delta.w#s"].shape == (2,)
    torch.testing.assert_close(unfactor(alie[3].payload)[0]["delta.w"], rank2.float(), atol=1e-5, rtol=0)
    assert not torch.allclose(rank2.float(), deltas[3]["w"], atol=1e-2)
