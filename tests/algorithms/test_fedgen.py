"""FedGen: the client loss, payloads and bytes by hand, the generator's teacher and
diversity losses by hand (per-sample and the reference's collapsed weighting), the
server's generator step, α₀ = β₀ = 0 is FedAvg exactly, validation, executors on a round
with a generator, learning."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from test_fd import LOCAL, make_task, round_two_jobs
from torch import Tensor, nn

from kdfl import config as config_mod
from kdfl import experiment, rng, tree, wire
from kdfl.algorithms import ALGORITHMS, FedGen
from kdfl.algorithms.fedgen import (
    NOISE_STREAM,
    FedGenLoss,
    FedGenState,
    Generator,
    diversity_loss,
    label_weights,
    teacher_loss,
)
from kdfl.algorithms.program import run_program
from kdfl.losses import Batch, Outputs
from kdfl.models.base import Decoupled
from kdfl.simulation.executors import Sequential
from kdfl.simulation.parallel import Parallel
from kdfl.simulation.vectorized import Vectorized
from kdfl.train import LocalSGD
from kdfl.transport import pack
from kdfl.types import Client, ClientUpdate, KdflError, PayloadError, Task, TensorData

ONE_STEP = LocalSGD(epochs=1, batch_size=8, lr=0.1)
W0 = torch.tensor([[1.0, 2.0], [0.0, 1.0]])  # head and model: logits of x = [a, b] are [a + 2b, b]


class Tiny(Decoupled):
    """features(x) = x (2-d), head = a bias-free Linear(2, 2)."""

    has_activations = False

    def __init__(self) -> None:
        super().__init__()
        self.classifier = nn.Linear(2, 2, bias=False)
        self.feature_dim = 2

    def _trunk(self, x: Tensor, maps: list[Tensor] | None) -> Tensor:
        return x


def hand_task() -> Task:
    # x = [1, 0] -> logits [1, 0]; [0, 2] -> [4, 2]; [3, 1] -> [5, 1]
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 1.0]])
    data = TensorData(x, torch.tensor([0, 1, 0]))
    return Task(train=data, test=data, proxy=None, val=None, num_classes=2, input_shape=(2,), server_arch="tiny",
                client_archs=["tiny"], build_model=lambda arch: Tiny())


def hand_generator() -> dict[str, Tensor]:
    """G(ε, y) = column y of [[0, 1], [1, 0]] whatever ε: label 0 -> [0, 1], label 1 -> [1, 0]
    (noise columns of the first layer 0, BatchNorm the identity in eval mode)."""
    g = Generator(2, 2, noise_dim=2, hidden=2)
    with torch.no_grad():
        g.fc.weight.copy_(torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]]))
        g.fc.bias.zero_()
        g.bn.running_var.fill_(1.0 - g.bn.eps)
        g.out.weight.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
        g.out.bias.zero_()
    return tree.state_of(g)


def downlink(labels=(False, True)) -> dict[str, Tensor]:
    return {"classifier.weight": W0.clone(), **{"gen." + k: v for k, v in hand_generator().items()},
            "gen_labels": torch.tensor(labels)}


def client(task, round_num=2) -> Client:
    return Client(0, task.train, "tiny", round_num, seed=0)


def nbytes(payload) -> int:
    return len(wire.encode(pack(payload, None)))


def entry_bytes(name: str, t: Tensor) -> int:
    """The wire's cost of one entry: u16 name length, name, dtype, ndim, u32 dims, data."""
    return 2 + len(name.encode()) + 2 + 4 * t.dim() + t.numel() * t.element_size()


def lse(*v: float) -> float:
    return math.log(sum(math.exp(a) for a in v))


def kl(q_logits, p_logits) -> float:
    q = [math.exp(a - lse(*q_logits)) for a in q_logits]
    return sum(qi * ((a - lse(*q_logits)) - (b - lse(*p_logits))) for qi, a, b in zip(q, q_logits, p_logits, strict=True))


# the client loss of hand_task under W0 with hand_generator's latents (round 2: t = 1)
CE = ((lse(1, 0) - 1) + (lse(4, 2) - 2) + (lse(5, 1) - 5)) / 3
GEN_CE = lse(1, 0) - 0  # every ŷ = 1 (gen_labels: only label 1): head([1, 0]) = [1, 0]
KL = (kl([2, 1], [1, 0]) + kl([1, 0], [4, 2]) + kl([2, 1], [5, 1])) / 3  # head([0, 1]) = [2, 1] for label 0


