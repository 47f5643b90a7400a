"""Model zoo: ``build(name, input_shape, num_classes, **options)``.

An architecture is named by a registry key with optional options after a colon, e.g.
``"resnet8:norm=gn,width=32"`` or ``"mlp:hidden=256-128"``. Every model returns logits of
shape (batch, num_classes) and draws its initial weights from torch's global generator
(callers seed it). ``mlp`` and ``cnn`` have no normalisation layers and run under
``torch.func.functional_call`` + ``vmap`` (the vectorized executor relies on it).

Input shapes: flat (D,) features, 1-D signals (C, L), 2-D images (C, H, W).

| name | inputs | notes |
|---|---|---|
| linear | any | flatten -> Linear (softmax regression; also a feature projection) |
| mlp | any | flatten -> hidden ReLU layers -> Linear |
| cnn | 1-D, 2-D | two conv blocks -> Linear(64) -> Linear |
| resnet8/20/32 | 2-D | FedDF's ResNet_cifar; norm bn / gn / none |
| vgg9 | 2-D | FedMA's VGG-9, no normalisation |
| shufflenet | 2-D | ShuffleNetV2 (FedDF's shufflenetv2), width multiplier |
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kdfl.models.cnn import build_cnn
from kdfl.models.compact import build_shufflenet
from kdfl.models.mlp import build_linear, build_mlp
from kdfl.models.resnet import resnet_factory
from kdfl.models.vgg import VGG9
from kdfl.registry import Option, Registry, default_options
from kdfl.spec import parse_spec
from kdfl.types import KdflError

FLAT, ONE_D, TWO_D = "flat", "1d", "2d"
_KIND_TEXT = {FLAT: "flat features (D,)", ONE_D: "1-D signals (C, L)", TWO_D: "2-D images (C, H, W)"}


@dataclass(frozen=True)
class ModelSpec:
    """One registry entry.

    Attributes:
        factory: ``factory(input_shape, num_classes, **options) -> nn.Module``.
        description: one line for ``kdfl list models``.
        options: the allowed options with their defaults; an option accepts values of its
            default's type (ints for floats; one value or a sequence for sequences).
        inputs: the input kinds the model handles: "flat", "1d", "2d".
    """

    factory: Callable[..., nn.Module]
    description: str
    options: dict[str, Any]
    inputs: tuple[str, ...] = (FLAT, ONE_D, TWO_D)

    def supports(self, input_shape: tuple[int, ...]) -> bool:
        """Whether the model accepts inputs of this shape."""
        return _kind(input_shape) in self.inputs


_NORM = {"norm": "bn", "width": 16, "groups": 2}


def _options(spec: ModelSpec) -> dict[str, Option]:
    """A model's options, each typed by its default."""
    return default_options(spec.options)


MODELS: Registry[ModelSpec] = Registry("model", options_of=_options)
MODELS.add("mlp", ModelSpec(build_mlp, "MLP: flatten -> hidden ReLU layers -> linear; any input", {"hidden": (128,)}))
MODELS.add("linear", ModelSpec(
    build_linear,
    "one Linear layer on the flattened input (softmax regression); in_features/out_features (0 = the "
    "task's) make it a projection between feature spaces",
    {"in_features": 0, "out_features": 0},
))
MODELS.add("cnn", ModelSpec(
    build_cnn,
    "small CNN: 2 conv blocks (width, 2*width) -> FC(hidden) -> linear; 1-D and 2-D",
    {"width": 16, "hidden": 64},
    (ONE_D, TWO_D),
))
for _depth in (8, 20, 32):
    MODELS.add(f"resnet{_depth}", ModelSpec(
        resnet_factory(_depth),
        f"ResNet-{_depth} (CIFAR-style, FedDF), stages w/2w/4w; norm bn|gn|none",
        dict(_NORM),
        (TWO_D,),
    ))
