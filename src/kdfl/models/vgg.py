"""VGG-9 without normalisation, as in the FedMA / FedDF comparisons.

Wang et al., Federated Learning with Matched Averaging, ICLR 2020 (FedMA's ``VGG9``);
FedDF (Lin et al., NeurIPS 2020) reuses it.

conv 32-64-pool-128-128-pool-256-256-pool (3x3, ReLU; channels scale with ``width``),
adaptive average pooling to ``pool`` x ``pool``, then FC ``hidden`` -> ``hidden`` -> C with
ReLU. On 32x32 inputs the feature map already is 4x4, so the defaults give FedMA's net
exactly (3,491,530 parameters for 10 classes). A max-pool is skipped where it would shrink
a side below 2 (8x8 inputs); ``pool=1`` shrinks the first FC layer 16-fold.

Follows the :class:`~kdfl.models.base.Decoupled` contract: ``features`` is the input of
the last Linear, i.e. the second hidden FC layer's ReLU output after dropout
(``feature_dim = hidden``), ``head`` is ``classifier``, and ``activations`` returns the
three conv pairs' outputs (after ReLU and pooling): 2w, 4w and 8w channels.
"""

from __future__ import annotations

from torch import Tensor, nn

from kdfl.models.base import Decoupled
from kdfl.types import KdflError


class VGG9(Decoupled):
    """Six 3x3 convs in three pooled pairs, then three fully connected layers.

    Submodules: ``blocks`` (three conv-ReLU-conv-ReLU[-pool] Sequentials), ``avgpool``,
    ``fc`` (Flatten, Dropout, Linear-ReLU, Linear-ReLU, Dropout; its output is the
    features) and ``classifier`` (the last Linear, the head).

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
        blocks: list[nn.Module] = []
        for pair in ((width, 2 * width), (4 * width, 4 * width), (8 * width, 8 * width)):
            layers: list[nn.Module] = []
            for out in pair:
                layers += [nn.Conv2d(channels, out, 3, padding=1), nn.ReLU()]
                channels = out
            if spatial // 2 >= 2:
                layers.append(nn.MaxPool2d(2))
                spatial //= 2
            blocks.append(nn.Sequential(*layers))
        # created in the former order (six convs, then the three Linears), so a seed gives
        # the same weights as before the features/head split
        self.blocks = nn.Sequential(*blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(pool)
        self.fc = nn.Sequential(
            nn.Flatten(start_dim=1),
            nn.Dropout(dropout),
            nn.Linear(channels * pool * pool, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
        )
        self.classifier = nn.Linear(hidden, num_classes)
        self.feature_dim = hidden

    def _trunk(self, x: Tensor, maps: list[Tensor] | None) -> Tensor:
        """(B, C_in, H, W) -> (B, hidden); appends each conv pair's (B, C_i, H_i, W_i) map."""
        return self.fc(self.avgpool(self._stages(self.blocks, x, maps)))  # (B, 8w, pool, pool) -> (B, hidden)
