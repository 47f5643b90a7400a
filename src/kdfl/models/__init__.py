"""Model zoo: ``build(name, input_shape, num_classes, **options)``.

An architecture is named by a registry key with optional options after a colon, e.g.
``"resnet8:norm=gn,width=32"`` or ``"mlp:hidden=256-128"``. Every model returns logits of
shape (batch, num_classes) and draws its initial weights from torch's global generator
(callers seed it). ``mlp`` and ``cnn`` have no normalisation layers and run under
``torch.func.functional_call`` + ``vmap`` (the vectorized executor relies on it).

Input shapes: flat (D,) features, 1-D signals (C, L), 2-D images (C, H, W).

| name | inputs | notes |
|---|---|---|
| mlp | any | flatten -> hidden ReLU layers -> Linear |
| cnn | 1-D, 2-D | two conv blocks -> Linear(64) -> Linear |
| resnet8/20/32 | 2-D | FedDF's ResNet_cifar; norm bn / gn / none |
| vgg9 | 2-D | FedMA's VGG-9, no normalisation |
| shufflenet | 2-D | ShuffleNetV2 (FedDF's shufflenetv2), width multiplier |
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kdfl.models.cnn import build_cnn
from kdfl.models.compact import build_shufflenet
from kdfl.models.mlp import build_mlp
from kdfl.models.resnet import resnet_factory
from kdfl.models.vgg import VGG9
from kdfl.spec import parse_value
from kdfl.types import KdflError

FLAT, ONE_D, TWO_D = "flat", "1d", "2d"
_KIND_TEXT = {FLAT: "flat features (D,)", ONE_D: "1-D signals (C, L)", TWO_D: "2-D images (C, H, W)"}


@dataclass(frozen=True)
class ModelSpec:
    """One registry entry.

    Attributes:
        factory: ``factory(input_shape, num_classes, **options) -> nn.Module``.
        description: one line for ``kdfl list models``.
        options: the allowed options with their defaults (used to validate user options).
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

MODELS: dict[str, ModelSpec] = {
    "mlp": ModelSpec(
        build_mlp, "MLP: flatten -> hidden ReLU layers -> linear; any input", {"hidden": (128,)}
    ),
    "cnn": ModelSpec(
        build_cnn,
        "small CNN: 2 conv blocks (width, 2*width) -> FC(hidden) -> linear; 1-D and 2-D",
        {"width": 16, "hidden": 64},
        (ONE_D, TWO_D),
    ),
    **{
        f"resnet{depth}": ModelSpec(
            resnet_factory(depth),
            f"ResNet-{depth} (CIFAR-style, FedDF), stages w/2w/4w; norm bn|gn|none",
            dict(_NORM),
            (TWO_D,),
        )
        for depth in (8, 20, 32)
    },
    "vgg9": ModelSpec(
        VGG9,  # the class is its own factory: VGG9(input_shape, num_classes, **options)
        "VGG-9 without normalisation (FedMA/FedDF), 6 convs + 3 FC",
        {"width": 32, "hidden": 512, "pool": 4, "dropout": 0.0},
        (TWO_D,),
    ),
    "shufflenet": ModelSpec(
        build_shufflenet,
        "ShuffleNetV2 (FedDF's shufflenetv2), width multiplier; norm bn|gn|none",
        {"width": 0.5, "norm": "bn", "groups": 2},
        (TWO_D,),
    ),
}


def _kind(input_shape: tuple[int, ...]) -> str | None:
    return {1: FLAT, 2: ONE_D, 3: TWO_D}.get(len(input_shape))


def parse_arch(arch: str) -> tuple[str, dict[str, Any]]:
    """Split an architecture string into a model name and options.

    ``"resnet8:norm=gn,width=32"`` -> ``("resnet8", {"norm": "gn", "width": 32})``.
    Values become int, float or bool (``true``/``false``) where they parse, else str.

    Raises:
        KdflError: for an empty name or an option without ``=``.
    """
    name, _, rest = arch.partition(":")
    name = name.strip().lower()
    if not name:
        raise KdflError(f"architecture {arch!r} has no model name; expected e.g. 'resnet8:norm=gn'")
    options: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise KdflError(
                f"architecture {arch!r}: option {item!r} is not key=value; expected e.g. '{name}:width=32'"
            )
        options[key.strip()] = parse_value(value)
    return name, options


def _check_option(model: str, key: str, value: Any, default: Any) -> Any:
    """Type-check one option against its default's type (ints pass for floats)."""
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, (tuple, list)):
        ok = isinstance(value, (int, str, tuple, list)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise KdflError(
            f"{model} option {key!r} must be like {default!r} ({type(default).__name__}); got {value!r}"
        )
    return value


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
    if spec is None:
        close = difflib.get_close_matches(key, MODELS, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise KdflError(f"unknown model {key!r}; available: {', '.join(MODELS)}.{hint}")
    input_shape = tuple(input_shape)
    if not input_shape or not all(isinstance(d, int) and d > 0 for d in input_shape):
        raise KdflError(f"input shape must be a tuple of positive ints; got {input_shape}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise KdflError(f"num_classes must be a positive int; got {num_classes!r}")
    if not spec.supports(input_shape):
        raise _unsupported(key, spec, input_shape)
    merged = dict(spec.options)
    for opt, value in {**parsed, **options}.items():
        if opt not in spec.options:
            allowed = ", ".join(f"{k}={v!r}" for k, v in spec.options.items())
            raise KdflError(f"unknown option {opt!r} for model {key!r}; allowed options: {allowed}")
        merged[opt] = _check_option(key, opt, value, spec.options[opt])
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
