"""Client programs: declaration errors, phase metrics, typed client state, the runner by hand."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_task
from toy_algorithms import ToyClientState

from kdfl import config as config_mod
from kdfl import experiment
from kdfl.algorithms.program import (
    Data,
    Delta,
    LabelLogits,
    LabelStats,
    Logits,
    Model,
    Phase,
    Program,
    Tracked,
    run_program,
)
from kdfl.losses import CrossEntropy
from kdfl.simulation.engine import Engine, RunSettings
from kdfl.simulation.executors import Sequential
from kdfl.simulation.vectorized import Vectorized
from kdfl.train import LocalSGD
from kdfl.types import Client, KdflError

ONE_STEP = LocalSGD(epochs=1, batch_size=8, lr=1.0)


def test_program_declaration_errors():
    w = {"weight": torch.zeros(2, 2)}
    with pytest.raises(KdflError, match=r"uses models \['peer'\]"):
        Program({"model": Model("linear", w)}, [Phase(CrossEntropy("peer"), ONE_STEP, train=("peer",))])
    with pytest.raises(KdflError, match=r"keeps models \['own'\]"):
        Program({"model": Model("linear", w)}, [Phase(CrossEntropy(), ONE_STEP)], keep=("own",))
    with pytest.raises(KdflError, match="target 'q' has 2 rows but x has 3"):
        Data(torch.zeros(3, 2), targets={"q": torch.zeros(2, 2)})


def test_one_program_by_hand():
    # the FedAvg round of tests/core/test_baselines.py, written as a program: W = 0, one SGD
    # step at lr 1 on client 1 (x = [0, 2], y = 1, 3 samples): grad of CE = (p - onehot) x^T
    # = [[0, 1], [0, -1]] -> W = [[0, -1], [0, 1]]; logits on x = [0, 2]: [-2, 2]
    task, parts = tiny_task()
    client = Client(1, task.train.subset(parts[1]), "linear", 1, seed=0)
    start = {"weight": torch.zeros(2, 2)}
    program = Program({"model": Model("linear", start)}, [Phase(CrossEntropy(), ONE_STEP)],
                      upload=[Delta(start), Logits(torch.tensor([[0.0, 2.0]]))], keep=("model",))
    u = run_program(task, client, program)
    torch.testing.assert_close(u.payload["delta.weight"], torch.tensor([[0.0, -1.0], [0.0, 1.0]]))
    torch.testing.assert_close(u.payload["logits"], torch.tensor([[-2.0, 2.0]]))
    assert u.metrics == {"train_loss": pytest.approx(float(torch.log(torch.tensor(2.0)))), "steps": 1.0}
    torch.testing.assert_close(u.client_state.models["model"]["weight"], torch.tensor([[0.0, -1.0], [0.0, 1.0]]))
    assert list(u.payload) == ["delta.weight", "logits"]  # uploads merge in order


def test_phases_report_their_losses_and_the_total_steps():
    cfg = config_mod.load(None, ["algorithm.name=toy_algorithms:ToyMutual", "data.name=digits", "data.num_clients=3",
                                 "data.proxy=holdout", "data.proxy_size=40", "model.arch=mlp:hidden=16",
                                 "local.epochs=1", "local.batch_size=32", "run.rounds=3", "local.lr=0.01"])
    hist = experiment.run(cfg)
    for r, rec in enumerate(hist.records, start=1):
        assert rec["digest_loss"] > 0 and rec["private_loss"] > 0 and "train_loss" not in rec
        assert rec["client_rounds_max"] == r  # the typed client state counted the client's rounds
    fed = experiment.build(cfg)
    engine = Engine(fed.algorithm, fed.task, fed.partitions, RunSettings(rounds=1))
    state = fed.algorithm.init(fed.task)
    clients = [engine.client(c, 1, ToyClientState({}, rounds=4)) for c in range(3)]
    jobs = [(c, fed.algorithm.configure(fed.task, state, c.info)) for c in clients]
    for ex in (Sequential(), Vectorized()):
        for u in ex.run(fed.algorithm, fed.task, jobs):
            assert isinstance(u.client_state, ToyClientState) and u.client_state.rounds == 5
            assert u.metrics["steps"] == 2 + -(-len(fed.partitions[u.client_id]) // 32)  # digest 2 + private


def test_tracking_declaration_errors():
    w = {"weight": torch.zeros(2, 2)}
    track = LabelLogits(2)
    with pytest.raises(KdflError, match="tracks model 'peer' but does not run it"):
        Program({"model": Model("linear", w)}, [Phase(CrossEntropy(), ONE_STEP, track=LabelLogits(2, "peer"))])
    with pytest.raises(KdflError, match="data without labels"):
        Program({"model": Model("linear", w)}, [Phase(CrossEntropy(), ONE_STEP, data=Data(torch.zeros(3, 2)),
                                                      track=track)])
    with pytest.raises(KdflError, match="two tracking phases are named 'train'"):
        Program({"model": Model("linear", w)}, [Phase(CrossEntropy(), ONE_STEP, track=track)] * 2)
    with pytest.raises(KdflError, match=r"Tracked\('warm'\) names no tracking phase"):
        Program({"model": Model("linear", w)}, [Phase(CrossEntropy(), ONE_STEP, track=track)], upload=[Tracked("warm")])
    with pytest.raises(KdflError, match="no tracked statistics"):
        Tracked().make({})  # outside kdfl's runners
    with pytest.raises(KdflError, match="num_classes"):
        LabelLogits(0)


def test_tracked_label_logits_by_hand():
    # client 1 of tiny_task: three samples x = [0, 2], y = 1; W = 0. Two epochs of one step at lr 1:
    # step 1 sees logits [0, 0] (then W = [[0, -1], [0, 1]]), step 2 sees [-2, 2] on each sample
    task, parts = tiny_task()
    client = Client(1, task.train.subset(parts[1]), "linear", 1, seed=0)
    start = LabelStats(torch.tensor([[1.0, 1.0], [0.0, 0.0]], dtype=torch.float64), torch.tensor([1, 0]))
    two = LocalSGD(epochs=2, batch_size=8, lr=1.0)
    program = Program({"model": Model("linear", {"weight": torch.zeros(2, 2)})},
                      [Phase(CrossEntropy(), two, track=LabelLogits(2))],
                      upload=[Tracked(), Tracked(key="with_start", counts_key="with_start_n", start=start)],
                      keep_state=lambda models, kept: ToyClientState(kept.models, int(models.tracked["train"].counts[1])))
    u = run_program(task, client, program)
    torch.testing.assert_close(u.payload["label_logits"], torch.tensor([[0.0, 0.0], [-1.0, 1.0]]))  # (0 - 6) / 6
    assert u.payload["label_counts"].tolist() == [0, 6]
    torch.testing.assert_close(u.payload["with_start"], torch.tensor([[1.0, 1.0], [-1.0, 1.0]]))
    assert u.payload["with_start_n"].tolist() == [1, 6] and u.client_state.rounds == 6  # keep_state saw the stats
    for ex in (Sequential(), Vectorized()):
        got = ex.run(_Fixed(program), task, [(client, {}), (Client(0, task.train.subset(parts[0]), "linear", 1, 0), {})])
        torch.testing.assert_close(got[0].payload["label_logits"], u.payload["label_logits"], atol=1e-6, rtol=0)


class _Fixed:
    """An algorithm whose every client runs the same program (for executors)."""

    def __init__(self, program):
        self.program = program

    def client_program(self, task, downlink, client):
        return self.program


def test_lr_decay_and_gradient_clipping_by_hand():
    # the program of test_one_program_by_hand: one step at lr 1 from W = 0 with gradient
    # G = [[0, 1], [0, -1]] (norm sqrt 2), so the delta is -lr_t * G * min(1, c / sqrt 2)
    from kdfl.algorithms.program import at_round

    task, parts = tiny_task()
    start = {"weight": torch.zeros(2, 2)}
    g = torch.tensor([[0.0, 1.0], [0.0, -1.0]])

    def delta(local: LocalSGD, round_num: int) -> torch.Tensor:
        client = Client(1, task.train.subset(parts[1]), "linear", round_num, seed=0)
        program = Program({"model": Model("linear", start)}, [Phase(CrossEntropy(), local)], upload=[Delta(start)])
        return run_program(task, client, at_round(program, client)).payload["delta.weight"]

    decayed = LocalSGD(epochs=1, batch_size=8, lr=1.0, lr_decay=0.5)
    torch.testing.assert_close(delta(decayed, 1), -g)  # engine round 1 = t 0: lr 1
    torch.testing.assert_close(delta(decayed, 3), -0.25 * g)  # t = 2: lr 0.5^2
    clipped = LocalSGD(epochs=1, batch_size=8, lr=1.0, clip_grad_norm=0.5)
    torch.testing.assert_close(delta(clipped, 1), -g * 0.5 / 2**0.5)
    torch.testing.assert_close(delta(LocalSGD(epochs=1, batch_size=8, lr=1.0, clip_grad_norm=10.0), 1), -g)
    assert decayed.at_round(0) is decayed and ONE_STEP.at_round(5) is ONE_STEP
    with pytest.raises(KdflError, match="lr_decay must be in"):
        LocalSGD(lr_decay=1.5)
    with pytest.raises(KdflError, match="clip_grad_norm >= 0"):
        LocalSGD(clip_grad_norm=-1.0)


def test_lr_decay_and_clipping_under_the_vectorized_executor():
    # the decayed learning rate (one Phase value per round) and the per-client clipping
    # batch, and give the sequential executor's updates
    cfg = config_mod.load(None, ["data.name=digits", "data.num_clients=3", "model.arch=mlp:hidden=16",
                                 "local.epochs=1", "local.batch_size=32", "run.rounds=1", "local.lr=0.1",
                                 "local.lr_decay=0.5", "local.clip_grad_norm=0.5"])
    fed = experiment.build(cfg)
    engine = Engine(fed.algorithm, fed.task, fed.partitions, RunSettings(rounds=1))
    state = fed.algorithm.init(fed.task)
    firsts = []
    for clip in (0.0, 0.5):
        alg = fed.algorithm.__class__(local=LocalSGD(epochs=1, batch_size=32, lr=0.1, lr_decay=0.5,
                                                     clip_grad_norm=clip))
        jobs = [(engine.client(c, 3, None), alg.configure(fed.task, state, engine.client(c, 3, None).info))
                for c in range(3)]
        seq = Sequential().run(alg, fed.task, jobs)
        vec = Vectorized()
        out = vec.run(alg, fed.task, jobs)
        assert vec.batched == 3
        for a, b in zip(seq, out, strict=True):
            for k in a.payload:
                torch.testing.assert_close(a.payload[k], b.payload[k], rtol=1e-4, atol=1e-6)
        firsts.append(seq[0].payload["delta.classifier.weight"])
    assert not torch.allclose(firsts[0], firsts[1])  # the clipping bit
