"""FedAD: ensemble attention distillation on unlabeled public data.

Gong, Sharma, Karanam, Wu, Chen, Doermann, Innanje. Ensemble Attention Distillation for
Privacy-Preserving Federated Learning. ICCV 2021, pp. 15076-15086.

Local models (of any convolutional architecture) are distilled one way into a central
model on public, unlabeled data, from both their predictions and their attention: a
class-count-weighted ensemble of the logits, and per class the intersection (consensus)
and the union (diversity) of the clients' Grad-CAM attention maps.

Round t, as implemented:
  1. downlink: the indices of the round's public subset (``public_size`` rows of
     ``task.proxy``, drawn from (run seed, t)); no weights ever go down.
  2. client: its own model, kept across rounds (a fresh per-client initialisation at its
     first participation), trains with cross-entropy on its private data (``[local]``;
     with ``one_shot`` only at its first participation, as in the paper); then, in eval
     mode, on the public subset: logits Z_k (n, C), Grad-CAM maps of all C classes on
     its last spatial stage, ``A_k^c = ReLU(Σ_j α_j^c F_j)`` with α_j^c the spatial mean
     of ∂z_c/∂F_j, average-pooled to at most ``attention_size`` per spatial side and
     divided by their spatial maximum (values in [0, 1]), and its label counts (C,).
  3. server: ensemble logits ẑ = class-count-weighted ``aggregator`` of the Z_k (column c
     of client k weighs its share of class c; ``kit.logits.aggregate_logits``); every map
     resized to the student's last-stage resolution and renormalised; I^c = min_k A_k^c,
     U^c = max_k A_k^c.
  4. distil the student (the server model, initialised from last round's) on the public
     subset: ``L = L_logit + λ_inter L_inter + λ_union L_union`` with the student's own
     differentiable Grad-CAM maps Ã (``kit.attention``); L_logit = T²·KL(softmax(ẑ/T) ‖
     softmax(z/T)) (T = 3) or the mean absolute logit difference (``logit_loss = "l1"``).
  5. ``state.params`` = the student (evaluated by the round driver).

What follows the paper / its public derivatives: the class-count-weighted logit ensemble,
intersection = min and union = max of the class maps, both losses with the soft threshold
T(A; ρ, b) = sigmoid(ρ(A − b)) and ρ1 = ρ2 = 10, b1 = 0.6, b2 = 0.3, and the KL (T = 3) or
L1 logit loss (as quoted in the FedMHAD code that derives from FedAD; research notes §9).
Our reconstruction choices: the multi-round use (the paper's clients train once and the
server distils offline; ``one_shot`` gives clients that train once, the server still
distils every round on a fresh public subset), Grad-CAM on the last stage for all classes
(no top-m selection), normalisation by the spatial maximum (not min-max: the ReLU already
sets the floor at 0), the resizing (clients pool to at most ``attention_size`` per side,
the server resizes to the student's resolution by average pooling or linear
interpolation, then renormalises), the ensemble over all clients accepted in the round
(FedMHAD samples a γ-fraction of the local models per distillation step; here the round's
sampling, ``run.clients_per_round``, plays that part), λ_inter = λ_union = 1, the server
loop (Adam, 100 steps of 64 rows per round), ``public_size`` = 256 and the optional robust
logit rule.

On digits and mnist1d (4 clients, Dirichlet 1.0 and 0.1, 8 rounds) λ = 1, 0.3, 0.1 and
0 (logits only) ended within 2 points of each other; λ = 1 started slower on digits.

Robustness: the logit ensemble accepts "median" and "trimmed_mean" (class-weighted).
The attention intersection and union are a minimum and a maximum over clients, so one
client alone can empty the intersection or fill the union; uploads with maps outside
[0, 1] are rejected whole (so are upload attacks that push them out of range), but
in-range malicious maps are not detected.

Executors: the training phase is plain cross-entropy (batched by ``vectorized``); the
maps are a ``Custom`` upload computed per client on its trained model. Each map is divided
by its own peak, which magnifies the ~1e-7 float drift of batched training: maps agree
with the sequential executor to a few 1e-6 (up to ~1e-5 for maps whose peak is far
below the others'), logits to ~1e-7.

Bytes per client and round at the defaults (float32, no codec, n = 256 rows, C = 10,
measured on the wire encoding): logits 10,240 B + maps n·C·S·4 B + label counts 80 B +
headers: mnist1d ``cnn`` (maps 10 -> 8 long) 92,312 B; digits ``cnn`` (2x2 maps)
51,356 B. Downlink: the 256 int64 row indices, 2,075 B.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdfl import tree
from kdfl.algorithms.kit import attention as att
from kdfl.algorithms.kit import logits as logit_kit
from kdfl.algorithms.kit.distill import DistillSettings, distill_loop
from kdfl.algorithms.program import Const, Custom, Logits, Model, Phase, Program, Upload, fresh_weights
from kdfl.losses import MAIN, CrossEntropy, kd_kl
from kdfl.rng import generator
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
    Task,
    TensorData,
)

RANGE_TOL = 1e-4  # attention values may leave [0, 1] by this much (lossy codecs) before rejection
LOGIT_LOSSES = ("kl", "l1")


def fedad_distill() -> DistillSettings:
    """The server loop per round: 100 Adam steps at 1e-3 on batches of 64 public rows,
    no cosine schedule, T = 3 with T², gradient clip 5."""
    return DistillSettings(steps=100, batch_size=64, lr=1e-3, optimizer="adam", cosine=False, temperature=3.0,
                           t2=True, grad_clip=5.0)


@dataclass(frozen=True, eq=False)
class AttentionUpload:
    """The client's Custom upload: ``{"logits": (n, C), "attention": (n, C, *spatial)}``
    from one forward pass per chunk of ``x``, in eval mode (a picklable callable)."""

    x: Tensor
    attention_size: int
    chunk: int = 256

    def __call__(self, models: Mapping[str, nn.Module]) -> Payload:
        model = models[MAIN]
        model.eval()
        device = next(model.parameters()).device
        zs, maps = [], []
        for s in range(0, len(self.x), self.chunk):
            z, cam = att.grad_cam(model, self.x[s : s + self.chunk].to(device))
            cam = att.resize(cam, att.capped_size(cam.shape[2:], self.attention_size))
            zs.append(z.float().cpu())
            maps.append(att.normalise(cam).float().cpu())
        return {"logits": torch.cat(zs), "attention": torch.cat(maps)}


@dataclass(frozen=True)
class FedAD:
    """FedAD, ensemble attention distillation (see the module docstring).

    Args:
        local: client local-training settings (plain cross-entropy on private data).
        distill: the server's distillation loop (``[algorithm.distill]``): steps, batch
            size, lr, optimizer, cosine schedule, T, T², gradient clip, early stopping
            (``patience`` > 0 needs ``data.val_size`` > 0).
        public_size: public (proxy) rows per round, drawn from (run seed, round); the
            whole proxy when it has fewer.
        attention_size: clients average-pool their maps to at most this many values per
            spatial side (payload: n·C·S floats, S <= attention_size^d).
        lambda_inter: λ_inter, weight of the intersection loss (0 with λ_union = 0: no
            attention at all, logits only, any architecture).
        lambda_union: λ_union, weight of the union loss.
        rho_inter, b_inter: ρ1, b1 of the soft threshold on the student's maps.
        rho_union, b_union: ρ2, b2 of the soft threshold on the union.
        logit_loss: "kl" (T²·KL at ``distill.temperature``) or "l1" (mean |z - ẑ|).
        aggregator: the logit ensemble rule, class-count weighted: "mean" (FedAD),
            "median" or "trimmed_mean[:beta=...]" (robust to Byzantine logits).
        one_shot: clients train only at their first participation (the paper's one-shot
            setting); later they upload from their kept model.
    """

    local: LocalSGD = field(default_factory=LocalSGD)
    distill: DistillSettings = field(default_factory=fedad_distill)
    public_size: int = 256
    attention_size: int = 8
    lambda_inter: float = 1.0
    lambda_union: float = 1.0
    rho_inter: float = 10.0
    b_inter: float = 0.6
    rho_union: float = 10.0
    b_union: float = 0.3
    logit_loss: str = "kl"
    aggregator: str = "mean"
    one_shot: bool = False

    conformance_overrides = ("model.arch=cnn:width=4,hidden=16",)
    conformance_unsupported = ("mlp",)  # no spatial activations: init raises a KdflError naming it

    def __post_init__(self) -> None:
        if self.public_size < 1 or self.attention_size < 1:
            raise KdflError(f"algorithm.public_size and algorithm.attention_size must be >= 1; got "
                            f"public_size={self.public_size}, attention_size={self.attention_size}")
        if min(self.lambda_inter, self.lambda_union, self.rho_inter, self.rho_union) < 0:
            raise KdflError("algorithm.lambda_inter, lambda_union, rho_inter and rho_union must be >= 0")
        if not (0 <= self.b_inter <= 1 and 0 <= self.b_union <= 1):
            raise KdflError(f"algorithm.b_inter and b_union are thresholds on maps in [0, 1]; got "
                            f"b_inter={self.b_inter}, b_union={self.b_union}")
        if self.logit_loss not in LOGIT_LOSSES:
            raise KdflError(f"algorithm.logit_loss must be one of {', '.join(LOGIT_LOSSES)}; got {self.logit_loss!r}")
        logit_kit.check_rule(self.aggregator, class_weighting=True)

    @property
    def attention(self) -> bool:
        """Whether clients upload attention maps (some attention term has weight > 0)."""
        return self.lambda_inter > 0 or self.lambda_union > 0

    # -- server: init and downlink --------------------------------------------------
    def init(self, task: Task) -> ServerState:
        if task.proxy is None or len(task.proxy) == 0:
            raise KdflError("FedAD distils on unlabeled public data: set data.proxy ('holdout', 'noise' or "
                            "'dataset:NAME') and data.proxy_size > 0")
        if self.distill.patience > 0 and task.val is None:
            raise KdflError("algorithm.distill.patience needs a labeled validation slice: set data.val_size > 0")
        server = task.new_model(task.server_arch)
        if self.attention:
            att.require_activations(server, task.server_arch, "server (model.arch)")
            for arch in sorted(set(task.client_archs) - {task.server_arch}):
                att.require_activations(task.new_model(arch), arch, "client (model.client_archs)")
            if len(task.input_shape) not in (2, 3):
                raise KdflError(f"FedAD's attention maps need 1-D (C, L) or 2-D (C, H, W) inputs; got input "
                                f"shape {task.input_shape}")
        return ServerState(tree.state_of(server))

    def public_indices(self, task: Task, round_num: int) -> Tensor:
        """The sorted proxy rows of ``round_num`` (all rows when the proxy is small)."""
        return logit_kit.public_rows(task, self.public_size, "fedad-public", round_num)

    def configure(self, task: Task, state: ServerState, client: ClientInfo) -> Payload:
        return {"public_idx": self.public_indices(task, state.round + 1)}

    # -- client ---------------------------------------------------------------------
    @functools.cached_property
    def _phase(self) -> Phase:  # one Phase object for every client (executors group by it)
        return Phase(CrossEntropy(), self.local)

    def client_program(self, task: Task, downlink: Payload, client: Client) -> Program:
        """Train the client's own model on its data (with ``one_shot``: only the first
        time), then upload logits, attention maps and label counts on the public rows."""
        assert task.proxy is not None
        kept = client.kept(MAIN)
        weights = kept if kept is not None else fresh_weights(task, client.id, client.arch)
        x = task.proxy[downlink["public_idx"].cpu()]  # the proxy lives on the host
        upload: list[Upload] = [Custom(AttentionUpload(x, self.attention_size)) if self.attention else Logits(x)]
        upload.append(Const({"label_counts": torch.bincount(client.data.y, minlength=task.num_classes)}))
        phases = [] if self.one_shot and kept is not None else [self._phase]
        return Program(models={MAIN: Model(client.arch, weights)}, phases=phases, upload=upload, keep=(MAIN,))

    # -- server: validate and update -------------------------------------------------
    def validate(self, task: Task, state: ServerState, update: ClientUpdate) -> None:
        p = update.payload
        n, c = len(self.public_indices(task, state.round + 1)), task.num_classes
        z = p.get("logits")
        if z is None:
            raise PayloadError("FedAD payload has no 'logits' entry")
        if tuple(z.shape) != (n, c) or not z.is_floating_point():
            raise PayloadError(f"logits are {tuple(z.shape)} {z.dtype}, expected ({n}, {c}) float")
        if self.attention:
            a = p.get("attention")
            if a is None:
                raise PayloadError("FedAD payload has no 'attention' entry (Grad-CAM maps)")
            d = len(task.input_shape) - 1
            spatial = tuple(a.shape[2:])
            if (not a.is_floating_point() or a.dim() != 2 + d or tuple(a.shape[:2]) != (n, c)
                    or not all(1 <= s <= self.attention_size for s in spatial)):
                raise PayloadError(f"attention maps are {tuple(a.shape)} {a.dtype}, expected ({n}, {c}) followed "
                                   f"by {d} spatial side(s) in 1..{self.attention_size}, float")
            if not torch.isfinite(a).all():
                raise PayloadError("attention maps hold NaN or infinite values")
            lo, hi = float(a.min()), float(a.max())
            if lo < -RANGE_TOL or hi > 1 + RANGE_TOL:
                raise PayloadError(f"attention maps must lie in [0, 1] (normalised Grad-CAM); got values in "
                                   f"[{lo:.4g}, {hi:.4g}]")
        counts = p.get("label_counts")
        if (counts is None or tuple(counts.shape) != (c,) or counts.is_floating_point() or counts.dtype == torch.bool
                or (counts < 0).any()):
            raise PayloadError(f"label_counts must be ({c},) non-negative integers")
        if int(counts.sum()) != update.num_examples:
            raise PayloadError(f"label_counts sum to {int(counts.sum())} but the client reports "
                               f"{update.num_examples} examples")

    def ensemble(self, updates: Sequence[ClientUpdate]) -> Tensor:
        """The class-count-weighted ensemble logits ẑ (n, C) with ``aggregator``."""
        z = torch.stack([u.payload["logits"].float() for u in updates])  # (K, n, C)
        counts = torch.stack([u.payload["label_counts"] for u in updates])  # (K, C)
        w = torch.tensor([float(u.num_examples) for u in updates])
        return logit_kit.aggregate_logits(z, self.aggregator, w, counts)

    @staticmethod
    def attention_targets(updates: Sequence[ClientUpdate], size: Sequence[int]) -> tuple[Tensor, Tensor]:
        """Intersection and union (n, C, *size) of the clients' maps, each resized to
        ``size`` and renormalised (running min / max: no (K, n, C, *size) stack)."""
        inter = union = None
        for u in updates:
            a = att.normalise(att.resize(u.payload["attention"].float().clamp(0.0, 1.0), size))
            inter = a if inter is None else torch.minimum(inter, a)
            union = a if union is None else torch.maximum(union, a)
        assert inter is not None and union is not None
        return inter, union

    def server_update(self, task: Task, state: ServerState,
                      updates: Sequence[ClientUpdate]) -> tuple[ServerState, RoundMetrics]:
        assert task.proxy is not None
        t = state.round + 1
        x = task.proxy[self.public_indices(task, t)]
        ens = self.ensemble(updates)
        student = task.new_model(task.server_arch)
        student.load_state_dict(state.params)
        inter = union = None
        metrics: dict[str, float] = {}
        if self.attention:
            student.eval()
            with torch.no_grad():
                size = tuple(student(x[:1].to(task.device), activations=True)["activations"][-1].shape[2:])
            inter, union = self.attention_targets(updates, size)
            metrics.update(intersection_mean=float(inter.mean()), union_mean=float(union.mean()))
        stats = self.distil(student, x, ens, inter, union, generator(task.seed, "fedad-distill", t), task.val)
        q = torch.softmax(ens / self.distill.temperature, -1)
        metrics.update(stats, teacher_confidence=float(q.max(-1).values.mean()))
        return ServerState(tree.state_of(student), t), metrics

    # -- server: the distillation loop ---------------------------------------------------
    def loss(self, student: nn.Module, x: Tensor, target: Tensor, inter: Tensor | None,
             union: Tensor | None) -> tuple[Tensor, dict[str, Tensor]]:
        """The student's loss on one batch and its terms.

        Args:
            student: the server model (its mode is the caller's).
            x: (B, *input_shape) public rows.
            target: (B, C) ensemble logits ẑ.
            inter, union: (B, C, *spatial) at the student's resolution (None: no attention).
        """
        if inter is not None and union is not None:
            z, cam = att.grad_cam(student, x, create_graph=True)
            a = att.normalise(cam)
        else:
            z, a = student(x), None
        if self.logit_loss == "kl":
            t = self.distill.temperature
            logit = kd_kl(z, torch.softmax(target / t, -1), t, self.distill.t2)
        else:
            logit = F.l1_loss(z, target)
        terms = {"logit_loss": logit}
        total = logit
        if a is not None:
            assert inter is not None and union is not None
            li = att.inter_loss(a, inter, self.rho_inter, self.b_inter)
            lu = att.union_loss(a, union, self.rho_union, self.b_union)
            terms.update(inter_loss=li, union_loss=lu)
            total = total + self.lambda_inter * li + self.lambda_union * lu
        return total, terms

    def distil(self, student: nn.Module, x: Tensor, target: Tensor, inter: Tensor | None, union: Tensor | None,
               gen: torch.Generator, val: TensorData | None = None) -> dict[str, float]:
        """Train ``student`` in place (train mode) with :meth:`loss` over ``distill``'s
        schedule through ``kit.distill.distill_loop`` (the loop ``distill`` runs for a plain
        KD loss). Returns the mean loss, its mean terms and the steps run."""
        def batch_loss(model: nn.Module, idx: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
            device = next(model.parameters()).device
            return self.loss(
                model, x[idx].to(device), target[idx].to(device),
                None if inter is None else inter[idx].to(device), None if union is None else union[idx].to(device))

        return distill_loop(student, len(x), batch_loss, self.distill, gen, val)
