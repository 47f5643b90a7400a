"""CIFAR-style ResNets (depth 6n + 2) as in FedDF's ``ResNet_cifar``.

Lin et al., Ensemble Distillation for Robust Model Fusion in Federated Learning,
NeurIPS 2020 (code: ``pcode/models/resnet.py``).

Stem conv3x3 (C -> w, no bias) -> norm -> ReLU, then three stages of n BasicBlocks with
w, 2w, 4w channels and strides 1, 2, 2 (shortcut conv1x1 + norm where the shape
changes), then global average pooling and ``classifier`` = Linear(4w, C). With w = 16 on
32x32 inputs, global average pooling equals FedDF's AvgPool2d(8); being adaptive it also
serves 8x8 and 28x28 inputs. ResNet-8 for CIFAR-10 has 78,042 trainable parameters.

Init as FedDF: conv weights N(0, sqrt(2 / (k * k * out_channels))), norm weight 1 and
bias 0, Linear with PyTorch's default.

Follows the :class:`~kdfl.models.base.Decoupled` contract: ``features`` is the globally
average-pooled output of the last stage (``feature_dim = 4 * width``), ``head`` is
``classifier``, and ``activations`` returns the three stages' outputs, (B, w, H, W),
(B, 2w, H/2, W/2) and (B, 4w, H/4, W/4) (sides rounded up by the stride-2 convs).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import Tensor, nn

from kdfl.models.base import Decoupled
from kdfl.types import KdflError

NORMS = ("bn", "gn", "none")


def norm2d(norm: str, channels: int, groups: int = 2) -> nn.Module:
    """A 2-D normalisation layer: BatchNorm, GroupNorm(``groups``) or identity.

    Raises:
        KdflError: for an unknown ``norm`` or ``groups`` that does not divide ``channels``.
    """
    if norm == "bn":
        return nn.BatchNorm2d(channels)
    if norm == "gn":
        if groups < 1 or channels % groups:
            raise KdflError(
                f"GroupNorm option groups={groups} must divide every channel count; "
                f"{channels} channels do not split into {groups} groups"
            )
        return nn.GroupNorm(groups, channels)
    if norm == "none":
        return nn.Identity()
    raise KdflError(f"option norm={norm!r} is not one of {', '.join(NORMS)}")


def init_feddf(model: nn.Module) -> None:
    """FedDF's init: conv N(0, sqrt(2 / (k*k*out))), norm weight 1 / bias 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, mean=0.0, std=math.sqrt(2.0 / n))
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class BasicBlock(nn.Module):
    """conv3x3 -> norm -> ReLU -> conv3x3 -> norm, plus the shortcut, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int, norm: str, groups: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm2d(norm, planes, groups)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = norm2d(norm, planes, groups)
        self.relu = nn.ReLU()
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), norm2d(norm, planes, groups)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.downsample(x))


class ResNetCifar(Decoupled):
    """FedDF's ``ResNet_cifar`` with BasicBlocks (depth 6n + 2, n >= 1).

    Args:
        input_shape: (C, H, W).
        num_classes: number of output logits C.
        depth: 8, 14, 20, 26, 32, ... (6n + 2).
        width: stem channels w; stages have w, 2w, 4w (FedDF: 16 x ``scaling``).
        norm: "bn" (BatchNorm), "gn" (GroupNorm) or "none".
        groups: number of GroupNorm groups when ``norm="gn"``.
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        depth: int = 8,
        width: int = 16,
        norm: str = "bn",
        groups: int = 2,
    ) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise KdflError(f"ResNet depth must be 6n + 2 with n >= 1 (8, 14, 20, 32, ...); got {depth}")
        if width < 1:
            raise KdflError(f"ResNet option width must be >= 1; got {width}")
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(input_shape[0], width, 3, stride=1, padding=1, bias=False)
        self.bn1 = norm2d(norm, width, groups)
        self.relu = nn.ReLU()
        stages = []
        in_planes = width
        for planes, stride in ((width, 1), (2 * width, 2), (4 * width, 2)):
            layers = []
            for i in range(blocks):
                layers.append(BasicBlock(in_planes, planes, stride if i == 0 else 1, norm, groups))
                in_planes = planes
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(4 * width, num_classes)
        self.feature_dim = 4 * width
        init_feddf(self)

    def _trunk(self, x: Tensor, maps: list[Tensor] | None) -> Tensor:
        """(B, C_in, H, W) -> (B, 4w); appends each stage's (B, C_i, H_i, W_i) output."""
        x = self.relu(self.bn1(self.conv1(x)))
        x = self._stages((self.layer1, self.layer2, self.layer3), x, maps)
        return self.avgpool(x).flatten(1)  # (B, 4w, H/4, W/4) -> (B, 4w)


def resnet_factory(depth: int) -> Callable[..., ResNetCifar]:
    """A registry factory for ResNet-``depth``."""

    def build_resnet(
        input_shape: tuple[int, ...], num_classes: int, norm: str = "bn", width: int = 16, groups: int = 2
    ) -> ResNetCifar:
        return ResNetCifar(input_shape, num_classes, depth=depth, width=width, norm=norm, groups=groups)

    build_resnet.__doc__ = f"Factory for the ``resnet{depth}`` registry entry."
    return build_resnet