def test_defaults_follow_the_reference():
    assert ALGORITHMS["fedgen"] is FedGen
    alg = FedGen()
    assert (alg.alpha, alg.beta, alg.decay, alg.noise_dim, alg.hidden) == (10.0, 10.0, 0.98, 32, 256)
    assert (alg.gen_steps, alg.gen_batch_size, alg.gen_lr, alg.gen_lr_decay, alg.gen_weight_decay) == (
        50, 32, 3e-4, 0.98, 1e-2)
    assert alg.diversity == 1.0 and not alg.reference_weighting
    assert alg.weights_at(0) == (10.0, 10.0)
    assert alg.weights_at(1) == pytest.approx((9.8, 9.8))
    assert alg.weights_at(1000) == (1e-4, 1e-4)  # the floor
    assert FedGen(alpha=0.0, beta=2.0).weights_at(1000) == (0.0, 1e-4)  # a weight of 0 stays 0
    # the reference's MNIST generator (noise 32, hidden 256, latent 32, C = 10): 19,744 parameters
    assert sum(p.numel() for p in Generator(10, 32).parameters()) == 19_744
    assert alg.latent == "pre_activation"  # the reference's latent: a Linear's signed output
    for bad in ({"alpha": -1.0}, {"decay": 0.0}, {"gen_batch_size": 1}, {"gen_lr": 0.0}, {"aggregator": "nope"},
                {"latent": "logits"}):
        with pytest.raises(KdflError):
            FedGen(**bad)


def test_loss_by_hand():
    z = torch.tensor([[1.0, 0.0], [4.0, 2.0], [5.0, 1.0]])
    y = torch.tensor([0, 1, 0])
    lat = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])  # latents of the own labels
    targets = {"z": lat, "z_gen": torch.tensor([[1.0, 0.0]] * 3), "y_gen": torch.tensor([1, 1, 1])}
    out = Outputs({"model": {"logits": z}}, {}, lambda model, method, t: t @ W0.T)
    batch = Batch(torch.zeros(3, 2), y, torch.arange(3), targets)
    assert float(FedGenLoss(0.0, 0.0)(out, batch, {})) == pytest.approx(CE)
    assert float(FedGenLoss(2.0, 0.0)(out, batch, {})) == pytest.approx(CE + 2 * GEN_CE)
    assert float(FedGenLoss(0.0, 3.0)(out, batch, {})) == pytest.approx(CE + 3 * KL)
    assert float(FedGenLoss(2.0, 3.0)(out, batch, {})) == pytest.approx(CE + 2 * GEN_CE + 3 * KL)
    # the reference's nn.KLDivLoss(reduction="batchmean") on log-probabilities vs q
    q = torch.softmax(lat @ W0.T, -1)
    ref = torch.nn.functional.kl_div(torch.log_softmax(z, -1), q, reduction="batchmean")
    assert KL == pytest.approx(float(ref))


def test_client_program_loss_targets_payload_and_bytes():
    task = hand_task()
    alg = FedGen(local=ONE_STEP, alpha=2.0, beta=3.0, decay=0.5, noise_dim=2, hidden=2)  # round 2: α_1 = 1, β_1 = 1.5
    c = client(task)
    program = alg.client_program(task, downlink(), c)
    (phase,) = program.phases
    assert phase.loss == FedGenLoss(1.0, 1.5)
    t = phase.data.targets
    torch.testing.assert_close(t["z"], torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]))
    assert t["y_gen"].tolist() == [1, 1, 1]
    torch.testing.assert_close(t["z_gen"], torch.tensor([[1.0, 0.0]] * 3))
    # one full-batch step: the reported loss is the loss at W0
    u = run_program(task, c, program)
    assert u.metrics["train_loss"] == pytest.approx(CE + 1.0 * GEN_CE + 1.5 * KL, rel=1e-5)
    # the payload: the delta and the label histogram
    assert list(u.payload) == ["delta.classifier.weight", "label_counts"]
    assert u.payload["label_counts"].tolist() == [2, 1] and u.payload["label_counts"].dtype == torch.int64
    assert nbytes(u.payload) == 9 + (2 + 23 + 2 + 8 + 16) + (2 + 12 + 2 + 4 + 16) == 96
    # the downlink: weights, the generator's weights and BatchNorm buffers, the labels
    down = downlink()
    assert nbytes(down) == 9 + sum(entry_bytes(k, v) for k, v in down.items())
    assert {"gen.bn.running_mean", "gen.bn.running_var", "gen.bn.num_batches_tracked", "gen_labels"} <= set(down)


