"""A compact family: ShuffleNetV2 for small images (FedDF's ``shufflenetv2``).

Ma et al., ShuffleNet V2: Practical Guidelines for Efficient CNN Architecture Design,
ECCV 2018. The small-image layout follows FedDF's ``pcode/models/shufflenetv2.py``
(kuangliu's CIFAR port): stem conv3x3 (C -> 24, stride 1) -> norm -> ReLU, three stages
of one down-sampling block and (3, 7, 3) basic blocks (channel split, 1x1 -> depthwise
3x3 -> 1x1, concat, channel shuffle), a 1x1 conv to 1024 (2048 at width 2), global
average pooling and a Linear classifier. FedDF's ``shufflenetv2-1`` is
``shufflenet:width=1``; the default ``width=0.5`` keeps CPU training fast.

Follows the :class:`~kdfl.models.base.Decoupled` contract: ``features`` is the globally
average-pooled output of the final 1x1 conv (``feature_dim`` = 1024, 2048 at width 2),
``head`` is ``classifier``, and ``activations`` returns four maps: the three stages'
outputs (stage channels at H/2, H/4, H/8) and the final 1x1 conv's (1024 at H/8).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kdfl.models.base import Decoupled
from kdfl.models.resnet import norm2d
from kdfl.types import KdflError

STAGE_CHANNELS = {
    0.5: (48, 96, 192, 1024),
    1.0: (116, 232, 464, 1024),
    1.5: (176, 352, 704, 1024),
    2.0: (244, 488, 976, 2048),
}
NUM_BLOCKS = (3, 7, 3)


def stage_channels(width: float) -> tuple[int, int, int, int]:
    """Stage output channels for a width multiplier (the paper's table, else 1.0x scaled to even)."""
    if width in STAGE_CHANNELS:
        return STAGE_CHANNELS[width]
    even = [max(2, 2 * round(c * width / 2)) for c in STAGE_CHANNELS[1.0][:3]]
    return even[0], even[1], even[2], 1024


def channel_shuffle(x: Tensor, groups: int = 2) -> Tensor:
    """(B, g*c, H, W) -> interleave the g groups of channels."""
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class ShuffleBlock(nn.Module):
    """Basic unit: split channels in half, transform one half, concat, shuffle."""

    def __init__(self, channels: int, norm: str, groups: int) -> None:
        super().__init__()
        half = channels // 2
        self.branch = nn.Sequential(
            nn.Conv2d(half, half, 1, bias=False),
            norm2d(norm, half, groups),
            nn.ReLU(),
            nn.Conv2d(half, half, 3, padding=1, groups=half, bias=False),
            norm2d(norm, half, groups),
            nn.Conv2d(half, half, 1, bias=False),
            norm2d(norm, half, groups),
            nn.ReLU(),
        )

    def forward(self, x: Tensor) -> Tensor:
        keep, change = x.chunk(2, dim=1)
        return channel_shuffle(torch.cat([keep, self.branch(change)], dim=1))


class DownBlock(nn.Module):
    """Down-sampling unit: two stride-2 branches on the full input, concat, shuffle."""

    def __init__(self, in_channels: int, out_channels: int, norm: str, groups: int) -> None:
        super().__init__()
        mid = out_channels // 2
        self.left = nn.Sequential(
            nn.Conv2d(in_channels, in_channels, 3, stride=2, padding=1, groups=in_channels, bias=False),
            norm2d(norm, in_channels, groups),
            nn.Conv2d(in_channels, mid, 1, bias=False),
            norm2d(norm, mid, groups),
            nn.ReLU(),
        )
        self.right = nn.Sequential(
            nn.Conv2d(in_channels, mid, 1, bias=False),
            norm2d(norm, mid, groups),
            nn.ReLU(),
            nn.Conv2d(mid, mid, 3, stride=2, padding=1, groups=mid, bias=False),
            norm2d(norm, mid, groups),
            nn.Conv2d(mid, mid, 1, bias=False),
            norm2d(norm, mid, groups),
            nn.ReLU(),
        )

    def forward(self, x: Tensor) -> Tensor:
        return channel_shuffle(torch.cat([self.left(x), self.right(x)], dim=1))


class ShuffleNetV2(Decoupled):
    """ShuffleNetV2 for small images (stride-1 stem, no max-pool).

    Submodules: ``stem``, ``stages`` (three Sequentials: a DownBlock then ShuffleBlocks),
    ``conv5`` (1x1 conv -> norm -> ReLU), ``avgpool`` and ``classifier`` (the head).

    Args:
        input_shape: (C, H, W).
        num_classes: number of output logits C.
        width: width multiplier (0.5, 1, 1.5, 2 use the paper's channels; others scale 1x).
        norm: "bn" (BatchNorm), "gn" (GroupNorm) or "none".
        groups: number of GroupNorm groups when ``norm="gn"``.
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        width: float = 0.5,
        norm: str = "bn",
        groups: int = 2,
    ) -> None:
        super().__init__()
        if width <= 0:
            raise KdflError(f"shufflenet option width must be > 0; got {width}")
        *stages, last = stage_channels(float(width))
        stem = 24
        self.stem = nn.Sequential(
            nn.Conv2d(input_shape[0], stem, 3, padding=1, bias=False), norm2d(norm, stem, groups), nn.ReLU()
        )
        staged: list[nn.Module] = []
        in_channels = stem
        for out, blocks in zip(stages, NUM_BLOCKS, strict=True):
            layers: list[nn.Module] = [DownBlock(in_channels, out, norm, groups)]
            layers += [ShuffleBlock(out, norm, groups) for _ in range(blocks)]
            staged.append(nn.Sequential(*layers))
            in_channels = out
        self.stages = nn.Sequential(*staged)
        # ``conv5`` was ``head`` before the features/head split (``head`` is now the method
        # applying ``classifier``); creation order is unchanged, so seeds give the same weights
        self.conv5 = nn.Sequential(
            nn.Conv2d(in_channels, last, 1, bias=False), norm2d(norm, last, groups), nn.ReLU()
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(last, num_classes)
        self.feature_dim = last

    def _trunk(self, x: Tensor, maps: list[Tensor] | None) -> Tensor:
        """(B, C_in, H, W) -> (B, last); appends the 3 stage maps and the conv5 map."""
        x = self._stages((*self.stages, self.conv5), self.stem(x), maps)  # conv5: (B, last, H/8, W/8)
        return self.avgpool(x).flatten(1)


def build_shufflenet(
    input_shape: tuple[int, ...], num_classes: int, width: float = 0.5, norm: str = "bn", groups: int = 2
) -> ShuffleNetV2:
    """Factory for the ``shufflenet`` registry entry."""
    return ShuffleNetV2(input_shape, num_classes, width=width, norm=norm, groups=groups)
