"""Class attention maps (Grad-CAM) and the attention-distillation losses of FedAD.

Grad-CAM (Selvaraju et al., ICCV 2017) on the last spatial stage of a model of the zoo
(the last map of ``model(x, activations=True)``, the one pooled or flattened into the
features): for class c and channel k, ``α_k^c`` is the spatial mean of ``∂z_c/∂F_k``, and
the class map is ``A^c = ReLU(Σ_k α_k^c F_k)``, shape (B, C, *spatial) for all C classes.
:func:`normalise` divides each map by its spatial maximum (so its peak is 1; a map that
ReLU made all zero stays zero; values stay in [0, 1]); :func:`resize` brings maps of
different architectures to one spatial size (adaptive average pooling to shrink, linear /
bilinear interpolation to grow; both are convex combinations, so [0, 1] is kept).

The ensemble of maps (Gong et al., ICCV 2021, eqs. 7-9): per class, the intersection
``I^c = min_k A_k^c`` (where all clients agree) and the union ``U^c = max_k A_k^c`` (what
any client attends to), with the soft threshold ``T(A; ρ, b) = sigmoid(ρ (A - b))``:

- ``L_inter = -(1/C) Σ_c Σ_s I^c T(Ã^c; ρ1, b1) / Σ_s I^c``: the student's map must be high
  (above b1) where every client attends;
- ``L_union = -(1/C) Σ_c Σ_s Ã^c T(U^c; ρ2, b2) / Σ_s Ã^c``: the student's attention mass
  must lie inside the region some client attends to (above b2).

Both are averaged over the samples of the batch; a class whose denominator is zero
contributes 0. A min or a max over clients is, by nature, moved by one client alone: a
single Byzantine client can empty the intersection (all-zero maps) or fill the union
(all-one maps); only the logit ensemble has robust rules.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdfl.models.base import SPATIAL_MODELS
from kdfl.types import KdflError

NORM_EPS = 1e-6  # a map whose maximum is below this is divided by it instead (not scaled up to 1)
DEN_EPS = 1e-8  # denominators of the attention losses


def spatial_dims(maps: Tensor) -> tuple[int, ...]:
    """The spatial dimensions of (B, C, *spatial) maps."""
    return tuple(range(2, maps.dim()))


def require_activations(model: nn.Module, arch: str, role: str) -> None:
    """Raise a KdflError naming ``arch`` unless ``model`` has spatial activations."""
    if not getattr(model, "has_activations", False) or not hasattr(model, "activations"):
        raise KdflError(
            f"FedAD computes Grad-CAM attention maps on spatial activations, but the {role} architecture "
            f"{arch!r} has none; use a convolutional model ({', '.join(SPATIAL_MODELS)}) for model.arch and "
            "every entry of model.client_archs, or turn the attention terms off (algorithm.lambda_inter = 0 "
            "and algorithm.lambda_union = 0)")


def grad_cam(model: nn.Module, x: Tensor, create_graph: bool = False) -> tuple[Tensor, Tensor]:
    """Logits and raw (unnormalised) Grad-CAM maps of every class, from one forward pass.

    Args:
        model: a model of the zoo with spatial activations, in the mode the caller chose.
        x: (B, *input_shape) inputs.
        create_graph: keep the maps differentiable with respect to the parameters (the
            server's student); False for uploads.

    Returns:
        ``(logits (B, C), maps (B, C, *spatial))``; maps are ``ReLU(Σ_k α_k^c F_k)``.
        With ``create_graph=False`` both are detached.
    """
    with torch.enable_grad():
        out = model(x, activations=True)
        z, f = out["logits"], out["activations"][-1]  # (B, C), (B, K, *spatial)
        dims = spatial_dims(f)
        alphas = []
        for c in range(z.shape[1]):  # ∂(Σ_b z_bc)/∂F = per-sample ∂z_bc/∂F_b (the head is per sample)
            (g,) = torch.autograd.grad(z[:, c].sum(), f, retain_graph=True, create_graph=create_graph)
            alphas.append(g.mean(dim=dims))  # (B, K)
        alpha = torch.stack(alphas, 1)  # (B, C, K)
        maps = torch.relu(torch.einsum("bck,bk...->bc...", alpha, f))
    if not create_graph:
        return z.detach(), maps.detach()
    return z, maps


def normalise(maps: Tensor) -> Tensor:
    """Each (B, C) map divided by its spatial maximum (floored at ``NORM_EPS``): values in
    [0, 1], peak 1 unless the map is (almost) zero. Differentiable."""
    peak = maps.amax(dim=spatial_dims(maps), keepdim=True).clamp_min(NORM_EPS)
    return maps / peak


def resize(maps: Tensor, size: Sequence[int]) -> Tensor:
    """(B, C, *spatial) -> (B, C, *size) for 1-D or 2-D maps: adaptive average pooling
    where no side grows, else linear / bilinear interpolation (align_corners=False)."""
    size = tuple(int(s) for s in size)
    src = tuple(maps.shape[2:])
    if len(src) not in (1, 2) or len(size) != len(src):
        raise KdflError(f"attention maps must have 1 or 2 spatial dimensions matching the target size; got "
                        f"maps {tuple(maps.shape)} and size {size}")
    if src == size:
        return maps
    if all(t <= s for t, s in zip(size, src, strict=True)):
        if len(size) == 1:
            return F.adaptive_avg_pool1d(maps, size)
        return F.adaptive_avg_pool2d(maps, (size[0], size[1]))
    return F.interpolate(maps, size=size, mode="linear" if len(src) == 1 else "bilinear", align_corners=False)


def capped_size(spatial: Sequence[int], cap: int) -> tuple[int, ...]:
    """Each side of ``spatial`` shrunk to at most ``cap``."""
    return tuple(min(int(s), cap) for s in spatial)


def soft_threshold(a: Tensor, rho: float, b: float) -> Tensor:
    """``T(A; ρ, b) = sigmoid(ρ (A - b))``."""
    return torch.sigmoid(rho * (a - b))


def intersection_union(maps: Tensor) -> tuple[Tensor, Tensor]:
    """Per-coordinate minimum and maximum over the clients of (K, n, C, *spatial) maps."""
    return maps.amin(0), maps.amax(0)


def inter_loss(student: Tensor, inter: Tensor, rho: float = 10.0, b: float = 0.6) -> Tensor:
    """``L_inter``, averaged over the batch. student, inter: (B, C, *spatial)."""
    num = (inter * soft_threshold(student, rho, b)).flatten(2).sum(-1)  # (B, C)
    den = inter.flatten(2).sum(-1)
    return -(num / den.clamp_min(DEN_EPS)).mean()


def union_loss(student: Tensor, union: Tensor, rho: float = 10.0, b: float = 0.3) -> Tensor:
    """``L_union``, averaged over the batch. student, union: (B, C, *spatial)."""
    num = (student * soft_threshold(union, rho, b)).flatten(2).sum(-1)  # (B, C)
    den = student.flatten(2).sum(-1)
    return -(num / den.clamp_min(DEN_EPS)).mean()


__all__ = ["capped_size", "grad_cam", "inter_loss", "intersection_union", "normalise", "require_activations",
           "resize", "soft_threshold", "union_loss"]