def test_generated_targets_come_from_the_clients_stream():
    task, parts = make_task(["mlp:hidden=16"], sizes=[12], classes=4)
    alg = FedGen(local=LOCAL, noise_dim=3, hidden=8)
    state = alg.init(task)
    state = dataclasses.replace(state, round=1, labels=torch.tensor([True, False, True, True]))
    c = Client(0, parts[0], task.client_archs[0], 2, seed=5)
    down = alg.configure(task, state, c.info)
    assert set(down) == set(state.params) | {"gen." + k for k in state.generator} | {"gen_labels"}
    t = alg.client_program(task, down, c).phases[0].data.targets
    gen = Generator(4, 16, 3, 8)
    gen.load_state_dict(state.generator)
    gen.eval()
    g = c.generator(NOISE_STREAM)
    with torch.no_grad():
        # latent = "pre_activation": the generator's signed outputs through the features' ReLU
        raw = gen(torch.rand(12, 3, generator=g), parts[0].y)
        assert bool((raw < 0).any())
        torch.testing.assert_close(t["z"], raw.clamp(min=0))
        y_gen = torch.tensor([0, 2, 3])[torch.randint(3, (12,), generator=g)]
        assert torch.equal(t["y_gen"], y_gen) and not (t["y_gen"] == 1).any()
        torch.testing.assert_close(t["z_gen"], gen(torch.rand(12, 3, generator=g), y_gen).clamp(min=0))
    # round 1 (no generator in the downlink yet): plain cross-entropy, one shared phase
    first = alg.configure(task, alg.init(task), c.info)
    assert first.keys() == state.params.keys()
    c1 = Client(0, parts[0], task.client_archs[0], 1, seed=5)
    p1, p2 = alg.client_program(task, first, c1), alg.client_program(task, first, c1)
    assert p1.phases[0] is p2.phases[0] and p1.phases[0].data is None


def test_label_weights_by_hand():
    w, qualified = label_weights(torch.tensor([[2, 0], [1, 3]]))  # +1: [[3, 1], [2, 4]]
    torch.testing.assert_close(w, torch.tensor([[3 / 5, 2 / 5], [1 / 5, 4 / 5]]))  # w[y, k]
    assert qualified.tolist() == [0, 1]
    _, qualified = label_weights(torch.tensor([[0, 5, 0], [0, 1, 2]]))
    assert qualified.tolist() == [1, 2]  # nobody holds label 0: max count 1 after smoothing


def test_teacher_loss_by_hand_both_weightings():
    y = torch.tensor([0, 1])
    head1 = torch.zeros(2, 2)  # CE log 2 for both samples
    head2 = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])  # CE log(4/3), log 2
    w = torch.tensor([[3 / 5, 2 / 5], [1 / 5, 4 / 5]])
    l2, l43 = math.log(2.0), math.log(4 / 3)
    per_sample = (3 / 5 * l2 + 1 / 5 * l2) / 2 + (2 / 5 * l43 + 4 / 5 * l2) / 2
    assert float(teacher_loss([head1, head2], y, w)) == pytest.approx(per_sample)
    collapsed = l2 * (3 / 5 + 1 / 5) / 2 + (l43 + l2) / 2 * (2 / 5 + 4 / 5) / 2
    assert float(teacher_loss([head1, head2], y, w, reference=True)) == pytest.approx(collapsed)
    # which is what the reference's (B,) * (B, 1) broadcast computes
    ref = 0.0
    for k, h in enumerate((head1, head2)):
        ce = torch.nn.functional.cross_entropy(h, y, reduction="none")
        ref += float(torch.mean(ce * w[y, k].reshape(-1, 1)))
    assert ref == pytest.approx(collapsed)
    # with one weight per client for every label, the two agree
    flat = torch.tensor([[0.25, 0.75], [0.25, 0.75]])
    assert float(teacher_loss([head1, head2], y, flat)) == pytest.approx(
        float(teacher_loss([head1, head2], y, flat, reference=True)))


def test_diversity_loss_by_hand():
    eps = torch.tensor([[0.0], [1.0], [0.5]])
    z = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0]])
    # d_z: (0,1) 1, (0,2) 2, (1,2) 3; d_eps: 1, 0.25, 0.25; products 1, 0.5, 0.75 (twice), over 9 pairs
    assert float(diversity_loss(eps, z)) == pytest.approx(math.exp(-2 * 2.25 / 9))


