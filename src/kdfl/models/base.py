"""The features/head contract every model of the zoo follows.

Knowledge-distillation methods split a classifier into a feature extractor and a head:
FedGen applies client heads to generated latents, FedProto exchanges class means of
features, FedKD adds hidden-state losses and FedAD builds attention maps from
intermediate convolutional activations. :class:`Decoupled` gives them one interface:

- ``feature_dim``: the width D of the features, known once the model is built.
- ``features(x)``: (B, *input_shape) -> z (B, D), the penultimate representation, i.e.
  exactly what goes into the last Linear layer (after its ReLU / pooling / dropout).
- ``head(z)``: (B, D) -> (B, C) logits; the last Linear layer (``classifier``) only.
- ``forward(x)`` == ``head(features(x))``, bit for bit.
- ``activations(x)``: the spatial feature maps (B, C_i, *spatial_i), one per stage, for
  attention distillation; the last one is the map that is pooled or flattened into the
  features. Models without spatial maps (``has_activations = False``: the MLP) raise
  :class:`~kdfl.types.KdflError`.
- ``forward(x, features=True, activations=True)``: several outputs from ONE pass, as a
  dict. ``torch.func.functional_call`` (run under ``vmap`` by the vectorized executor)
  can only call ``forward``, so this is how a stacked client population gets features.

| model | feature_dim | activations (channels; spatial for an (H, W) input) |
|---|---|---|
| mlp | last hidden size (128); the flattened input size if ``hidden=0`` | none (raises) |
| cnn | ``hidden`` (64) | 2 conv blocks: w, 2w; each block max-pools by 2 unless a side would drop below 2 |
| resnet8/20/32 | 4 * ``width`` (64) | 3 stages: w @ H, 2w @ H/2, 4w @ H/4 |
| vgg9 | ``hidden`` (512) | 3 conv pairs: 2w, 4w, 8w, each max-pooled by 2 unless a side would drop below 2 |
| shufflenet | 1024 (2048 at ``width=2``) | 3 stages @ H/2, H/4, H/8, then the 1x1 conv to 1024 @ H/8 |
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar, Literal, overload

from torch import Tensor, nn

from kdfl.types import KdflError

# registry keys of the zoo's models with spatial activations (named in the MLP's error)
SPATIAL_MODELS = ("cnn", "resnet8", "resnet20", "resnet32", "vgg9", "shufflenet")

ForwardOutput = dict[str, Any]  # "logits": Tensor, "features": Tensor, "activations": list[Tensor]


class Decoupled(nn.Module):
    """A classifier split into ``features`` (everything but the last Linear) and ``head``.

    Subclasses build ``self.classifier`` (the last ``nn.Linear``), set ``self.feature_dim``
    to its ``in_features`` and implement :meth:`_trunk`; the public methods derive from it,
    so ``forward``, ``features`` and ``activations`` can never disagree.

    Attributes:
        feature_dim: width D of :meth:`features`' output.
        has_activations: whether :meth:`activations` is supported (convolutional models).
        classifier: the last Linear layer, (B, D) -> (B, C); :meth:`head` applies it.
    """

    feature_dim: int
    has_activations: ClassVar[bool] = True
    classifier: nn.Linear

    def _trunk(self, x: Tensor, maps: list[Tensor] | None) -> Tensor:
        """Compute the features, appending each stage's spatial map to ``maps`` if given.

        Args:
            x: (B, *input_shape) inputs.
            maps: a list to collect (B, C_i, *spatial_i) stage outputs in, or None.

        Returns:
            (B, feature_dim) features.
        """
        raise NotImplementedError

    @staticmethod
    def _stages(stages: Iterable[nn.Module], x: Tensor, maps: list[Tensor] | None) -> Tensor:
        """Run ``x`` through ``stages`` in order, appending each stage's output to ``maps``."""
        for stage in stages:
            x = stage(x)
            if maps is not None:
                maps.append(x)
        return x

    def _no_activations(self) -> KdflError:
        return KdflError(
            f"{type(self).__name__} has no spatial activations (it works on flattened inputs), so "
            f"attention-map distillation cannot use it; use a convolutional model with spatial "
            f"activations: {', '.join(SPATIAL_MODELS)}"
        )

    def features(self, x: Tensor) -> Tensor:
        """(B, *input_shape) -> (B, feature_dim): the input of the last Linear layer."""
        return self._trunk(x, None)

    def head(self, z: Tensor) -> Tensor:
        """(B, feature_dim) -> (B, C) logits: the last Linear layer only."""
        return self.classifier(z)

    def activations(self, x: Tensor) -> list[Tensor]:
        """The spatial feature maps of one forward pass, (B, C_i, *spatial_i) per stage.

        Raises:
            KdflError: for a model without spatial activations (``has_activations`` False).
        """
        if not self.has_activations:
            raise self._no_activations()
        maps: list[Tensor] = []
        self._trunk(x, maps)
        return maps

    @overload
    def forward(
        self, x: Tensor, *, features: Literal[False] = ..., activations: Literal[False] = ...
    ) -> Tensor: ...

    @overload
    def forward(
        self, x: Tensor, *, features: bool = ..., activations: bool = ...
    ) -> Tensor | ForwardOutput: ...

    def forward(
        self, x: Tensor, *, features: bool = False, activations: bool = False
    ) -> Tensor | ForwardOutput:
        """Logits, or several outputs of the same pass.

        Args:
            x: (B, *input_shape) inputs.
            features: also return the (B, feature_dim) features.
            activations: also return the list of (B, C_i, *spatial_i) stage maps.

        Returns:
            The (B, C) logits when both flags are False; else a dict with "logits" and the
            requested "features" / "activations", where logits == head(features) exactly.

        Raises:
            KdflError: ``activations=True`` on a model without spatial activations.
        """
        if activations and not self.has_activations:
            raise self._no_activations()
        # the flags are Python bools fixed per call, so this branching is vmap-safe
        maps: list[Tensor] | None = [] if activations else None
        z = self._trunk(x, maps)
        logits = self.classifier(z)
        if not (features or activations):
            return logits
        out: ForwardOutput = {"logits": logits}
        if features:
            out["features"] = z
        if activations:
            out["activations"] = maps
        return out


__all__ = ["SPATIAL_MODELS", "Decoupled", "ForwardOutput"]
