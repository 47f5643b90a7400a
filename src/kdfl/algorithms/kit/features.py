"""Feature widths: the ``feature_dim`` of a model or an architecture (the input width of
its classifier head), for algorithms that work in feature space (FedProto's prototypes,
FedGen's generated latents, FedKD's hidden-state projection)."""

from __future__ import annotations

import functools
from collections.abc import Callable

from torch import nn

from kdfl.types import KdflError, Task


def feature_dim(model: nn.Module, arch: str = "", who: str = "this algorithm") -> int:
    """``model.feature_dim``; a KdflError naming ``who`` for a model without the
    features/head split (:class:`kdfl.models.base.Decoupled`)."""
    dim = getattr(model, "feature_dim", None)
    if not isinstance(dim, int):
        raise KdflError(f"{who} needs models with features(x), head(z) and feature_dim "
                        f"(kdfl.models.base.Decoupled); architecture {arch or type(model).__name__!r} has none")
    return dim


@functools.lru_cache(maxsize=256)
def _arch_dim(build: Callable[[str], nn.Module], arch: str, who: str) -> int:
    return feature_dim(build(arch), arch, who)


def arch_feature_dim(task: Task, arch: str, who: str = "this algorithm") -> int:
    """The feature width of architecture ``arch`` in ``task`` (built once per task and
    architecture, with torch's global generator left untouched)."""
    import torch

    with torch.random.fork_rng(devices=[]):
        return _arch_dim(task.build_model, arch, who)
