"""Image models: scale invariance of the SI group, frozen heads, structure and sizes."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lrfeatures.config import ModelConfig
from lrfeatures.errors import ConfigError
from lrfeatures.models import convnet, resnet  # noqa: F401  (registers the models)
from lrfeatures.models.convnet import SIConvNet
from lrfeatures.models.registry import MODELS, build_model
from lrfeatures.models.resnet import PreActResNet18

# eps is tiny so that scaling the weights by c changes nothing but rounding: BN's eps is the
# one (small, deliberate) deviation from exact scale invariance, checked separately below.
TINY_EPS = 1e-30


def small_nets() -> dict[str, nn.Module]:
    """Float64 SI nets narrow enough for fast property tests."""
    torch.manual_seed(0)
    return {"convnet": SIConvNet(3, 16, width=4, depth=3, num_outputs=10, bn_eps=TINY_EPS).double(),
            "resnet": PreActResNet18(3, width=4, num_outputs=10, si=True, bn_eps=TINY_EPS).double()}


NETS = small_nets()
# 16x16 inputs keep these fast; invariance does not depend on the image size.
IMAGES = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def scaled_copy(model: nn.Module, c: float) -> nn.Module:
    """A copy with every SI parameter multiplied by c."""
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for p in clone.si_parameters():
            p.mul_(c)
    return clone


def eval_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Eval-mode logits after BN statistics are recomputed from x with a cumulative average."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # cumulative: the running stats are exactly this data's stats
            m.reset_running_stats()
    model.train()
    with torch.no_grad():
        model(x)
    model.eval()
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("name", ["convnet", "resnet"])
@settings(max_examples=10, deadline=None)
@given(c=st.floats(0.1, 10.0))
def test_train_mode_output_is_invariant_to_scaling_the_si_group(name, c):
    model = NETS[name].train()
    with torch.no_grad():
        base = model(IMAGES)
        scaled = scaled_copy(model, c).train()(IMAGES)
    assert torch.allclose(scaled, base, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", ["convnet", "resnet"])
@settings(max_examples=10, deadline=None)
@given(c=st.floats(0.1, 10.0))
def test_eval_mode_output_is_invariant_once_bn_stats_follow_the_weights(name, c):
    # In eval mode BN uses stored statistics. They are a function of the weights, so each model
    # gets its own, computed on the same data (as after SWA); then the outputs must agree.
    base = eval_logits(scaled_copy(NETS[name], 1.0), IMAGES)
    scaled = eval_logits(scaled_copy(NETS[name], c), IMAGES)
    assert torch.allclose(scaled, base, rtol=1e-8, atol=1e-8)


def test_scaling_one_layer_alone_does_change_the_output():
    # Only the joint group is SI in the ResNet: scaling one residual-branch conv alone is not.
    model = scaled_copy(NETS["resnet"], 1.0).train()
    with torch.no_grad():
        base = model(IMAGES)
        model.blocks[0].conv2.weight.mul_(3.0)
        assert not torch.allclose(model(IMAGES), base, rtol=1e-3)


@pytest.mark.parametrize("name", ["convnet", "resnet"])
def test_gradient_is_orthogonal_to_the_si_group_and_scales_as_one_over_norm(name):
    labels = torch.arange(8) % 10
    grads = {}
    for c in (1.0, 4.0):
        model = scaled_copy(NETS[name], c).train()
        F.cross_entropy(model(IMAGES), labels).backward()
        theta = torch.cat([p.detach().flatten() for p in model.si_parameters()])
        grads[c] = torch.cat([p.grad.flatten() for p in model.si_parameters()])
        assert abs(float(grads[c] @ theta)) < 1e-8 * float(grads[c].norm() * theta.norm())
    assert torch.allclose(grads[4.0] * 4.0, grads[1.0], rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("name", ["convnet-si", "resnet18-si"])
def test_registered_si_models_with_default_eps_are_nearly_invariant(name):
    model = build_model(ModelConfig(name=name, width=8, depth=3), (3, 32, 32), 10, seed=0).train()
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = model(x)
        scaled = scaled_copy(model, 2.0)(x)
    assert torch.allclose(scaled, base, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name", ["convnet-si", "resnet18-si"])
def test_si_structure_frozen_head_and_no_biases(name):
    model = build_model(ModelConfig(name=name, width=8, depth=3), (3, 32, 32), 10, seed=0)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(m.bias is None for m in convs) and all(not m.affine for m in bns)
    assert {id(p) for p in model.si_parameters()} == {id(m.weight) for m in convs}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in model.si_parameters()}
    assert model.head.bias is None and not model.head.weight.requires_grad
    assert float(model.head.weight.norm()) == pytest.approx(10.0, rel=1e-6)


def test_resnet_has_a_bn_before_each_shortcut_conv_and_a_final_bn():
    model = build_model(ModelConfig(name="resnet18-si", width=8), (3, 32, 32), 10, seed=0)
    downsampling = [b for b in model.blocks if b.shortcut_conv is not None]
    assert len(downsampling) == 3
    assert all(isinstance(b.shortcut_bn, nn.BatchNorm2d) and not b.shortcut_bn.affine for b in downsampling)
    assert [b.conv1.stride[0] for b in model.blocks] == [1, 1, 2, 1, 2, 1, 2, 1]
    assert [b.conv2.out_channels for b in model.blocks] == [8, 8, 16, 16, 32, 32, 64, 64]
    assert isinstance(model.final_bn, nn.BatchNorm2d) and not model.final_bn.affine


def convnet_conv_params(c: int) -> int:
    """3c·9 (stem) + 9·(c·2c + 2c·4c + 4c·8c): conv weights of the SPEC ConvNet."""
    return 9 * (3 * c + 42 * c * c)


def resnet_conv_params(k: int) -> int:
    """Stem 27k plus stages 36k², 128k², 512k², 2048k² (3x3 convs and 1x1 shortcuts)."""
    return 27 * k + 2724 * k * k


def test_parameter_counts_and_initial_norms_match_the_spec():
    cnn = build_model(ModelConfig(name="convnet-si", width=32, depth=3), (3, 32, 32), 10, seed=0)
    si = cnn.si_parameters()
    assert sum(p.numel() for p in si) == convnet_conv_params(32) == 387_936
    assert cnn.head.weight.shape == (10, 256)
    # SPEC ρ is "about the total norm at the default initialization": 12 and 28.
    assert 11.5 < float(torch.cat([p.detach().flatten() for p in si]).norm()) < 13.5
    res = build_model(ModelConfig(name="resnet18-si", width=32), (3, 32, 32), 100, seed=0)
    si = res.si_parameters()
    assert sum(p.numel() for p in si) == resnet_conv_params(32) == 2_790_240
    assert res.head.weight.shape == (100, 256)
    assert 27.0 < float(torch.cat([p.detach().flatten() for p in si]).norm()) < 29.5


def test_regular_resnet18_is_the_usual_11m_network_with_nothing_on_the_sphere():
    model = build_model(ModelConfig(name="resnet18", width=64), (3, 32, 32), 10, seed=0)
    assert model.si_parameters() == []
    assert all(p.requires_grad for p in model.parameters())
    assert model.head.bias is not None
    assert all(m.affine for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    n_params = sum(p.numel() for p in model.parameters())
    bn_channels = 3904  # 2 per BN channel (weight, bias), pre-activation BNs + final BN
    assert n_params == resnet_conv_params(64) + 2 * bn_channels + 512 * 10 + 10 == 11_172_170
    model.eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_building_is_seeded_and_outputs_have_the_right_shape():
    cfg = ModelConfig(name="convnet-si", width=4, depth=3)
    a, b = (build_model(cfg, (3, 32, 32), 100, seed=5) for _ in range(2))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    c = build_model(cfg, (3, 32, 32), 100, seed=6)
    assert not torch.equal(a.si_parameters()[0], c.si_parameters()[0])
    assert a.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 100)
    for name in ("convnet-si", "resnet18-si", "resnet18"):
        assert name in MODELS


@pytest.mark.parametrize("depth, image", [(1, 32), (2, 32), (3, 32), (4, 64)])
def test_convnet_depth_adapts_the_final_pool(depth, image):
    model = build_model(ModelConfig(name="convnet-si", width=2, depth=depth), (3, image, image), 7, seed=0)
    assert model.head.in_features == 2 * 2 ** depth
    assert model.eval()(torch.randn(2, 3, image, image)).shape == (2, 7)


@pytest.mark.parametrize("depth, shape", [(0, (3, 32, 32)), (6, (3, 32, 32)), (3, (3, 30, 30)),
                                          (3, (3, 32, 16)), (3, (32, 32))])
def test_convnet_rejects_impossible_shapes(depth, shape):
    with pytest.raises(ConfigError):
        build_model(ModelConfig(name="convnet-si", width=4, depth=depth), shape, 10, seed=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["convnet-si", "resnet18-si", "resnet18"])
def test_models_run_on_cuda(name):
    model = build_model(ModelConfig(name=name, width=8, depth=3), (3, 32, 32), 10, seed=0).cuda()
    out = model(torch.randn(4, 3, 32, 32, device="cuda"))
    assert out.shape == (4, 10) and out.device.type == "cuda"
