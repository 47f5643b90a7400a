"""The fast server-side mechanics compute what the plain ones did: cache-sized inference
batches, teachers' logits in one vectorized pass, the distillation loop with its batches
drawn up front and no per-step host sync."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from kdfl import models
from kdfl.algorithms.kit import distill as kd
from kdfl.algorithms.kit.logits import models_logits, same_architecture, stacked_logits
from kdfl.losses import kd_kl
from kdfl.train import eval_batch_size, evaluate, predict
from kdfl.types import TensorData


def _seeded(seed: int, arch: str, shape: tuple[int, ...], classes: int) -> nn.Module:
    torch.manual_seed(seed)
    return models.build(arch, shape, classes)


SHAPES = [((1, 28, 28), "cnn:width=8,hidden=16"), ((1, 40), "cnn"), ((64,), "mlp")]


@pytest.mark.parametrize(("shape", "arch"), SHAPES)
def test_predict_is_the_same_for_every_batch_size(shape: tuple[int, ...], arch: str) -> None:
    torch.manual_seed(0)
    m = models.build(arch, shape, 10)
    x = torch.randn(300, *shape)
    auto = predict(m, x)
    for bs in (8, 13, 64, 296, 299, 2048):  # remainders of 4 and 1 rows join the batch before
        assert torch.equal(predict(m, x, batch_size=bs), auto)
    y = torch.randint(0, 10, (300,))
    assert evaluate(m, TensorData(x, y)) == evaluate(m, TensorData(x, y), batch_size=2048)


def test_eval_batch_size_follows_the_activations() -> None:
    big = models.build("cnn:width=32,hidden=128", (1, 28, 28), 10)  # ~350 KB of activations per sample
    small = models.build("mlp", (64,), 10)  # ~1 KB
    assert eval_batch_size(big, torch.zeros(1, 1, 28, 28)) == 64
    assert eval_batch_size(small, torch.zeros(1, 64)) == 2048
    mid = models.build("cnn", (1, 40), 10)  # ~15 KB per sample -> 8 MiB / 15 KB = 573 -> 512
    assert eval_batch_size(mid, torch.zeros(1, 1, 40)) == 512
    assert mid.training  # the probe leaves the mode alone


@pytest.mark.parametrize(("shape", "arch"), SHAPES)
def test_batched_teacher_logits_equal_the_loop(shape: tuple[int, ...], arch: str) -> None:
    teachers = [_seeded(s, arch, shape, 10) for s in range(3)]
    x = torch.randn(50, *shape)
    loop = torch.stack([predict(m, x) for m in teachers])
    assert not torch.equal(loop[0], loop[1])  # different teachers
    one_pass = kd.teacher_logits(teachers, x, vectorize=True)
    assert one_pass.shape == (3, 50, 10)
    torch.testing.assert_close(one_pass, loop, rtol=1e-5, atol=1e-5)
    assert torch.equal(kd.teacher_logits(teachers, x), loop)  # the CPU default is the loop itself


def test_stacked_logits_from_stacked_weights() -> None:
    ms = [_seeded(s, "mlp", (64,), 10) for s in range(4)]
    stacked = {k: torch.stack([m.state_dict()[k] for m in ms]) for k in ms[0].state_dict()}
    x = torch.randn(9, 64)
    got = stacked_logits(ms[0], stacked, x, batch_size=4)
    torch.testing.assert_close(got, torch.stack([predict(m, x) for m in ms]), rtol=1e-5, atol=1e-6)


def test_mixed_architectures_fall_back_to_the_loop() -> None:
    ms = [models.build("mlp", (64,), 10), models.build("mlp:hidden=32", (64,), 10)]
    assert not same_architecture(ms)
    x = torch.randn(5, 64)
    assert torch.equal(models_logits(ms, x, vectorize=True), torch.stack([predict(m, x) for m in ms]))


def _old_distill_loop(student: nn.Module, n: int, batch_loss, s: kd.DistillSettings,  # type: ignore[no-untyped-def]
                      generator: torch.Generator) -> dict[str, float]:
    """The loop before the change (no early stopping): lazily drawn permutations and a
    host sync per step."""
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=s.lr) if s.optimizer == "adam" else torch.optim.SGD(params, lr=s.lr, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=s.steps) if s.cosine else None
    sums: dict[str, float] = {}
    perm, pos = torch.randperm(n, generator=generator), 0
    for _ in range(s.steps):
        if pos >= n:
            perm, pos = torch.randperm(n, generator=generator), 0
        idx = perm[pos : pos + s.batch_size]
        pos += s.batch_size
        student.train()
        loss, terms = batch_loss(student, idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if s.grad_clip > 0:
            nn.utils.clip_grad_norm_(params, s.grad_clip)
        opt.step()
        if sched is not None:
            sched.step()
        for k, v in {"distill_loss": loss, **terms}.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach())
    return {**{k: v / s.steps for k, v in sums.items()}, "distill_steps": float(s.steps)}


@pytest.mark.parametrize("batch_size", [16, 50, 64])  # 50 rows: uneven last batch, exact fit, one batch
def test_new_distill_loop_equals_the_old_one(batch_size: int) -> None:
    torch.manual_seed(0)
    x, q = torch.randn(50, 64), torch.softmax(torch.randn(50, 10), -1)
    s = kd.DistillSettings(steps=13, batch_size=batch_size, lr=1e-2, cosine=True, temperature=2.0)
    a = _seeded(3, "mlp", (64,), 10)
    b = copy.deepcopy(a)
    seen: list[list[torch.Tensor]] = [[], []]

    def loss_of(k: int):  # type: ignore[no-untyped-def]
        def batch_loss(m: nn.Module, idx: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            seen[k].append(idx.clone())
            loss = kd_kl(m(x[idx]), q[idx], s.temperature, s.t2)
            return loss, {"half": loss / 2}
        return batch_loss

    new = kd.distill_loop(a, 50, loss_of(0), s, torch.Generator().manual_seed(7))
    old = _old_distill_loop(b, 50, loss_of(1), s, torch.Generator().manual_seed(7))
    assert all(torch.equal(i, j) for i, j in zip(seen[0], seen[1], strict=True))
    assert new == old  # the same float64 sums
    for p, r in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
        assert torch.equal(p, r)


def test_batch_schedule_covers_each_permutation() -> None:
    batches = kd.batch_schedule(10, 4, 7, torch.Generator().manual_seed(0))
    assert [len(b) for b in batches] == [4, 4, 2, 4, 4, 2, 4]
    assert sorted(torch.cat(batches[:3]).tolist()) == list(range(10))
    assert sorted(torch.cat(batches[3:6]).tolist()) == list(range(10))


def test_extra_teacher_targets_computed_once_equal_per_step() -> None:
    """distill's extra (EMA) teacher: its probabilities on all rows up front give the
    same training as a forward of the teacher on every batch."""
    torch.manual_seed(0)
    x, q = torch.randn(40, 64), torch.softmax(torch.randn(40, 10), -1)
    s = kd.DistillSettings(steps=6, batch_size=16, lr=1e-2, temperature=3.0)
    teacher = _seeded(5, "mlp", (64,), 10)
    a = _seeded(1, "mlp", (64,), 10)
    b = copy.deepcopy(a)
    kd.distill(a, x, q, s, torch.Generator().manual_seed(2), extra_teacher=(teacher, 0.5))

    def per_step(m: nn.Module, idx: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = m(x[idx])
        teacher.eval()
        with torch.no_grad():
            qe = torch.softmax(teacher(x[idx]) / 3.0, -1)
        return kd_kl(out, q[idx], 3.0, True) + 0.5 * kd_kl(out, qe, 3.0, True), {}

    kd.distill_loop(b, 40, per_step, s, torch.Generator().manual_seed(2))
    for p, r in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-7)
