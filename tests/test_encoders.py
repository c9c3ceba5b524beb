"""The shared 2D slice encoder and its registry."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from monai.networks.nets import ResNet
from monai.networks.nets.resnet import ResNetBlock, ResNetBottleneck

from medssl.models.encoders import ResNetEncoder, available_encoders, create_encoder, register_encoder


def _size(name: str) -> int:
    return 32 if name == "resnet50" else 64  # resnet50 is slow on CPU


@pytest.mark.parametrize("name", available_encoders())
def test_every_registered_encoder_runs_forward_and_backward(name):
    torch.manual_seed(0)
    enc = create_encoder(name)
    size = _size(name)
    out = enc(torch.randn(2, 1, size, size))
    assert out.shape == (2, enc.out_dim)
    expected = 2048 if name == "resnet50" else 512
    assert enc.out_dim == expected
    (out * torch.randn_like(out)).sum().backward()
    missing = [n for n, p in enc.named_parameters() if p.grad is None]
    assert not missing, f"no gradient reached {missing}"
    assert all(torch.isfinite(p.grad).all() for p in enc.parameters())


def test_registry_lists_resnets_and_rejects_bad_names():
    assert {"resnet10", "resnet18", "resnet34", "resnet50"} <= set(available_encoders())
    with pytest.raises(ValueError, match="resnet18"):  # the message lists the available names
        create_encoder("vit_huge")
    with pytest.raises(ValueError, match="already registered"):
        register_encoder("resnet18")(ResNetEncoder)
    with pytest.raises(ValueError, match="name"):
        register_encoder("")


@pytest.mark.parametrize(
    ("kwargs", "arg"),
    [
        ({"depth": 101}, "depth"),
        ({"in_channels": 0}, "in_channels"),
        ({"stem_stride": 0}, "stem_stride"),
        ({"out_dim": 0}, "out_dim"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        ResNetEncoder(**kwargs)


def test_out_dim_projection_and_kwargs_pass_through_registry():
    enc = create_encoder("resnet10", in_channels=3, out_dim=64, max_pool=True, stem_kernel=3)
    assert isinstance(enc, ResNetEncoder) and enc.out_dim == 64 and enc.proj is not None
    assert enc(torch.randn(2, 3, 16, 16)).shape == (2, 64)
    same = ResNetEncoder(depth=10, out_dim=512)
    assert same.proj is None and same.out_dim == 512
    maps = same.stages(torch.randn(1, 1, 96, 96))
    assert [tuple(m.shape[1:]) for m in maps] == [(64, 48, 48), (128, 24, 24), (256, 12, 12), (512, 6, 6)]


def test_multiscale_pools_normalises_each_stage_then_projects():
    torch.manual_seed(0)
    enc = ResNetEncoder(depth=10, multiscale=True, out_dim=32).eval()
    assert enc.out_dim == 32
    assert ResNetEncoder(depth=10, multiscale=True).out_dim == 512
    captured: list[torch.Tensor] = []
    assert enc.proj is not None
    enc.proj.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    x = torch.randn(2, 1, 48, 48)
    with torch.no_grad():
        out = enc(x)
        stages = enc.stages(x)
    assert out.shape == (2, 32)
    concat = captured[0]
    assert concat.shape == (2, sum(enc.stage_channels)) == (2, 64 + 128 + 256 + 512)
    chunks = concat.split(list(enc.stage_channels), dim=1)
    for chunk, fmap in zip(chunks, stages, strict=True):
        torch.testing.assert_close(chunk.norm(dim=1), torch.ones(2))
        torch.testing.assert_close(chunk, F.normalize(fmap.mean(dim=(2, 3)), dim=1))


@pytest.mark.parametrize(
    ("depth", "block", "layers"),
    [(10, ResNetBlock, [1, 1, 1, 1]), (50, ResNetBottleneck, [3, 4, 6, 3])],
)
def test_backbone_state_dict_loads_strictly_into_plain_monai_resnet(depth, block, layers):
    torch.manual_seed(0)
    enc = ResNetEncoder(depth=depth, in_channels=1, stem_kernel=5, stem_stride=2).eval()
    assert all(k.startswith("backbone.") for k in enc.state_dict())  # no projection: backbone only
    weights = {k.removeprefix("backbone."): v for k, v in enc.state_dict().items()}
    plain = ResNet(
        block=block,
        layers=layers,
        block_inplanes=[64, 128, 256, 512],
        spatial_dims=2,
        n_input_channels=1,
        conv1_t_size=5,
        conv1_t_stride=2,
        no_max_pool=True,
        feed_forward=False,
    ).eval()
    plain.load_state_dict(weights, strict=True)
    ResNet(**enc.backbone_config).load_state_dict(weights, strict=True)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(enc(x), plain(x))


def test_channels_last_matches_contiguous():
    torch.manual_seed(0)
    enc = ResNetEncoder(depth=18, multiscale=True).eval()
    x = torch.randn(2, 1, 40, 56)
    with torch.no_grad():
        ref = enc(x)
        torch.testing.assert_close(enc(x.to(memory_format=torch.channels_last)), ref, atol=1e-5, rtol=1e-4)
        enc = enc.to(memory_format=torch.channels_last)
        torch.testing.assert_close(enc(x.to(memory_format=torch.channels_last)), ref, atol=1e-5, rtol=1e-4)
