"""Tests for the model zoo: shapes, errors, determinism, options and vmap-ability."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from kdfl.models import MODELS, build, describe, param_count, parse_arch
from kdfl.types import KdflError

SHAPES = [(1, 8, 8), (1, 40), (1, 28, 28), (3, 32, 32), (60,)]
CASES = [(name, shape) for name in MODELS for shape in SHAPES]


@pytest.mark.parametrize(("name", "shape"), CASES, ids=[f"{n}-{'x'.join(map(str, s))}" for n, s in CASES])
def test_every_model_every_shape(name: str, shape: tuple[int, ...]) -> None:
    if not MODELS[name].supports(shape):
        with pytest.raises(KdflError) as err:
            build(name, shape, 10)
        message = str(err.value)
        assert name in message and str(shape) in message and "mlp" in message  # names what fits
        return
    torch.manual_seed(0)
    model = build(name, shape, 10)
    x = torch.randn(3, *shape)
    out = model(x)
    assert out.shape == (3, 10)
    assert torch.isfinite(out).all()
    assert param_count(model) > 0
    out.logsumexp(dim=1).mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_resnet_on_1d_input_message() -> None:
    with pytest.raises(KdflError, match=r"2-D images.*\(1, 40\).*mlp, linear, cnn"):
        build("resnet8", (1, 40), 10)
    with pytest.raises(KdflError, match=r"cnn.*\(60,\).*mlp"):
        build("cnn", (60,), 10)


def test_resnet8_matches_feddf_parameter_count() -> None:
    assert param_count(build("resnet8", (3, 32, 32), 10)) == 78_042
    assert param_count(build("resnet8", (3, 32, 32), 100)) == 83_892


def test_vgg9_matches_fedma_parameter_count() -> None:
    assert param_count(build("vgg9", (3, 32, 32), 10)) == 3_491_530


def test_resnet_feddf_init() -> None:
    torch.manual_seed(0)
    model = build("resnet20", (3, 32, 32), 10, width=32)
    conv = model.layer3[0].conv2
    expected = (2.0 / (3 * 3 * conv.out_channels)) ** 0.5
    assert conv.weight.std().item() == pytest.approx(expected, rel=0.05)
    assert all(
        torch.equal(m.weight, torch.ones_like(m.weight)) and torch.equal(m.bias, torch.zeros_like(m.bias))
        for m in model.modules()
        if isinstance(m, nn.BatchNorm2d)
    )


@pytest.mark.parametrize("name", list(MODELS))
def test_same_seed_same_weights(name: str) -> None:
    shape = (1, 8, 8)
    torch.manual_seed(7)
    a = build(name, shape, 10).state_dict()
    torch.manual_seed(7)
    b = build(name, shape, 10).state_dict()
    torch.manual_seed(8)
    c = build(name, shape, 10).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_parse_arch() -> None:
    assert parse_arch("resnet8:norm=gn,width=32") == ("resnet8", {"norm": "gn", "width": 32})
    assert parse_arch(" MLP ") == ("mlp", {})
    assert parse_arch("x:a=1.5,b=true,c=False,d=none,e=128-64") == (
        "x",
        {"a": 1.5, "b": True, "c": False, "d": "none", "e": "128-64"},
    )
    with pytest.raises(KdflError, match="not key=value"):
        parse_arch("resnet8:gn")
    with pytest.raises(KdflError, match="no model name"):
        parse_arch(":width=3")
    with pytest.raises(KdflError, match="needs one value after '='"):
        parse_arch("resnet8:width=")
    with pytest.raises(KdflError, match="gives width twice"):
        parse_arch("resnet8:width=8,width=16")


def test_arch_string_options_are_applied() -> None:
    gn = build("resnet8:norm=gn", (3, 32, 32), 10)
    kinds = {type(m) for m in gn.modules()}
    assert nn.GroupNorm in kinds and nn.BatchNorm2d not in kinds
    assert all(m.num_groups == 2 for m in gn.modules() if isinstance(m, nn.GroupNorm))
    gn4 = build("resnet8:norm=gn,groups=4", (3, 32, 32), 10)
    assert all(m.num_groups == 4 for m in gn4.modules() if isinstance(m, nn.GroupNorm))
    bare = build("resnet8:norm=none", (3, 32, 32), 10)
    assert not any(isinstance(m, (nn.GroupNorm, nn.BatchNorm2d)) for m in bare.modules())
    base = param_count(build("resnet8", (3, 32, 32), 10))
    assert param_count(build("resnet8:width=32", (3, 32, 32), 10)) > base
    # keyword options override the arch string
    assert param_count(build("resnet8:width=32", (3, 32, 32), 10, width=16)) == base
    assert param_count(build("mlp:hidden=32", (60,), 10)) == 60 * 32 + 32 + 32 * 10 + 10
    assert param_count(build("mlp:hidden=32-16", (60,), 10)) == 60 * 32 + 32 + 32 * 16 + 16 + 16 * 10 + 10
    assert param_count(build("mlp", (60,), 10, hidden=[32, 16])) == param_count(
        build("mlp", (60,), 10, hidden=(32, 16))
    )
    assert param_count(build("mlp", (60,), 3, hidden=0)) == 60 * 3 + 3
    assert param_count(build("cnn:width=8", (1, 8, 8), 10)) < param_count(build("cnn", (1, 8, 8), 10))
    small = param_count(build("shufflenet", (3, 32, 32), 10))
    assert param_count(build("shufflenet:width=1", (3, 32, 32), 10)) > small
    assert param_count(build("shufflenet:width=0.75", (3, 32, 32), 10)) > small
    sgn = build("shufflenet:norm=gn", (1, 8, 8), 10)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in sgn.modules())
    assert param_count(build("vgg9:pool=1", (1, 8, 8), 10)) < param_count(build("vgg9", (1, 8, 8), 10))


def test_unknown_model_and_option_errors() -> None:
    with pytest.raises(KdflError, match=r"unknown model 'resnet9'\. Did you mean 'resnet8'.*Available: cnn, linear, mlp"):
        build("resnet9", (3, 32, 32), 10)
    with pytest.raises(KdflError, match=r"model 'resnet8' has no option 'depth'; allowed: norm='bn', width=16, groups=2"):
        build("resnet8:depth=20", (3, 32, 32), 10)
    with pytest.raises(KdflError, match=r"no option 'widht'.*did you mean 'width'"):
        build("cnn", (1, 8, 8), 10, widht=3)
    with pytest.raises(KdflError, match=r"norm='batch'.*bn, gn, none"):
        build("resnet8:norm=batch", (3, 32, 32), 10)
    with pytest.raises(KdflError, match=r"width must be an integer like 16, got 'wide'"):
        build("resnet8:width=wide", (3, 32, 32), 10)
    with pytest.raises(KdflError, match=r"groups=3 must divide"):
        build("resnet8:norm=gn,groups=3", (3, 32, 32), 10)
    with pytest.raises(KdflError, match=r"'hidden'"):
        build("mlp:hidden=abc", (60,), 10)
    with pytest.raises(KdflError, match=r"model 'vgg9': dropout must be a number like 0.0, got True"):
        build("vgg9:dropout=true", (3, 32, 32), 10)
    with pytest.raises(KdflError, match="num_classes"):
        build("mlp", (60,), 0)


def test_describe() -> None:
    state = torch.get_rng_state()
    rows = describe((1, 8, 8), 10)
    assert torch.equal(state, torch.get_rng_state())  # no random draws
    assert [r[0] for r in rows] == list(MODELS)
    expected = {name: param_count(build(name, (1, 8, 8), 10)) for name in MODELS}
    for name, count, text in rows:
        assert count == expected[name] and text
    flat = dict((n, c) for n, c, _ in describe((60,), 10))
    assert flat["mlp"] == 9098 and flat["linear"] == 610  # 60 * 10 + 10
    assert all(flat[n] is None for n in MODELS if n not in ("mlp", "linear"))
    signal = dict((n, c) for n, c, _ in describe((1, 40), 10))
    assert signal["cnn"] and signal["resnet8"] is None


@pytest.mark.parametrize(
    ("name", "shape"),
    [("mlp", (1, 8, 8)), ("mlp", (60,)), ("cnn", (1, 8, 8)), ("cnn", (1, 40)), ("cnn", (3, 32, 32))],
)
def test_functional_call_vmap_matches_modules(name: str, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    models = [build(name, shape, 10) for _ in range(3)]
    params, buffers = stack_module_state(models)
    base = models[0]  # functional_call swaps in the stacked params
    x = torch.randn(5, *shape)

    def logits(p: dict, b: dict, inputs: torch.Tensor) -> torch.Tensor:
        return functional_call(base, (p, b), (inputs,))

    stacked = vmap(logits, in_dims=(0, 0, None))(params, buffers, x)  # (3, 5, 10)
    expected = torch.stack([m(x) for m in models])
    assert stacked.shape == (3, 5, 10)
    torch.testing.assert_close(stacked, expected, rtol=1e-5, atol=1e-6)
    # per-model inputs too (in_dims=0 on x), as an executor batching different clients' data
    xs = torch.randn(3, 4, *shape)
    per_client = vmap(logits)(params, buffers, xs)
    torch.testing.assert_close(
        per_client, torch.stack([m(xi) for m, xi in zip(models, xs, strict=True)]), rtol=1e-5, atol=1e-6
    )
