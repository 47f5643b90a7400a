"""FedGen: data-free knowledge distillation through a server-trained generator of latents.

Zhu, Hong, Zhou. Data-Free Knowledge Distillation for Heterogeneous Federated Learning.
ICML 2021. arXiv:2105.10056. Reference code: github.com/zhuangdizhu/FedGen
(``FLAlgorithms/servers/serverpFedGen.py``, ``FLAlgorithms/users/userpFedGen.py``,
``FLAlgorithms/trainmodel/generator.py``).

The server learns a small conditional generator G(ε, y) of vectors in the classifier's
latent space (the input of its last Linear layer, ``model.head``), trained so that the
selected clients' heads, each weighted by its share of label y, classify G(ε, y) as y. The
clients use it as an inductive bias; the weights are averaged as in FedAvg.

Round t (0-based: the engine's round t + 1), as implemented:
  1. downlink: the global weights (as FedAvg) and, from t = 1 on, the generator's weights
     and BatchNorm buffers (``gen.<name>``) and the labels any client has reported so
     far (``gen_labels`` (C,) bool): all payload tensors, counted in bytes.
  2. client: from the global weights. In round 0 (no generator yet) plain cross-entropy.
     Afterwards, before training, the client draws from its own stream
     (``client.generator(NOISE_STREAM)``) and the downloaded generator in eval mode, for
     every training sample i: a latent z_i = G(ε_i, y_i) of its own label, and a label
     ŷ_i uniform over ``gen_labels`` with its latent ẑ_i = G(ε'_i, ŷ_i); they ride along
     as per-sample targets (``"z"``, ``"z_gen"``, ``"y_gen"``). Local SGD on
     ``CE(f(x), y) + α_t·CE(head(ẑ), ŷ) + β_t·KL(softmax(head(z)).detach() ‖ softmax(f(x)))``
     (batch means), with α_t = max(1e-4, α₀·0.98^t) and β_t likewise.
  3. upload: the weight delta and the label histogram of the client's training data
     (``label_counts`` (C,) int64).
  4. server: trains the generator against the selected clients' freshly trained heads
     (global weights + each delta; eval mode), then averages the deltas weighted by the
     clients' example counts (FedAvg) and applies them. Per generator step: labels y
     uniform over the "qualified" labels (max_k c_k(y) > 1, with c the uploaded counts
     + 1), ε ~ U[0, 1)^noise_dim, z = G(ε, y) (train mode);
     ``Σ_k mean_i w[y_i, k]·CE(head_k(z_i), y_i) + η·exp(−mean_ij d_ε(i, j)·d_z(i, j))``
     with w[y, k] = c_k(y) / Σ_j c_j(y), d_z the mean absolute and d_ε the mean squared
     difference. Adam (lr 3e-4·0.98^t, weight decay 1e-2), 50 steps of 32; all randomness
     from ``kdfl.rng.generator(task.seed, "fedgen", round)``.

What follows the reference code and what is ours:
  - As the reference: the generator (Linear(noise_dim + C → hidden) → BatchNorm1d → ReLU
    → Linear(hidden → feature_dim), one-hot labels, uniform noise; noise_dim 32, hidden
    256 as its MNIST config), the diversity loss (L1 on outputs, L2 on noise, exp of the
    negative mean product, η = 1), the generator optimizer (Adam, lr 3e-4, weight decay
    1e-2, kept across rounds; its learning rate decays ×0.98 per round, the reference's
    ExponentialLR), 50 steps of batch 32, the qualified labels, the +1 count smoothing
    in the weights, the client loss and its weights α₀ = β₀ = 10 (MNIST), their ×0.98
    decay with floor 1e-4, no regulariser in round 0, the KL as ``batchmean`` with a
    detached target, the sample-weighted average of the weights, generator training
    before aggregation.
  - The teacher loss weights every sample by its own label's share (the reference's
    evident intent). The code multiplies a (B,) loss by a (B, 1) weight column, which
    broadcasts to (B, B) and collapses to mean(CE_k)·mean_i w[y_i, k] per user:
    ``reference_weighting = true`` reproduces that.
  - Ours, because a client program is batchable and deterministic: the generated pairs
    are drawn once per round, one own-label latent and one (ŷ, ẑ) pair per private
    sample, before training (the reference draws fresh ones at every step, 32 teacher
    pairs per step; with one pair per sample of a batch of B, B pairs per step: the
    reference's gen_batch_size / batch_size factor is 1 and is left out). With several
    local epochs a sample meets the same latents again.
  - Ours: the uploaded counts are the exact label histogram of the client's training
    data (the reference counts 1 + the labels of the ~20 batches it drew; the server adds
    the 1). The labels the client samples ŷ from are those any client has reported so
    far (``gen_labels``; the reference reads every user's data at start-up:
    ``available_labels``); each was a qualified label of some round's generator training.
  - Ours: BatchNorm buffers of the classifier are averaged with the weights (the
    reference averages parameters only and evaluates with each user's own buffers); the
    generator's buffers travel with it (the reference shares the object, uncounted);
    ``aggregator`` allows robust rules for the deltas. The adversarial student term of
    the generator's loss (β_e = 0 in every reference config) is not implemented.
  - With α₀ = β₀ = 0 the floor is not applied (both weights are 0), nothing is
    generated or sent, and every round is FedAvg's.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdfl import rng, tree
from kdfl.algorithms.kit import weights
from kdfl.algorithms.kit.features import arch_feature_dim
from kdfl.algorithms.kit.label_logits import check_counts
from kdfl.algorithms.program import DELTA, Const, Data, Delta, Model, Phase, Program
from kdfl.losses import MAIN, Batch, CrossEntropy, Outputs
from kdfl.train import LocalSGD
from kdfl.types import (
    Client,
    ClientInfo,
    ClientUpdate,
    KdflError,
    Payload,
    PayloadError,
    RoundMetrics,
    ServerState,
    StateDict,
    Task,
)

GEN = "gen."  # downlink prefix of the generator's weights and buffers
LABELS = "gen_labels"  # downlink: (C,) bool, the labels ŷ is drawn from
COUNTS = "label_counts"  # upload: (C,) int64 label histogram
NOISE_STREAM = 1000  # the client's stream of generated latents (phase 0 draws batches from stream 0)
FLOOR = 1e-4  # the reference's floor of the decayed α_t, β_t
LATENTS = ("pre_activation", "features")


class Generator(nn.Module):
    """G(ε, y): Linear(noise_dim + C → hidden) → BatchNorm1d → ReLU → Linear(hidden → D).

    Args:
        num_classes: C (labels enter one-hot).
        feature_dim: D, the width of the classifier's latent space (``model.feature_dim``).
        noise_dim: width of ε.
        hidden: width of the hidden layer.
    """

    def __init__(self, num_classes: int, feature_dim: int, noise_dim: int = 32, hidden: int = 256) -> None:
        super().__init__()
        self.num_classes, self.noise_dim = num_classes, noise_dim
        self.fc = nn.Linear(noise_dim + num_classes, hidden)
        self.bn = nn.BatchNorm1d(hidden)
        self.out = nn.Linear(hidden, feature_dim)

    def forward(self, eps: Tensor, y: Tensor) -> Tensor:
        """Latents (B, D) of noise ``eps`` (B, noise_dim) and labels ``y`` (B,)."""
        onehot = F.one_hot(y, self.num_classes).to(eps.dtype)
        return self.out(F.relu(self.bn(self.fc(torch.cat([eps, onehot], -1)))))  # type: ignore[no-any-return]


def diversity_loss(eps: Tensor, z: Tensor) -> Tensor:
    """``exp(−mean_ij d_ε(i, j)·d_z(i, j))`` over all pairs (i = j included), with d_z the
    mean absolute difference of the outputs and d_ε the mean squared difference of the
    noise (the reference's ``DiversityLoss('l1')``)."""
    d_z = (z.unsqueeze(1) - z.unsqueeze(0)).abs().mean(-1)
    d_eps = ((eps.unsqueeze(1) - eps.unsqueeze(0)) ** 2).mean(-1)
    return torch.exp(-(d_eps * d_z).mean())


def teacher_loss(head_logits: Sequence[Tensor], y: Tensor, w: Tensor, reference: bool = False) -> Tensor:
    """The generator's teacher loss over K client heads.

    Args:
        head_logits: K tensors (B, C): each head's logits on the generated latents.
        y: (B,) the labels the latents were generated for.
        w: (C, K) label weights w[y, k] = c_k(y) / Σ_j c_j(y).
        reference: the reference code's collapsed weighting, Σ_k mean_i CE_ik · mean_i w[y_i, k];
            otherwise the per-sample weighting Σ_k mean_i w[y_i, k]·CE_ik.
    """
    total = torch.zeros((), device=y.device)
    for k, logits in enumerate(head_logits):
        ce = F.cross_entropy(logits, y, reduction="none")  # (B,)
        wk = w[y, k].to(ce.dtype)
        total = total + (ce.mean() * wk.mean() if reference else (ce * wk).mean())
    return total


def label_weights(counts: Tensor) -> tuple[Tensor, Tensor]:
    """(w, qualified) from the selected clients' uploaded counts (K, C): w (C, K) float32
    = (c + 1) / Σ_k (c + 1) per label (the reference's +1 smoothing), and the qualified
    labels (max_k (c_k + 1) > 1, i.e. some client holds the label) as an index tensor."""
    c = counts.to(torch.float64) + 1.0
    w = (c / c.sum(0, keepdim=True)).T.float()
    return w, torch.nonzero(c.max(0).values > 1).flatten()


@dataclass(frozen=True)
class FedGenLoss:
    """``CE(f(x), y) + α·CE(head(ẑ), ŷ) + β·KL(softmax(head(z)).detach() ‖ softmax(f(x)))``,
    batch means, with the per-sample targets ``z`` (own-label latents), ``z_gen`` and
    ``y_gen`` (generated pairs). The KL is written out (``F.kl_div`` has no vmap rule);
    a term whose weight is 0 is left out."""

    alpha: float
    beta: float
    model: str = MAIN

    def __call__(self, out: Outputs, batch: Batch, consts: Mapping[str, Any]) -> Tensor:
        assert batch.y is not None, "FedGen trains on labelled private data"
        logits = out.logits(self.model)
        loss = F.cross_entropy(logits, batch.y)
        if self.alpha:
            gen_logits = out.head(self.model, batch.targets["z_gen"])
            loss = loss + self.alpha * F.cross_entropy(gen_logits, batch.targets["y_gen"])
        if self.beta:
            log_q = F.log_softmax(out.head(self.model, batch.targets["z"]).detach(), -1)
            kl = (log_q.exp() * (log_q - F.log_softmax(logits, -1))).sum(-1).mean()
            loss = loss + self.beta * kl
        return loss


@dataclass(frozen=True)
class FedGenState(ServerState):
    """The global weights (``params``), the generator's weights and buffers, its Adam
    state (``torch.optim.Adam.state_dict()``; None before its first step) and the labels
    any client has reported so far ((C,) bool; None before the first round)."""

    generator: StateDict = field(default_factory=dict)
    gen_opt: dict[str, Any] | None = None
    labels: Tensor | None = None


@dataclass(frozen=True)
class FedGen:
    """FedGen (Zhu et al., ICML 2021); see the module docstring.

    Args:
        local: local-training settings.
        alpha: α₀, the client's weight of the CE of its head on generated latents
            (``generative_alpha``, 10).
        beta: β₀, the client's weight of the KL towards its head on its labels' latents
            (``generative_beta``, 10 on MNIST and CelebA, 1 on EMNIST). The reference's
            α₀ = β₀ = 10 go with its local SGD at lr 0.01 without momentum; with larger
            steps scale them down (α₀·lr ≈ 0.1: α₀ = β₀ = 1 at lr 0.1), or local training
            diverges.
        decay: α_t = max(1e-4, α₀·decay^t), β_t likewise (0.98).
        noise_dim: width of the generator's noise ε (32).
        hidden: hidden width of the generator (256).
        gen_steps: generator Adam steps per round (50).
        gen_batch_size: generated samples per generator step (32).
        gen_lr: the generator's learning rate (3e-4 on MNIST), ×``gen_lr_decay`` per round.
        gen_lr_decay: ExponentialLR γ of the generator (0.98).
        gen_weight_decay: Adam weight decay of the generator (1e-2).
        diversity: η, the weight of the diversity loss (1).
        reference_weighting: the reference code's collapsed per-user weight of the teacher
            loss instead of the per-sample label weights.
        latent: where the generator's outputs live. "pre_activation" (default): the signed
            output of the model's last hidden Linear, before the ReLU that makes the
            features, as the reference's latent is its ``encode_fc1`` output (a Linear's,
            signed); the heads see it through that ReLU (``head(relu(G(ε, y)))``, as the
            layer's real outputs reach the head). Needs a model whose features are
            non-negative (mlp, cnn, vgg9, the resnets). "features": the generator's
            outputs go straight into the head (the earlier behaviour: signed vectors in a
            space whose real points are all non-negative).
        aggregator: rule for the deltas, as FedAvg's ("mean" = the reference).
    """

    local: LocalSGD = field(default_factory=LocalSGD)
    alpha: float = 10.0
    beta: float = 10.0
    decay: float = 0.98
    noise_dim: int = 32
    hidden: int = 256
    gen_steps: int = 50
    gen_batch_size: int = 32
    gen_lr: float = 3e-4
    gen_lr_decay: float = 0.98
    gen_weight_decay: float = 1e-2
    diversity: float = 1.0
    reference_weighting: bool = False
    latent: str = "pre_activation"
    aggregator: str = "mean"

    def __post_init__(self) -> None:
        if not (self.alpha >= 0 and self.beta >= 0 and self.diversity >= 0 and self.gen_weight_decay >= 0):
            raise KdflError(f"fedgen: alpha, beta, diversity and gen_weight_decay must be >= 0, got alpha={self.alpha}, "
                            f"beta={self.beta}, diversity={self.diversity}, gen_weight_decay={self.gen_weight_decay}")
        if not (0 < self.decay <= 1 and 0 < self.gen_lr_decay <= 1):
            raise KdflError(f"fedgen: decay and gen_lr_decay must be in (0, 1], got decay={self.decay}, "
                            f"gen_lr_decay={self.gen_lr_decay}")
        if self.noise_dim < 1 or self.hidden < 1 or self.gen_steps < 0 or self.gen_batch_size < 2 or self.gen_lr <= 0:
            raise KdflError("fedgen: noise_dim >= 1, hidden >= 1, gen_steps >= 0, gen_batch_size >= 2 (BatchNorm) and "
                            f"gen_lr > 0 are required (got noise_dim={self.noise_dim}, hidden={self.hidden}, "
                            f"gen_steps={self.gen_steps}, gen_batch_size={self.gen_batch_size}, gen_lr={self.gen_lr})")
        if self.latent not in LATENTS:
            raise KdflError(f"fedgen: latent must be one of {LATENTS}, got {self.latent!r}")
        weights.check_aggregator(self.aggregator)

    def to_head(self, z: Tensor) -> Tensor:
        """The generator's outputs as the head's inputs (see ``latent``)."""
        return F.relu(z) if self.latent == "pre_activation" else z

    @property
    def uses_generator(self) -> bool:
        """False when α₀ = β₀ = 0: the clients never use a generator (FedAvg)."""
        return bool(self.alpha or self.beta)

    def weights_at(self, t: int) -> tuple[float, float]:
        """(α_t, β_t) of round t (0-based): max(1e-4, w₀·decay^t), or 0 where w₀ = 0."""
        alpha, beta = (max(FLOOR, w * self.decay**t) if w else 0.0 for w in (self.alpha, self.beta))
        return alpha, beta

    def new_generator(self, task: Task, dim: int) -> Generator:
        return Generator(task.num_classes, dim, self.noise_dim, self.hidden)

    @functools.cached_property
    def _ce_phase(self) -> Phase:  # round 0: one Phase object for every client
        return Phase(CrossEntropy(), self.local)

    # -- server: init and downlink ----------------------------------------------------
    def init(self, task: Task) -> FedGenState:
        weights.require_homogeneous("FedGen", task)
        dim = arch_feature_dim(task, task.server_arch, "fedgen (latents for the classifier head)")
        if self.latent == "pre_activation" and self.uses_generator:
            self._check_nonnegative_features(task)
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(rng.derive(task.seed, "fedgen-init"))
            gen = self.new_generator(task, dim)
        return FedGenState(weights.init_params(task), 0, tree.state_of(gen))

    @staticmethod
    def _check_nonnegative_features(task: Task) -> None:
        model = task.borrow_model(task.server_arch)
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                x = torch.randn(16, *task.input_shape, device=next(model.parameters()).device)
                z = model.features(x)  # type: ignore[operator]
        finally:
            task.return_model(task.server_arch, model)
        if bool((z < 0).any()):
            raise KdflError(f"fedgen: latent = 'pre_activation' passes generated latents through a ReLU, but the "
                            f"features of {task.server_arch!r} can be negative (no ReLU before its head); set "
                            "algorithm.latent = 'features'")

    def configure(self, task: Task, state: ServerState, client: ClientInfo) -> Payload:
        assert isinstance(state, FedGenState)
        down = dict(state.params)
        if self.uses_generator and state.round >= 1 and state.labels is not None:
            down.update({GEN + k: v for k, v in state.generator.items()})
            down[LABELS] = state.labels
        return down

    # -- client -----------------------------------------------------------------------
    @staticmethod
    def split(downlink: Payload) -> tuple[StateDict, StateDict, Tensor | None]:
        """(global weights, generator state, labels) of a downlink."""
        params = {k: v for k, v in downlink.items() if not k.startswith(GEN) and k != LABELS}
        gen = {k[len(GEN):]: v for k, v in downlink.items() if k.startswith(GEN)}
        return params, gen, downlink.get(LABELS)

    def client_model(self, task: Task, downlink: Payload, client: Client) -> Model:
        """The global model (evaluation)."""
        return Model(client.arch, self.split(downlink)[0])

    def generated(self, task: Task, gen_state: StateDict, labels: Tensor, client: Client) -> dict[str, Tensor]:
        """The per-sample targets of the client's data: ``z`` (n, D) latents of the
        samples' own labels, ``y_gen`` (n,) labels uniform over ``labels`` and ``z_gen``
        (n, D) their latents; the generator in eval mode, noise from the client's stream."""
        dim = gen_state["out.weight"].shape[0]
        gen = self.new_generator(task, dim)
        gen.load_state_dict(gen_state)
        gen.eval()
        g = client.generator(NOISE_STREAM)
        y = client.data.y
        n = len(y)
        avail = torch.nonzero(labels.cpu()).flatten()  # targets are drawn on the host, beside the data
        if len(avail) == 0:
            raise KdflError("fedgen: the downlink's gen_labels names no label")
        with torch.no_grad():  # the head's inputs (``to_head``): the generator is frozen here
            z = self.to_head(gen(torch.rand(n, self.noise_dim, generator=g), y))
            y_gen = avail[torch.randint(len(avail), (n,), generator=g)]
            z_gen = self.to_head(gen(torch.rand(n, self.noise_dim, generator=g), y_gen))
        return {"z": z, "z_gen": z_gen, "y_gen": y_gen}

    def client_program(self, task: Task, downlink: Payload, client: Client) -> Program:
        params, gen_state, labels = self.split(downlink)
        counts = torch.bincount(client.data.y, minlength=task.num_classes).to(torch.int64)
        alpha, beta = self.weights_at(client.round - 1)
        if gen_state and labels is not None and (alpha or beta):
            data = Data(client.data.x, client.data.y, self.generated(task, gen_state, labels, client))
            phase = Phase(FedGenLoss(alpha, beta), self.local, data=data)
        else:
            phase = self._ce_phase
        return Program(models={MAIN: Model(client.arch, params)}, phases=(phase,),
                       upload=(Delta(params), Const({COUNTS: counts})))

    # -- server: validate and update --------------------------------------------------
    def validate(self, task: Task, state: ServerState, update: ClientUpdate) -> None:
        weights.check_delta(update, state.params)
        c, p = task.num_classes, update.payload
        extra = sorted(k for k in p if not k.startswith(DELTA) and k != COUNTS)
        if extra:
            raise PayloadError(f"unexpected payload entries {extra[:3]} (expected the deltas and {COUNTS!r})")
        check_counts(p, COUNTS, c)

    def train_generator(self, task: Task, state: FedGenState, updates: Sequence[ClientUpdate]
                        ) -> tuple[StateDict, dict[str, Any] | None, RoundMetrics]:
        """The server's generator step against the updates' heads; returns the new
        generator state, Adam state and metrics (``generator_loss`` and its terms)."""
        counts = torch.stack([u.payload[COUNTS].to(torch.int64) for u in updates])  # (K, C)
        w, qualified = label_weights(counts)
        if self.gen_steps == 0 or len(qualified) == 0:
            return state.generator, state.gen_opt, {}
        dev = task.device
        w = w.to(dev)
        g = rng.generator(task.seed, "fedgen", state.round + 1)
        gen = self.new_generator(task, state.generator["out.weight"].shape[0]).to(dev)
        gen.load_state_dict(state.generator)
        opt = torch.optim.Adam(gen.parameters(), lr=self.gen_lr, betas=(0.9, 0.999),
                               weight_decay=self.gen_weight_decay)
        if state.gen_opt is not None:
            opt.load_state_dict(state.gen_opt)
        for group in opt.param_groups:
            group["lr"] = self.gen_lr * self.gen_lr_decay**state.round
        arch = task.server_arch
        heads: list[nn.Module] = []
        try:
            for delta in weights.deltas_of(updates):
                model = task.borrow_model(arch)
                heads.append(model)
                model.load_state_dict(weights.apply_delta(state.params, delta))
                model.eval()
                model.requires_grad_(False)
            # float64 sums on the device: no host sync per step (the same sums as Python floats)
            sums = {k: torch.zeros((), dtype=torch.float64, device=dev)
                    for k in ("generator_loss", "generator_teacher_loss", "generator_diversity_loss")}
            gen.train()
            for _ in range(self.gen_steps):
                y = qualified[torch.randint(len(qualified), (self.gen_batch_size,), generator=g)]
                eps = torch.rand(self.gen_batch_size, self.noise_dim, generator=g)
                y, eps = y.to(dev), eps.to(dev)
                z = gen(eps, y)
                h = self.to_head(z)
                teach = teacher_loss([m.head(h) for m in heads], y, w, self.reference_weighting)  # type: ignore[operator]
                div = diversity_loss(eps, z)
                loss = teach + self.diversity * div
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                for key, v in (("generator_loss", loss), ("generator_teacher_loss", teach),
                               ("generator_diversity_loss", div)):
                    sums[key] += v.detach().double()
        finally:
            for model in heads:
                model.requires_grad_(True)
                task.return_model(arch, model)
        metrics = {k: float(v) / self.gen_steps for k, v in sums.items()}
        if not math.isfinite(metrics["generator_loss"]):
            raise KdflError(f"fedgen: the generator's training diverged (loss {metrics['generator_loss']}): "
                            "lower algorithm.gen_lr")
        return {k: v.detach().cpu().clone() for k, v in gen.state_dict().items()}, opt.state_dict(), metrics

    def server_update(self, task: Task, state: FedGenState,  # type: ignore[override]
                      updates: Sequence[ClientUpdate]) -> tuple[FedGenState, RoundMetrics]:
        metrics: RoundMetrics = {}
        generator, gen_opt, labels = state.generator, state.gen_opt, state.labels
        if updates and self.uses_generator:
            generator, gen_opt, metrics = self.train_generator(task, state, updates)
            seen = torch.stack([u.payload[COUNTS] > 0 for u in updates]).any(0)
            labels = seen if labels is None else labels | seen
        params = state.params
        if updates:
            params = weights.apply_delta(params, weights.aggregate_deltas(updates, self.aggregator))
        return FedGenState(params, state.round + 1, generator, gen_opt, labels), metrics