MODELS.add("vgg9", ModelSpec(
    VGG9,  # the class is its own factory: VGG9(input_shape, num_classes, **options)
    "VGG-9 without normalisation (FedMA/FedDF), 6 convs + 3 FC",
    {"width": 32, "hidden": 512, "pool": 4, "dropout": 0.0},
    (TWO_D,),
))
MODELS.add("shufflenet", ModelSpec(
    build_shufflenet,
    "ShuffleNetV2 (FedDF's shufflenetv2), width multiplier; norm bn|gn|none",
    {"width": 0.5, "norm": "bn", "groups": 2},
    (TWO_D,),
))


def _kind(input_shape: tuple[int, ...]) -> str | None:
    return {1: FLAT, 2: ONE_D, 3: TWO_D}.get(len(input_shape))


def parse_arch(arch: str) -> tuple[str, dict[str, Any]]:
    """Split an architecture string into a model name and options.

    ``"resnet8:norm=gn,width=32"`` -> ``("resnet8", {"norm": "gn", "width": 32})``.
    Values become int, float or bool (``true``/``false``) where they parse, else str;
    the name is lower-cased.

    Raises:
        KdflError: for an empty name, an option without ``=`` or any other malformed item
            (see :func:`kdfl.spec.parse_spec`).
    """
    name, options = parse_spec(arch, kind="model", positional=False)
    return name.lower(), options


def _unsupported(name: str, spec: ModelSpec, input_shape: tuple[int, ...]) -> KdflError:
    kinds = " or ".join(_KIND_TEXT[k] for k in spec.inputs)
    fits = [n for n, s in MODELS.items() if s.supports(input_shape)]
    hint = f"models that support it: {', '.join(fits)}" if fits else "no model supports it"
    return KdflError(f"{name} supports {kinds}; input shape {input_shape} does not fit ({hint})")


def build(name: str, input_shape: tuple[int, ...], num_classes: int, **options: Any) -> nn.Module:
    """Build a model with fresh weights drawn from torch's global generator.

    Args:
        name: a registry key, optionally with options: ``"resnet8:norm=gn,width=32"``.
        input_shape: shape of one input, e.g. (1, 8, 8), (1, 40), (3, 32, 32) or (60,).
        num_classes: number of output logits C.
        **options: model options; they override those given in ``name``.

    Returns:
        A module mapping (B, *input_shape) to (B, num_classes) logits.

    Raises:
        KdflError: for an unknown model or option, a bad option value, or an input shape
            the model cannot handle.
    """
    key, parsed = parse_arch(name)
    spec = MODELS.get(key)
    input_shape = tuple(input_shape)
    if not input_shape or not all(isinstance(d, int) and d > 0 for d in input_shape):
        raise KdflError(f"input shape must be a tuple of positive ints; got {input_shape}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise KdflError(f"num_classes must be a positive int; got {num_classes!r}")
    if not spec.supports(input_shape):
        raise _unsupported(key, spec, input_shape)
    merged = {**MODELS.defaults(key), **MODELS.bind(key, {**parsed, **options})}
    return spec.factory(input_shape, num_classes, **merged)


def param_count(model: nn.Module) -> int:
    """Number of trainable parameters (buffers such as BN running stats excluded)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def describe(input_shape: tuple[int, ...], num_classes: int) -> list[tuple[str, int | None, str]]:
    """(name, trainable parameters or None if the shape is unsupported, description) per model.

    Models are built with default options inside ``fork_rng``, so torch's global
    generator is left untouched (the meta device would avoid allocating, but its first
    use costs about 2 s, more than building every model for real).
    """
    rows: list[tuple[str, int | None, str]] = []
    for name, spec in MODELS.items():
        count: int | None = None
        if spec.supports(tuple(input_shape)):
            with torch.random.fork_rng(devices=[]):
                count = param_count(build(name, tuple(input_shape), num_classes))
        rows.append((name, count, spec.description))
    return rows


__all__ = ["MODELS", "ModelSpec", "build", "describe", "param_count", "parse_arch"]
