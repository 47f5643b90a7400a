"""Tests for the features/head contract (:class:`kdfl.models.base.Decoupled`).

For every model family: ``forward == head(features)`` bit for bit, the shapes of
``features`` and ``activations``, the MLP's clear error, ``forward``'s flags, vmap over
``functional_call`` with flags, and that the split left initialisation and logits as they
were: fingerprints recorded from the pre-split code, plus frozen copies of the pre-split
classes that must give the same parameters (in order) and bit-identical logits.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

from kdfl.models import MODELS, build
from kdfl.models.base import SPATIAL_MODELS, Decoupled
from kdfl.models.cnn import CNN
from kdfl.models.compact import NUM_BLOCKS, DownBlock, ShuffleBlock, ShuffleNetV2, stage_channels
from kdfl.models.mlp import MLP, parse_hidden
from kdfl.models.resnet import BasicBlock, ResNetCifar, init_feddf, norm2d
from kdfl.models.vgg import VGG9
from kdfl.types import KdflError

NUM_CLASSES = 4
BATCH = 3


@dataclass(frozen=True)
class Case:
    """A model family at some options: how to build it and what its outputs look like.

    Attributes:
        make: ``make(input_shape, num_classes) -> Decoupled``.
        shape: one input's shape.
        feature_dim: the expected ``feature_dim``.
        maps: expected (C_i, *spatial_i) per activation, or None for no activations.
    """

    make: Callable[[tuple[int, ...], int], Decoupled]
    shape: tuple[int, ...]
    feature_dim: int
    maps: tuple[tuple[int, ...], ...] | None


CASES: dict[str, Case] = {
    "mlp-flat": Case(MLP, (60,), 128, None),
    "mlp-1d": Case(MLP, (1, 40), 128, None),
    "mlp-2d": Case(lambda s, c: MLP(s, c, hidden="32-16"), (1, 8, 8), 16, None),
    "mlp-linear": Case(lambda s, c: MLP(s, c, hidden=0), (2, 5), 10, None),  # features = flat input
    "cnn-1d": Case(CNN, (1, 40), 64, ((16, 20), (32, 10))),
    "cnn-2d": Case(CNN, (1, 8, 8), 64, ((16, 4, 4), (32, 2, 2))),
    "cnn-2d-32": Case(lambda s, c: CNN(s, c, width=4, hidden=8), (3, 32, 32), 8, ((4, 16, 16), (8, 8, 8))),
    "resnet8-bn": Case(ResNetCifar, (3, 16, 16), 64, ((16, 16, 16), (32, 8, 8), (64, 4, 4))),
    "resnet8-gn": Case(
        lambda s, c: ResNetCifar(s, c, norm="gn", width=8),
        (3, 16, 16),
        32,
        ((8, 16, 16), (16, 8, 8), (32, 4, 4)),
    ),
    "resnet20-none": Case(
        lambda s, c: ResNetCifar(s, c, depth=20, norm="none", width=4),
        (1, 8, 8),
        16,
        ((4, 8, 8), (8, 4, 4), (16, 2, 2)),
    ),
    "vgg9-small": Case(
        lambda s, c: VGG9(s, c, width=4, hidden=32, pool=2),
        (3, 16, 16),
        32,
        ((8, 8, 8), (16, 4, 4), (32, 2, 2)),
    ),
    "vgg9-8x8": Case(  # the last max-pool is skipped (a side would drop below 2)
        lambda s, c: VGG9(s, c, width=4, hidden=16, pool=1),
        (1, 8, 8),
        16,
        ((8, 4, 4), (16, 2, 2), (32, 2, 2)),
    ),
    "shufflenet": Case(ShuffleNetV2, (3, 16, 16), 1024, ((48, 8, 8), (96, 4, 4), (192, 2, 2), (1024, 2, 2))),
    "shufflenet-gn": Case(
        lambda s, c: ShuffleNetV2(s, c, width=0.5, norm="gn"),
        (1, 8, 8),
        1024,
        ((48, 4, 4), (96, 2, 2), (192, 1, 1), (1024, 1, 1)),
    ),
}


def _make(case_id: str, seed: int = 0) -> tuple[Decoupled, Tensor]:
    """A model of ``case_id`` built after ``manual_seed(seed)``, and a (B, *shape) input."""
    case = CASES[case_id]
    torch.manual_seed(seed)
    model = case.make(case.shape, NUM_CLASSES)
    x = torch.randn(BATCH, *case.shape, generator=torch.Generator().manual_seed(seed + 1))
    return model, x


# ---------------------------------------------------------------------------------------
# the contract


@pytest.mark.parametrize("case_id", list(CASES))
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_logits_are_head_of_features(case_id: str, train: bool) -> None:
    model, x = _make(case_id)
    model.train(train)  # train: BN uses batch statistics (dropout is 0 by default)
    z = model.features(x)
    assert isinstance(model, Decoupled)
    assert z.shape == (BATCH, model.feature_dim) and model.feature_dim == CASES[case_id].feature_dim
    assert model.classifier.in_features == model.feature_dim  # head = the last Linear only
    logits = model(x)
    assert isinstance(logits, Tensor) and logits.shape == (BATCH, NUM_CLASSES)
    assert torch.equal(logits, model.head(z))
    assert torch.equal(model.head(z), model.classifier(z))


@pytest.mark.parametrize("case_id", [c for c in CASES if CASES[c].maps is not None])
def test_activation_shapes(case_id: str) -> None:
    model, x = _make(case_id)
    expected = CASES[case_id].maps
    assert model.has_activations and expected is not None
    maps = model.activations(x)
    assert [tuple(m.shape) for m in maps] == [(BATCH, *shape) for shape in expected]
    # Grad-CAM needs d logits / d map for the maps of the same pass: they are in the graph
    out = model(x, activations=True)
    for m in out["activations"]:
        m.retain_grad()
    out["logits"][:, 0].sum().backward()
    assert all(m.grad is not None and m.grad.shape == m.shape for m in out["activations"])


@pytest.mark.parametrize("case_id", [c for c in CASES if c.startswith("mlp")])
def test_mlp_has_no_activations(case_id: str) -> None:
    model, x = _make(case_id)
    assert not model.has_activations
    for call in (lambda: model.activations(x), lambda: model(x, activations=True)):
        with pytest.raises(KdflError, match="no spatial activations") as err:
            call()
        assert all(name in str(err.value) for name in SPATIAL_MODELS)
    assert set(model(x, features=True)) == {"logits", "features"}  # features still work


@pytest.mark.parametrize("case_id", list(CASES))
def test_forward_flags_match_separate_calls(case_id: str) -> None:
    model, x = _make(case_id)
    model.eval()  # running statistics: separate calls see the same normalisation
    logits = model(x)
    assert isinstance(model(x, features=False, activations=False), Tensor)
    only = model(x, features=True)
    assert set(only) == {"logits", "features"}
    assert torch.equal(only["logits"], logits) and torch.equal(only["features"], model.features(x))
    assert torch.equal(only["logits"], model.head(only["features"]))
    if not model.has_activations:
        return
    both = model(x, features=True, activations=True)
    assert set(both) == {"logits", "features", "activations"}
    assert torch.equal(both["logits"], logits) and torch.equal(both["features"], only["features"])
    acts = model(x, activations=True)
    assert set(acts) == {"logits", "activations"}
    for got in (both["activations"], acts["activations"]):
        expected = model.activations(x)
        assert len(got) == len(expected) and all(
            torch.equal(a, b) for a, b in zip(got, expected, strict=True)
        )


@pytest.mark.parametrize("case_id", ["resnet8-bn", "shufflenet"])
def test_flags_share_one_pass_in_train_mode(case_id: str) -> None:
    """In train mode BN running stats move once per pass: the flags must not add passes."""
    model, x = _make(case_id)
    model.train()
    model(x, features=True, activations=True)
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert bn.num_batches_tracked is not None and int(bn.num_batches_tracked) == 1


@pytest.mark.parametrize("name", list(MODELS))
def test_every_registry_model_is_decoupled(name: str) -> None:
    shape = next(s for s in [(3, 16, 16), (1, 40), (60,)] if MODELS[name].supports(s))
    model = build(name, shape, NUM_CLASSES)
    assert isinstance(model, Decoupled) and model.has_activations == (name in SPATIAL_MODELS)
    assert model.features(torch.randn(2, *shape)).shape == (2, model.feature_dim)


# ---------------------------------------------------------------------------------------
# vmap + functional_call with flags (the vectorized executor's path)


@pytest.mark.parametrize("case_id", ["mlp-flat", "mlp-2d", "cnn-1d", "cnn-2d", "cnn-2d-32"])
def test_vmap_functional_call_with_flags(case_id: str) -> None:
    torch.manual_seed(0)
    case = CASES[case_id]
    models = [case.make(case.shape, NUM_CLASSES) for _ in range(3)]
    params, buffers = stack_module_state(models)
    base = models[0]
    x = torch.randn(5, *case.shape)
    spatial = base.has_activations

    def run(p: dict[str, Tensor], b: dict[str, Tensor], inputs: Tensor) -> dict[str, Tensor]:
        return functional_call(base, (p, b), (inputs,), {"features": True, "activations": spatial})

    out = vmap(run, in_dims=(0, 0, None))(params, buffers, x)
    assert out["logits"].shape == (3, 5, NUM_CLASSES) and out["features"].shape == (3, 5, base.feature_dim)
    for i, model in enumerate(models):
        torch.testing.assert_close(out["logits"][i], model(x), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out["features"][i], model.features(x), rtol=1e-5, atol=1e-6)
        if spatial:
            for got, expected in zip(out["activations"], model.activations(x), strict=True):
                torch.testing.assert_close(got[i], expected, rtol=1e-5, atol=1e-6)
    # and just features, as in the brief: vmap(functional_call(model, params, (x,), {"features": True}))
    feats = vmap(lambda p, b: functional_call(base, (p, b), (x,), {"features": True}))(params, buffers)
    torch.testing.assert_close(feats["features"], out["features"])


# ---------------------------------------------------------------------------------------
# the split changed neither initialisation nor logits


@dataclass(frozen=True)
class Frozen:
    """A model's fingerprint, recorded by running the code from before the split.

    Attributes:
        count: number of parameter elements.
        total: float64 sum of the flattened parameter vector (in ``parameters()`` order).
        weighted: float64 sum of flat[i] * i / count, which moves if the order changes.
        values: flat[0], flat[count // 3], flat[2 * count // 3], flat[-1].
        logits: eval-mode logits of a fixed (2, *shape) input, flattened (2 x 4).
    """

    count: int
    total: float
    weighted: float
    values: tuple[float, ...]
    logits: tuple[float, ...]


# every model family at its registry defaults (the classes' defaults), 4 classes, seed 2024
FROZEN_CASES: dict[str, tuple[Callable[[tuple[int, ...], int], nn.Module], tuple[int, ...]]] = {
    "mlp-flat": (MLP, (60,)),
    "mlp-2d": (MLP, (1, 8, 8)),
    "cnn-2d": (CNN, (1, 8, 8)),
    "cnn-1d": (CNN, (1, 40)),
    "resnet8-bn": (ResNetCifar, (3, 16, 16)),
    "resnet8-gn": (lambda s, c: ResNetCifar(s, c, norm="gn"), (3, 16, 16)),
    "vgg9": (VGG9, (3, 16, 16)),
    "shufflenet": (ShuffleNetV2, (3, 16, 16)),
}

# fmt: off
FROZEN: dict[str, Frozen] = {
    "mlp-flat": Frozen(
        8324, -10.00164692723024, -5.49506175453317,
        (0.008189002051949501, -0.03435378521680832, -0.1227988675236702, 0.033948179334402084),
        (-0.15768419206142426, -0.09928005933761597, -0.1001579761505127, 0.03506627306342125,
         -0.29655128717422485, 0.01822761818766594, 0.10090460628271103, 0.045420464128255844),
    ),
    "mlp-2d": Frozen(
        8836, -12.408264009314735, -7.6572819354862816,
        (0.007928967475891113, 0.0002784132957458496, -0.07507070899009705, -0.08443583548069),
        (-0.3164079785346985, -0.44685766100883484, -0.07114052772521973, -0.365139365196228,
         -0.06190921366214752, 0.05926893278956413, 0.21427518129348755, -0.42061012983322144),
    ),
    "cnn-2d": Frozen(
        13316, -16.7975189106819, -10.526766162916594,
        (0.02114391326904297, -0.041562557220458984, -0.04554926976561546, -0.03466588258743286),
        (-0.03941681981086731, -0.14349442720413208, 0.013519428670406342, 0.06381561607122421,
         -0.027059406042099, -0.09262119233608246, 0.05078933760523796, 0.025386951863765717),
    ),
    "cnn-1d": Frozen(
        23492, -10.360202295158388, -1.6902183481567354,
        (0.028367536142468452, -0.0067093768157064915, 0.047070104628801346, -0.02372656762599945),
        (0.026245400309562683, -0.07540199905633926, 0.06719984859228134, -0.011898375116288662,
         0.00020172074437141418, -0.050030022859573364, 0.11933550238609314, -0.0013691261410713196),
    ),
    "resnet8-bn": Frozen(
        77652, 312.3377793246623, 159.0712076597786,
        (-0.05526476725935936, -0.056281328201293945, -0.13487985730171204, 0.11885751783847809),
        (-0.17843309044837952, 0.2311922013759613, 0.1145893931388855, 0.16581901907920837,
         -0.1432105004787445, 0.31243056058883667, 0.1328151822090149, 0.25118112564086914),
    ),
    "resnet8-gn": Frozen(
        77652, 312.3377793246623, 159.0712076597786,
        (-0.05526476725935936, -0.056281328201293945, -0.13487985730171204, 0.11885751783847809),
        (-0.33151334524154663, 0.48403027653694153, 0.21570459008216858, 0.3272930979728699,
         -0.1410951018333435, 0.5841386318206787, 0.2852466106414795, 0.40837329626083374),
    ),
    "vgg9": Frozen(
        3488452, -17.4080636362784, 5.7224354443799115,
        (0.012207443825900555, -0.01034042239189148, -0.00819849967956543, 0.037773676216602325),
        (0.017788637429475784, -0.03105996549129486, 0.014288777485489845, 0.04725812375545502,
         0.017868822440505028, -0.03099154122173786, 0.01407887414097786, 0.04696730524301529),
    ),
    "shufflenet": Frozen(
        345892, 3880.871686865127, 1486.1132830507267,
        (0.012207443825900555, -0.0032625743187963963, 0.002737379865720868, 0.008401453495025635),
        (0.011443552561104298, -0.009546037763357162, -0.007170993369072676, 0.008414797484874725,
         0.01144348829984665, -0.009552409872412682, -0.0071665626019239426, 0.008410079404711723),
    ),
}
# fmt: on


def _flat_params(model: nn.Module) -> Tensor:
    """(P,) float64: every parameter, flattened, in ``parameters()`` (= creation) order."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()


@pytest.mark.parametrize("case_id", list(FROZEN))
def test_init_and_logits_match_pre_split_fingerprint(case_id: str) -> None:
    make, shape = FROZEN_CASES[case_id]
    frozen = FROZEN[case_id]
    torch.manual_seed(2024)
    model = make(shape, NUM_CLASSES)
    flat = _flat_params(model)
    count = flat.numel()
    assert count == frozen.count
    picks = flat[[0, count // 3, 2 * count // 3, count - 1]]
    assert picks.tolist() == list(frozen.values)  # single weights: exact
    # sums in float64 of float32 weights: equal up to summation order
    assert math.isclose(flat.sum().item(), frozen.total, rel_tol=1e-12, abs_tol=1e-9)
    weights = torch.arange(count, dtype=torch.float64) / count
    assert math.isclose((flat * weights).sum().item(), frozen.weighted, rel_tol=1e-12, abs_tol=1e-9)
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(1234))
    with torch.no_grad():
        logits = model.eval()(x).flatten()
    # bit-identical on the machine that recorded them; a small tolerance keeps other CPUs'
    # conv kernels (another summation order) from failing the test (bit identity against
    # the frozen classes is checked below, on whatever machine runs the tests)
    torch.testing.assert_close(logits, torch.tensor(frozen.logits), rtol=1e-5, atol=1e-6)


# Frozen copies of the pre-split classes (verbatim forward passes and creation order; the
# option checks are left out). Blocks, norms and the FedDF init are unchanged and shared.


class LegacyMLP(nn.Module):
    def __init__(
        self, input_shape: tuple[int, ...], num_classes: int, hidden: int | str | tuple[int, ...] = (128,)
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten(start_dim=1)]
        width = math.prod(input_shape)
        for size in parse_hidden(hidden):
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class LegacyCNN(nn.Module):
    def __init__(
        self, input_shape: tuple[int, ...], num_classes: int, width: int = 16, hidden: int = 64
    ) -> None:
        super().__init__()
        two_d = len(input_shape) == 3
        conv = nn.Conv2d if two_d else nn.Conv1d
        pool = nn.MaxPool2d if two_d else nn.MaxPool1d
        kernel = 3 if two_d else 5
        channels, spatial = input_shape[0], list(input_shape[1:])
        layers: list[nn.Module] = []
        for out in (width, 2 * width):
            layers += [conv(channels, out, kernel, padding=kernel // 2), nn.ReLU()]
            channels = out
            if min(spatial) // 2 >= 2:
                layers.append(pool(2))
                spatial = [s // 2 for s in spatial]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(start_dim=1),
            nn.Linear(channels * math.prod(spatial), hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class LegacyResNetCifar(nn.Module):
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
        init_feddf(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.classifier(self.avgpool(x).flatten(1))


class LegacyVGG9(nn.Module):
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
        return self.classifier(self.avgpool(self.features(x)))


class LegacyShuffleNetV2(nn.Module):
    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        width: float = 0.5,
        norm: str = "bn",
        groups: int = 2,
    ) -> None:
        super().__init__()
        *stages, last = stage_channels(float(width))
        stem = 24
        self.stem = nn.Sequential(
            nn.Conv2d(input_shape[0], stem, 3, padding=1, bias=False), norm2d(norm, stem, groups), nn.ReLU()
        )
        layers: list[nn.Module] = []
        in_channels = stem
        for out, blocks in zip(stages, NUM_BLOCKS, strict=True):
            layers.append(DownBlock(in_channels, out, norm, groups))
            layers += [ShuffleBlock(out, norm, groups) for _ in range(blocks)]
            in_channels = out
        self.stages = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.Conv2d(in_channels, last, 1, bias=False), norm2d(norm, last, groups), nn.ReLU()
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(last, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.head(self.stages(self.stem(x)))
        return self.classifier(self.avgpool(x).flatten(1))


# (new factory, legacy factory, input shape), both called as f(input_shape, num_classes)
LEGACY: dict[str, tuple[Callable[..., nn.Module], Callable[..., nn.Module], tuple[int, ...]]] = {
    "mlp-flat": (MLP, LegacyMLP, (60,)),
    "mlp-2d-deep": (
        lambda s, c: MLP(s, c, hidden="32-16"),
        lambda s, c: LegacyMLP(s, c, hidden="32-16"),
        (1, 8, 8),
    ),
    "mlp-linear": (lambda s, c: MLP(s, c, hidden=0), lambda s, c: LegacyMLP(s, c, hidden=0), (2, 5)),
    "cnn-1d": (CNN, LegacyCNN, (1, 40)),
    "cnn-2d": (CNN, LegacyCNN, (1, 8, 8)),
    "cnn-2d-32": (CNN, LegacyCNN, (3, 32, 32)),
    "resnet8-bn": (ResNetCifar, LegacyResNetCifar, (3, 16, 16)),
    "resnet8-gn": (
        lambda s, c: ResNetCifar(s, c, norm="gn"),
        lambda s, c: LegacyResNetCifar(s, c, norm="gn"),
        (3, 16, 16),
    ),
    "resnet20-none": (
        lambda s, c: ResNetCifar(s, c, depth=20, norm="none", width=8),
        lambda s, c: LegacyResNetCifar(s, c, depth=20, norm="none", width=8),
        (1, 8, 8),
    ),
    "vgg9": (VGG9, LegacyVGG9, (3, 16, 16)),
    "vgg9-8x8-dropout": (
        lambda s, c: VGG9(s, c, width=8, hidden=64, pool=1, dropout=0.3),
        lambda s, c: LegacyVGG9(s, c, width=8, hidden=64, pool=1, dropout=0.3),
        (1, 8, 8),
    ),
    "shufflenet": (ShuffleNetV2, LegacyShuffleNetV2, (3, 16, 16)),
    "shufflenet-gn-1": (
        lambda s, c: ShuffleNetV2(s, c, width=1.0, norm="gn"),
        lambda s, c: LegacyShuffleNetV2(s, c, width=1.0, norm="gn"),
        (3, 8, 8),
    ),
}


@pytest.mark.parametrize("case_id", list(LEGACY))
def test_same_weights_and_bit_identical_logits_as_pre_split_classes(case_id: str) -> None:
    make, make_legacy, shape = LEGACY[case_id]
    torch.manual_seed(11)
    model = make(shape, NUM_CLASSES)
    torch.manual_seed(11)
    legacy = make_legacy(shape, NUM_CLASSES)
    params, old = list(model.parameters()), list(legacy.parameters())
    assert len(params) == len(old)
    assert all(p.shape == q.shape and torch.equal(p, q) for p, q in zip(params, old, strict=True))
    assert [b.shape for b in model.buffers()] == [b.shape for b in legacy.buffers()]
    x = torch.randn(BATCH, *shape)
    for train in (True, False):
        model.train(train)
        legacy.train(train)
        twin = copy.deepcopy(model)  # takes the flagged pass, so BN statistics move once per model
        # same dropout masks: the RNG is reseeded before each pass
        torch.manual_seed(5)
        logits = model(x)
        torch.manual_seed(5)
        expected = legacy(x)
        assert torch.equal(logits, expected)
        torch.manual_seed(5)
        assert torch.equal(twin(x, features=True, activations=twin.has_activations)["logits"], expected)
    # BN running statistics moved the same way
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), legacy.buffers(), strict=True))
