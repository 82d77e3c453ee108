"""ViT (SPT + LSA) and its scale-invariant variant."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lrfeatures.config import ModelConfig
from lrfeatures.errors import ConfigError
from lrfeatures.models.registry import build_model, si_parameters
from lrfeatures.models.vit import LocalitySelfAttention, ShiftedPatchTokenizer, ViT, ViTOptions

SMALL = dict(dim=32, depth=2, heads=2, dim_head=8, mlp_dim=48)


def small_vit(scale_invariant: bool, seed: int = 0) -> ViT:
    """A tiny float64 model in eval mode, for exact-ish property checks.

    The SI LayerNorms' eps is the only thing that breaks exact invariance (even 1e-12 shows at
    ~1e-8 relative when weights shrink 16x), so it is 0 here: invariance is then exact up to rounding.
    """
    torch.manual_seed(seed)
    return ViT((32, 32), 3, 10, scale_invariant=scale_invariant, norm_eps=0.0,
               **SMALL).double().eval()


@pytest.fixture(scope="module")
def si_model() -> ViT:
    return small_vit(scale_invariant=True)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def test_spec_config_parameter_count_and_shapes():
    model = build_model(ModelConfig(name="vit", width=512, depth=6), (3, 32, 32), 10, seed=0)
    count = sum(p.numel() for p in model.parameters())
    # Hand count: SPT 123,872 + CLS/pos 33,792 + 6 blocks x 1,576,449 + head 6,154.
    assert count == 9_622_512
    assert abs(count - 9.6e6) / 9.6e6 < 0.03
    assert model.si_parameters() == []
    model.eval()
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    assert model.features(torch.rand(2, 3, 32, 32)).shape == (2, 512)


def test_si_variant_drops_only_feed_forward_biases():
    model = build_model(ModelConfig(name="vit-si", width=512, depth=6), (3, 32, 32), 10, seed=0)
    assert sum(p.numel() for p in model.parameters()) == 9_622_512 - 6 * 2 * 512
    si = si_parameters(model)
    assert len(si) == 12
    assert all(p.requires_grad for p in model.parameters())
    for block in model.blocks:
        assert block.ff.fc1.bias is None and block.ff.fc2.bias is None
    assert {id(p) for p in si} == {id(b.ff.fc1.weight) for b in model.blocks} | {
        id(b.ff.fc2.weight) for b in model.blocks}


def test_build_is_seeded_and_outputs_have_the_right_shapes():
    cfg = ModelConfig(name="vit-si", width=32, depth=2, norm_eps=1e-6)
    a = build_model(cfg, (1, 16, 16), 7, seed=3)
    b = build_model(cfg, (1, 16, 16), 7, seed=3)
    c = build_model(cfg, (1, 16, 16), 7, seed=4)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert not torch.equal(a.pos_embedding, c.pos_embedding)
    a.eval()
    assert a(torch.rand(5, 1, 16, 16)).shape == (5, 7)
    binary = build_model(ModelConfig(name="vit", width=32, depth=1), (3, 32, 32), 1, seed=0)
    assert binary(torch.rand(4, 3, 32, 32)).shape == (4,)


@pytest.mark.parametrize("name", ["vit", "vit-si"])
def test_build_model_with_options_is_a_direct_vit_construction_under_the_same_seed(name):
    options = {"heads": 2, "dim_head": 8, "mlp_dim": 24, "patch": 2, "dropout": 0.2, "emb_dropout": 0.0}
    cfg = ModelConfig(name=name, width=16, depth=2, norm_eps=1e-6, options=options)
    built = build_model(cfg, (3, 16, 12), 10, seed=11)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        direct = ViT((16, 12), 3, 10, dim=16, depth=2, **options, scale_invariant=name == "vit-si",
                     norm_eps=1e-6)
    assert repr(built) == repr(direct)
    got, want = built.state_dict(), direct.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    assert built.blocks[0].ff.drop.p == 0.2 and built.emb_drop.p == 0.0


def test_default_options_are_the_vits_own_defaults():
    assert ViTOptions() == ViTOptions(heads=8, dim_head=64, mlp_dim=512, patch=4, dropout=0.1, emb_dropout=0.1)
    built = build_model(ModelConfig(name="vit", width=32, depth=1), (3, 32, 32), 10, seed=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        direct = ViT((32, 32), 3, 10, dim=32, depth=1, norm_eps=ModelConfig().norm_eps)
    assert all(torch.equal(a, b) for a, b in zip(built.state_dict().values(), direct.state_dict().values()))


def test_bad_shapes_raise_config_error():
    with pytest.raises(ConfigError, match="patch"):
        ViT((30, 30), 3, 10, patch=4)
    with pytest.raises(ConfigError, match="image inputs"):
        build_model(ModelConfig(name="vit", width=32, depth=1), (32,), 10, seed=0)


def test_spt_shapes_and_diagonal_half_patch_shifts():
    spt = ShiftedPatchTokenizer(channels=3, patch=4, dim=64)
    x = torch.rand(2, 3, 32, 32)
    shifted = spt.shifted(x)
    assert shifted.shape == (2, 15, 32, 32)
    assert torch.equal(shifted[:, :3], x)
    # First copy: content moved 2 right and 2 down, zeros enter from the top-left.
    assert torch.equal(shifted[:, 3:6, 2:, 2:], x[:, :, :-2, :-2])
    assert (shifted[:, 3:6, :2] == 0).all() and (shifted[:, 3:6, :, :2] == 0).all()
    # Last copy: moved 2 left and 2 up.
    assert torch.equal(shifted[:, 12:15, :-2, :-2], x[:, :, 2:, 2:])
    patches = spt.patchify(shifted)
    assert patches.shape == (2, 64, 4 * 4 * 15)
    # Patch 1 (row 0, column 1) holds pixels [0:4, 4:8]; the channel index runs fastest.
    assert torch.equal(patches[0, 1, :15], shifted[0, :, 0, 4])
    assert spt(x).shape == (2, 64, 64)


def test_lsa_masks_the_diagonal_and_matches_its_fused_forward():
    torch.manual_seed(0)
    attn = LocalitySelfAttention(dim=32, heads=4, dim_head=8, dropout=0.1).eval()
    z = torch.randn(3, 17, 32)
    weights = attn.attention_weights(z)
    assert weights.shape == (3, 4, 17, 17)
    assert (weights.diagonal(dim1=-2, dim2=-1) == 0).all()
    assert (weights.sum(-1) - 1).abs().max() < 1e-5
    assert (weights + torch.eye(17) > 0).all()  # only the diagonal is masked
    # The fused SDPA forward computes the same attention as the explicit matrix.
    _, _, v = attn._qkv(z)
    explicit = attn.to_out((weights @ v).transpose(1, 2).reshape(3, 17, 32))
    torch.testing.assert_close(attn(z), explicit, atol=1e-5, rtol=1e-5)


def test_lsa_temperature_is_learned():
    torch.manual_seed(0)
    model = ViT((32, 32), 3, 10, **SMALL)
    model(torch.rand(2, 3, 32, 32)).sum().backward()
    grad = model.blocks[0].attn.log_temperature.grad
    assert grad is not None and grad.abs() > 0


@settings(max_examples=25, deadline=None)
@given(c=st.floats(0.05, 20.0), which=st.integers(-1, 3))
def test_scaling_feed_forward_weights_leaves_si_output_unchanged(si_model, images, c, which):
    before = si_model(images)
    targets = si_model.si_parameters() if which < 0 else [si_model.si_parameters()[which]]
    with torch.no_grad():
        for w in targets:
            w.mul_(c)
        after = si_model(images)
        for w in targets:
            w.div_(c)
    torch.testing.assert_close(after, before, atol=1e-9, rtol=1e-9)


def test_scaling_is_not_invariant_elsewhere(si_model, images):
    """Controls: the same check fails for non-SI weights and for the regular ViT."""
    before = si_model(images)
    with torch.no_grad():
        si_model.blocks[0].attn.to_qkv.weight.mul_(3.0)
        changed = si_model(images)
        si_model.blocks[0].attn.to_qkv.weight.div_(3.0)
    assert (changed - before).abs().max() > 1e-3
    regular = small_vit(scale_invariant=False)
    before = regular(images)
    with torch.no_grad():
        regular.blocks[0].ff.fc1.weight.mul_(3.0)
    assert (regular(images) - before).abs().max() > 1e-3


def test_si_weights_get_gradients_orthogonal_to_themselves(si_model, images):
    si_model.zero_grad()
    si_model(images).square().sum().backward()
    for w in si_model.si_parameters():
        cos = (w * w.grad).sum() / (w.norm() * w.grad.norm())
        assert abs(cos.item()) < 1e-6
    si_model.zero_grad()
