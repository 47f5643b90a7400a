"""A small two-block CNN for 2-D images (C, H, W) and 1-D signals (C, L).

Two conv blocks (``width`` then ``2 * width`` channels, ReLU, max-pool 2), then
Linear(hidden) -> ReLU -> Linear(C). A pooling step is skipped when it would shrink a
spatial side below 2, so 8x8 digits keep a 2x2 map. 2-D uses 3x3 kernels, 1-D uses
kernel 5 (mnist1d: about 24k parameters with the defaults).

Follows the :class:`~kdfl.models.base.Decoupled` contract: ``features`` is the output of
the hidden fully connected layer's ReLU (``feature_dim = hidden``), ``head`` is the last
Linear, and ``activations`` returns the two conv blocks' outputs, (B, width, *spatial_1)
and (B, 2 * width, *spatial_2), after ReLU and pooling.

The forward pass is a plain composition of functional layers, with no in-place ops on
parameters and no control flow on tensor values, so it runs under ``torch.func.vmap``.
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from kdfl.models.base import Decoupled
from kdfl.types import KdflError


class CNN(Decoupled):
    """conv-ReLU-pool -> conv-ReLU-pool -> flatten -> Linear-ReLU -> Linear.

    Submodules: ``blocks`` (two conv-ReLU[-pool] Sequentials), ``fc`` (Flatten,
    Linear(hidden), ReLU; its output is the features) and ``classifier`` (the head).

    Args:
        input_shape: (C, H, W) for images or (C, L) for 1-D signals.
        num_classes: number of output logits C.
        width: channels of the first conv (the second has twice as many).
        hidden: size of the hidden fully connected layer.
    """

    def __init__(
        self, input_shape: tuple[int, ...], num_classes: int, width: int = 16, hidden: int = 64
    ) -> None:
        super().__init__()
        if len(input_shape) not in (2, 3):
            raise KdflError(
                f"cnn needs a 2-D (C, H, W) or 1-D (C, L) input; got {input_shape}. "
                "Use 'mlp' for flat feature vectors."
            )
        if width < 1 or hidden < 1:
            raise KdflError(f"cnn options width and hidden must be >= 1; got width={width}, hidden={hidden}")
        two_d = len(input_shape) == 3
        conv = nn.Conv2d if two_d else nn.Conv1d
        pool = nn.MaxPool2d if two_d else nn.MaxPool1d
        kernel = 3 if two_d else 5
        channels, spatial = input_shape[0], list(input_shape[1:])
        blocks: list[nn.Module] = []
        for out in (width, 2 * width):
            layers: list[nn.Module] = [conv(channels, out, kernel, padding=kernel // 2), nn.ReLU()]
            channels = out
            if min(spatial) // 2 >= 2:  # keep at least a 2-wide map (8x8 -> 4 -> 2)
                layers.append(pool(2))
                spatial = [s // 2 for s in spatial]
            blocks.append(nn.Sequential(*layers))
        # created in the former order (conv, conv, Linear(hidden), Linear(C)), so a seed
        # gives the same weights as before the features/head split
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Sequential(
            nn.Flatten(start_dim=1), nn.Linear(channels * math.prod(spatial), hidden), nn.ReLU()
        )
        self.classifier = nn.Linear(hidden, num_classes)
        self.feature_dim = hidden

    def _trunk(self, x: Tensor, maps: list[Tensor] | None) -> Tensor:
        """(B, *input_shape) -> (B, hidden); appends each block's (B, C_i, *spatial_i) map."""
        return self.fc(self._stages(self.blocks, x, maps))


def build_cnn(input_shape: tuple[int, ...], num_classes: int, width: int = 16, hidden: int = 64) -> CNN:
    """Factory for the ``cnn`` registry entry."""
    return CNN(input_shape, num_classes, width=width, hidden=hidden)