def test_server_generator_step_and_fedavg():
    task = hand_task()
    alg = FedGen(gen_steps=1, noise_dim=2, hidden=4, latent="features")  # Tiny: signed features, no ReLU
    state = alg.init(task)
    state = dataclasses.replace(state, params={"classifier.weight": W0.clone()})
    d0, d1 = torch.tensor([[1.0, 0.0], [0.0, -1.0]]), torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    ups = [ClientUpdate(0, 1, {"delta.classifier.weight": d0, "label_counts": torch.tensor([2, 0])}),
           ClientUpdate(1, 3, {"delta.classifier.weight": d1, "label_counts": torch.tensor([1, 3])})]
    for u in ups:
        alg.validate(task, state, u)
    new, metrics = alg.server_update(task, state, ups)
    # FedAvg by examples: W0 + (1·d0 + 3·d1) / 4
    torch.testing.assert_close(new.params["classifier.weight"], W0 + (d0 + 3 * d1) / 4)
    assert isinstance(new, FedGenState) and new.round == 1 and new.labels.tolist() == [True, True]
    assert new.gen_opt is not None and not torch.equal(new.generator["out.weight"], state.generator["out.weight"])
    # the step's losses: the same draws, the initial generator (train mode), the two clients' heads
    g = rng.generator(task.seed, "fedgen", 1)
    y = torch.tensor([0, 1])[torch.randint(2, (32,), generator=g)]
    eps = torch.rand(32, 2, generator=g)
    gen = Generator(2, 2, 2, 4)
    gen.load_state_dict(state.generator)
    with torch.no_grad():
        z = gen.train()(eps, y)
    w = torch.tensor([[3 / 5, 2 / 5], [1 / 5, 4 / 5]])
    heads = [z @ (W0 + d0).T, z @ (W0 + d1).T]
    ce = [torch.nn.functional.cross_entropy(h, y, reduction="none") for h in heads]
    teach = float(sum((w[y, k] * ce[k]).mean() for k in range(2)))
    div = float(diversity_loss(eps, z))
    assert metrics["generator_teacher_loss"] == pytest.approx(teach, rel=1e-5)
    assert metrics["generator_diversity_loss"] == pytest.approx(div, rel=1e-5)
    assert metrics["generator_loss"] == pytest.approx(teach + div, rel=1e-5)
    # the collapsed weighting trains another generator
    ref, _ = dataclasses.replace(alg, reference_weighting=True).server_update(task, state, ups)
    torch.testing.assert_close(ref.params["classifier.weight"], new.params["classifier.weight"])
    assert not torch.equal(ref.generator["out.weight"], new.generator["out.weight"])
    # the downlink from now on carries the generator
    down = alg.configure(task, new, client(task).info)
    assert set(down) == {"classifier.weight", "gen_labels", *("gen." + k for k in new.generator)}
    assert alg.client_model(task, down, client(task)).weights.keys() == {"classifier.weight"}


def test_validate_rejects_each_malformed_payload():
    task = hand_task()
    alg = FedGen(latent="features")  # Tiny's features are its (signed) inputs
    state = dataclasses.replace(alg.init(task), params={"classifier.weight": W0.clone()})
    good = {"delta.classifier.weight": torch.zeros(2, 2), "label_counts": torch.tensor([1, 0])}
    alg.validate(task, state, ClientUpdate(0, 1, good))
    for payload, why in (
        ({"label_counts": torch.tensor([1, 0])}, "delta keys"),
        ({**good, "delta.classifier.weight": torch.zeros(2, 3)}, r"expected \(2, 2\)"),
        ({"delta.classifier.weight": torch.zeros(2, 2)}, "no 'label_counts'"),
        ({**good, "label_counts": torch.tensor([1, 0, 0])}, r"label_counts is \(3,\)"),
        ({**good, "label_counts": torch.tensor([1.0, 0.0])}, "float32"),
        ({**good, "label_counts": torch.tensor([1, -1])}, "negative"),
        ({**good, "extra": torch.zeros(1)}, "unexpected payload entries"),
    ):
        with pytest.raises(PayloadError, match=why):
            alg.validate(task, state, ClientUpdate(0, 1, payload))


def test_needs_one_architecture_and_a_head():
    task = hand_task()
    task.client_archs = ["tiny", "other"]
    with pytest.raises(KdflError, match="every client needs the server's"):
        FedGen().init(task)
    flat = hand_task()
    flat.build_model = lambda arch: nn.Linear(2, 2)
    with pytest.raises(KdflError, match="feature_dim"):
        FedGen().init(flat)
    with pytest.raises(KdflError, match="features of 'tiny' can be negative.*latent = 'features'"):
        FedGen().init(hand_task())


