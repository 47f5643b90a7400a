"""A multi-layer perceptron for any input shape (the input is flattened).

Follows the :class:`~kdfl.models.base.Decoupled` contract: ``features`` is the output of
the last hidden ReLU (the flattened input when there is no hidden layer), so
``feature_dim`` is the last hidden size; ``head`` is the final Linear. An MLP has no
spatial activations: ``activations`` raises :class:`~kdfl.types.KdflError`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor, nn

from kdfl.models.base import Decoupled
from kdfl.types import KdflError


def parse_hidden(hidden: int | str | Sequence[int]) -> tuple[int, ...]:
    """Normalise a hidden-layer spec: ``128``, ``(128, 64)``, ``[128, 64]`` or ``"128-64"``.

    ``0``, ``()`` or ``""`` mean no hidden layer (a linear classifier).

    Raises:
        KdflError: when a size is not a non-negative integer.
    """
    if isinstance(hidden, bool):
        raise KdflError(f"mlp option 'hidden' must be an int or a list of ints; got {hidden!r}")
    if isinstance(hidden, int):
        sizes: list[object] = [hidden] if hidden > 0 else []
    elif isinstance(hidden, str):
        sizes = [s for s in hidden.replace("x", "-").split("-") if s.strip()]
    else:
        sizes = list(hidden)
    out = []
    for size in sizes:
        try:
            value = int(str(size).strip()) if not isinstance(size, int) else size
        except ValueError:
            value = -1
        if isinstance(size, bool) or value <= 0:
            raise KdflError(
                f"mlp option 'hidden' must hold positive integers, e.g. hidden=128 or "
                f"hidden=256-128; got {hidden!r}"
            )
        out.append(value)
    return tuple(out)


class MLP(Decoupled):
    """Flatten -> (Linear -> ReLU) per hidden layer -> Linear(num_classes).

    Submodules: ``body`` (Flatten and the hidden Linear-ReLU pairs; its output is the
    features) and ``classifier`` (the last Linear, the head).

    Args:
        input_shape: shape of one input; anything, it is flattened.
        num_classes: number of output logits C.
        hidden: hidden layer sizes (an int, a sequence, or ``"256-128"``).
    """

    has_activations = False  # it flattens its input: no spatial maps

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        hidden: int | str | Sequence[int] = (128,),
    ) -> None:
        super().__init__()
        sizes = parse_hidden(hidden)
        layers: list[nn.Module] = [nn.Flatten(start_dim=1)]
        width = math.prod(input_shape)
        for size in sizes:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        # body then classifier: the same creation (and init) order as the former single
        # Sequential ``net``, whose last Linear is now ``classifier``
        self.body = nn.Sequential(*layers)
        self.classifier = nn.Linear(width, num_classes)
        self.feature_dim = width

    def _trunk(self, x: Tensor, maps: list[Tensor] | None) -> Tensor:
        """(B, *input_shape) -> (B, feature_dim); ``maps`` is unused (no spatial maps)."""
        return self.body(x)


def build_mlp(
    input_shape: tuple[int, ...], num_classes: int, hidden: int | str | Sequence[int] = (128,)
) -> MLP:
    """Factory for the ``mlp`` registry entry."""
    return MLP(input_shape, num_classes, hidden=hidden)


def build_linear(input_shape: tuple[int, ...], num_classes: int, in_features: int = 0, out_features: int = 0) -> MLP:
    """Factory for the ``linear`` registry entry: one Linear layer on the flattened input
    (softmax regression), i.e. an MLP without hidden layers. ``in_features`` /
    ``out_features`` (0 = the task's flattened input size / C) make it a learned map
    between feature spaces: FedKD's projection of the mentee's features to the mentor's."""
    if in_features < 0 or out_features < 0:
        raise KdflError(f"linear: in_features and out_features must be >= 0 (0 = the task's), "
                        f"got {in_features}, {out_features}")
    shape = (in_features,) if in_features else input_shape
    return MLP(shape, out_features or num_classes, hidden=())
