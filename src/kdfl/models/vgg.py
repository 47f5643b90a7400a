"""VGG-9 without normalisation, as in the FedMA / FedDF comparisons.

Wang et al., Federated Learning with Matched Averaging, ICLR 2020 (FedMA's ``VGG9``);
FedDF (Lin et al., NeurIPS 2020) reuses it.

conv 32-64-pool-128-128-pool-256-256-pool (3x3, ReLU; channels scale with ``width``),
adaptive average pooling to ``pool`` x ``pool``, then FC ``hidden`` -> ``hidden`` -> C with
ReLU. On 32x32 inputs the feature map already is 4x4, so the defaults give FedMA's net
exactly (3,491,530 parameters for 10 classes). A max-pool is skipped where it would shrink
a side below 2 (8x8 inputs); ``pool=1`` shrinks the first FC layer 16-fold.
"""

from __future__ import annotations

from torch import Tensor, nn

from kdfl.types import KdflError


class VGG9(nn.Module):
    """Six 3x3 convs in three pooled pairs, then three fully connected layers.

    Args:
        input_shape: (C, H, W).
        num_classes: number of output logits C.
        width: channels of the first conv (then 2w, pool, 4w, 4w, pool, 8w, 8w, pool).
        hidden: size of the two hidden FC layers.
        pool: side of the adaptive average pooling before the FC layers.
        dropout: dropout probability before the first and last FC layers (FedMA: 0.1).
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        width: int = 32,
        hidden: int = 512,
        pool: int = 4,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if min(width, hidden, pool) < 1 or not 0.0 <= dropout < 1.0:
            raise KdflError(
                f"vgg9 options need width, hidden, pool >= 1 and 0 <= dropout < 1; got "
                f"width={width}, hidden={hidden}, pool={pool}, dropout={dropout}"
            )
        channels, spatial = input_shape[0], min(input_shape[1:])
        layers: list[nn.Module] = []
        for pair in ((width, 2 * width), (4 * width, 4 * width), (8 * width, 8 * width)):
            for out in pair:
                layers += [nn.Conv2d(channels, out, 3, padding=1), nn.ReLU()]
                channels = out
            if spatial // 2 >= 2:
                layers.append(nn.MaxPool2d(2))
                spatial //= 2
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(pool)
        self.classifier = nn.Sequential(
            nn.Flatten(start_dim=1),
            nn.Dropout(dropout),
            nn.Linear(channels * pool * pool, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        """(B, C_in, H, W) -> (B, C) logits."""
        return self.classifier(self.avgpool(self.features(x)))