def test_server_teacher_loss_sees_the_latents_through_the_relu():
    # the server step of test_server_generator_step_and_fedavg on a model whose features
    # are post-ReLU: the heads classify relu(G(eps, y)), the diversity loss sees G(eps, y)
    task = hand_task()
    task.build_model = lambda arch: ReluTiny()
    alg = FedGen(gen_steps=1, noise_dim=2, hidden=4)
    state = dataclasses.replace(alg.init(task), params={"classifier.weight": W0.clone()})
    ups = [ClientUpdate(0, 1, {"delta.classifier.weight": torch.zeros(2, 2), "label_counts": torch.tensor([2, 1])})]
    _, metrics = alg.server_update(task, state, ups)
    g = rng.generator(task.seed, "fedgen", 1)
    y = torch.tensor([0, 1])[torch.randint(2, (32,), generator=g)]
    eps = torch.rand(32, 2, generator=g)
    gen = Generator(2, 2, 2, 4)
    gen.load_state_dict(state.generator)
    with torch.no_grad():
        z = gen.train()(eps, y)
    assert bool((z < 0).any())  # the ReLU bites
    teach = float(torch.nn.functional.cross_entropy(z.clamp(min=0) @ W0.T, y))  # one client: weight 1
    assert metrics["generator_teacher_loss"] == pytest.approx(teach, rel=1e-5)
    assert metrics["generator_diversity_loss"] == pytest.approx(float(diversity_loss(eps, z)), rel=1e-5)


class ReluTiny(Tiny):
    """Tiny with features relu(x): non-negative, as the zoo's models' features are."""

    def _trunk(self, x: Tensor, maps: list[Tensor] | None) -> Tensor:
        return torch.relu(x)


def test_executors_agree_and_batch_on_a_round_with_a_generator():
    task, parts = make_task(["mlp:hidden=16"])
    alg = FedGen(local=LOCAL, alpha=1.0, beta=1.0, noise_dim=4, hidden=8)  # α₀·lr = 0.1, as the reference's
    jobs = round_two_jobs(alg, task, parts)
    assert "gen_labels" in jobs[0][1]
    ref = Sequential().run(alg, task, jobs)
    vec = Vectorized()
    got = vec.run(alg, task, jobs)
    assert vec.batched == len(jobs) and not vec.reasons
    with Parallel(workers=2) as par:
        exact = par.run(alg, task, jobs)
    for a, b, c in zip(ref, got, exact, strict=True):
        for other, tol in ((b, 1e-5), (c, 0.0)):
            assert other.payload.keys() == a.payload.keys()
            for k, v in a.payload.items():
                torch.testing.assert_close(other.payload[k], v, atol=tol, rtol=0, msg=k)
            assert abs(other.metrics["train_loss"] - a.metrics["train_loss"]) <= tol


BASE = ["run.seed=3", "run.threads=1", "data.name=digits", "data.num_clients=4", "data.val_size=20",
        "partition.name=dirichlet", "partition.alpha=0.5", "model.arch=mlp:hidden=32", "local.epochs=1",
        "local.batch_size=32", "local.lr=0.05", "local.momentum=0.5"]


def run(*extra: str):
    return experiment.run(config_mod.load(None, [*BASE, *extra]))


def test_alpha_beta_zero_is_fedavg_exactly():
    ref = run("algorithm.name=fedavg", "run.rounds=3")
    got = run("algorithm.name=fedgen", "algorithm.alpha=0", "algorithm.beta=0", "run.rounds=3")
    for k, v in ref.state.params.items():
        torch.testing.assert_close(got.state.params[k], v, rtol=0, atol=0, msg=k)
    assert [r["downlink_bytes"] for r in got.records] == [r["downlink_bytes"] for r in ref.records]
    gen = run("algorithm.name=fedgen", "run.rounds=3")  # the regularisers change rounds 2 and 3
    assert any(not torch.equal(gen.state.params[k], v) for k, v in ref.state.params.items())
    assert gen.records[2]["downlink_bytes"] > ref.records[2]["downlink_bytes"]  # the generator is counted


def test_learns_on_digits():
    # α₀ = β₀ = 10 pair with the reference's SGD lr 0.01; at lr 0.1 they are scaled to 1 (α₀·lr = 0.1)
    hist = run("algorithm.name=fedgen", "algorithm.alpha=1", "algorithm.beta=1", "run.rounds=5", "local.epochs=2",
               "local.lr=0.1")
    accs = [r["accuracy"] for r in hist.records]
    assert all(r["failed"] == [] and r["rejected"] == [] for r in hist.records)
    assert accs[-1] > 0.8 and accs[-1] > accs[0], accs
    assert all("generator_loss" in r for r in hist.records)
    slow = run("algorithm.name=fedgen", "run.rounds=5", "local.epochs=2", "local.lr=0.01")  # the reference's pair
    assert slow.records[-1]["accuracy"] > 0.7
