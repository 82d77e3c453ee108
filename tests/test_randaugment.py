"""Batched RandAugment: seeding, each op's effect and magnitude, dtypes, speed."""

import math
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from lrfeatures.data.randaugment import OPS, RandAugment, rotation_matrix, warp
from lrfeatures.errors import ConfigError, DataError

M = 14
m = M / 30


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_images(batch: int = 8, size: int = 32, lo: float = 0.2, hi: float = 0.8,
               seed: int = 0) -> torch.Tensor:
    """Float images in [lo, hi]: coloured gradients plus noise, so no op is a no-op on them."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    base = torch.stack([xx, yy, (xx + yy) / 2])
    noise = torch.rand(batch, 3, size, size, generator=gen(seed))
    return lo + (hi - lo) * (0.6 * base + 0.4 * noise)


def only(op: str, magnitude: float = M, num_ops: int = 1) -> RandAugment:
    return RandAugment(num_ops, magnitude, ops=(op,))


def two_signs(images, fn_plus, fn_minus, out, atol=0.0):
    """Each sample equals the + or the − reference; both occur. Returns the sign per sample."""
    plus = (out - fn_plus(images)).flatten(1).abs().amax(1) <= atol
    minus = (out - fn_minus(images)).flatten(1).abs().amax(1) <= atol
    assert (plus | minus).all()
    assert plus.any() and minus.any()
    return plus


# --- seeding, dtypes, shapes ----------------------------------------------------------------

@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**32))
def test_same_seed_same_output_different_seed_different(seed):
    images = (make_images(16) * 255).round().to(torch.uint8)
    ra = RandAugment(2, M)
    a, b = ra(images, gen(seed)), ra(images, gen(seed))
    assert torch.equal(a, b)
    assert not torch.equal(a, ra(images, gen(seed + 1)))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.float64, torch.float16])
def test_dtype_shape_and_range_are_preserved(dtype):
    x = make_images(32, lo=0.0, hi=1.0)
    images = (x * 255).round().to(torch.uint8) if dtype == torch.uint8 else x.to(dtype)
    out = RandAugment(2, 30)(images, gen(0))
    assert out.dtype == dtype and out.shape == images.shape
    if dtype != torch.uint8:
        assert out.min() >= 0 and out.max() <= 1
    gray = RandAugment(3, M)(images[:, :1].contiguous(), gen(1))
    assert gray.shape == (32, 1, 32, 32)


def test_input_is_not_modified():
    images = make_images(8)
    copy = images.clone()
    RandAugment(2, M)(images, gen(0))
    assert torch.equal(images, copy)


def test_identity_and_zero_ops_leave_images_unchanged():
    images = make_images(8)
    assert torch.equal(only("identity")(images, gen(0)), images)
    assert torch.equal(RandAugment(0, M)(images, gen(0)), images)
    as_uint8 = (images * 255).round().to(torch.uint8)
    assert torch.equal(only("identity", num_ops=3)(as_uint8, gen(0)), as_uint8)


@pytest.mark.parametrize("op", [op for op in OPS if op != "identity"])
def test_every_op_changes_every_image(op):
    images = (make_images(8) * 255).round().to(torch.uint8)
    out = only(op)(images, gen(0))
    changed = (out.int() - images.int()).flatten(1).abs().amax(1) > 0
    assert changed.all(), op


def test_ops_are_drawn_uniformly():
    images = make_images(4000, size=4)
    out = RandAugment(1, M, ops=("identity", "brightness"))(images, gen(0))
    changed = (out != images).flatten(1).any(1).float().mean().item()
    assert abs(changed - 0.5) < 0.04


def test_num_ops_layers_compose():
    images = make_images(64, lo=0.05, hi=0.4)
    out = only("brightness", num_ops=2)(images, gen(3))
    ratio = (out / images).flatten(1)
    hi, lo = 1 + 0.9 * m, 1 - 0.9 * m
    products = torch.tensor([hi * hi, hi * lo, lo * lo])
    nearest = (ratio[:, :1] - products).abs().argmin(1)
    torch.testing.assert_close(ratio, products[nearest].unsqueeze(1).expand_as(ratio))
    assert len(set(nearest.tolist())) == 3


# --- magnitudes -----------------------------------------------------------------------------

def affine_reference(images, theta):
    """grid_sample with a normalized 2x3 matrix (square images: pixel == normalized)."""
    theta = torch.tensor(theta, dtype=images.dtype).expand(images.shape[0], 2, 3)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="nearest", align_corners=False)


def test_rotation_by_90_degrees_is_rot90():
    x = torch.rand(2, 3, 8, 8)
    ccw = warp(x, rotation_matrix(torch.tensor([90.0, -90.0])))
    assert torch.equal(ccw[0], torch.rot90(x[0], 1, dims=(1, 2)))
    assert torch.equal(ccw[1], torch.rot90(x[1], -1, dims=(1, 2)))


def test_rotate_applies_the_magnitudes_angle():
    images = make_images(16)
    out = only("rotate")(images, gen(0))
    a = math.radians(30 * m)
    two_signs(images,
              lambda x: affine_reference(x, [[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0]]),
              lambda x: affine_reference(x, [[math.cos(a), math.sin(a), 0], [-math.sin(a), math.cos(a), 0]]),
              out, atol=1e-6)
    # The corners leave the frame and are filled with black.
    assert (out[:, :, 0, 0] == 0).all()


@pytest.mark.parametrize("op, row", [("shear_x", True), ("shear_y", False)])
def test_shear_moves_rows_by_factor_times_distance_from_centre(op, row):
    images = make_images(16)
    out = only(op)(images, gen(0))
    s = 0.3 * m
    ref = [[1, s, 0], [0, 1, 0]] if row else [[1, 0, 0], [s, 1, 0]]
    neg = [[1, -s, 0], [0, 1, 0]] if row else [[1, 0, 0], [-s, 1, 0]]
    positive = two_signs(images, lambda z: affine_reference(z, ref),
                         lambda z: affine_reference(z, neg), out, atol=1e-6)
    # By hand: row r (column for shear_y), at offset y = r - 15.5 from the centre, shows the
    # input row read at x + round(±s*y); the middle rows (shift 0.07 px) stay put.
    x = images if row else images.transpose(2, 3)
    o = out if row else out.transpose(2, 3)
    for k in range(16):
        sign = 1 if positive[k] else -1
        for r in (0, 5, 15, 16, 31):
            shift = round(sign * s * (r - 15.5))
            src = x[k, :, r, max(0, shift):32 + min(0, shift)]
            dst = o[k, :, r, max(0, -shift):32 + min(0, -shift)]
            assert torch.equal(dst, src), (k, r, shift)
            assert (shift == 0) == (r in (15, 16))


@pytest.mark.parametrize("op", ["translate_x", "translate_y"])
def test_translate_shifts_by_045_m_size(op):
    images = make_images(16)
    out = only(op)(images, gen(0))
    shift = round(0.45 * m * 32)  # 6.72 px: nearest sampling moves content by 7
    assert shift == 7
    dim = 3 if op == "translate_x" else 2

    def moved(x, k):
        y = torch.roll(x, k, dims=dim)
        idx = torch.arange(32)
        keep = ((idx >= k) if k > 0 else (idx < 32 + k)).to(x.dtype)
        return y * (keep.view(1, 1, 1, 32) if dim == 3 else keep.view(1, 1, 32, 1))

    two_signs(images, lambda x: moved(x, shift), lambda x: moved(x, -shift), out)


@settings(max_examples=15, deadline=None)
@given(magnitude=st.integers(1, 30))
def test_brightness_factor_is_one_plus_minus_09m(magnitude):
    images = make_images(16, lo=0.05, hi=0.5)
    out = only("brightness", magnitude)(images, gen(magnitude))
    f = 0.9 * magnitude / 30
    two_signs(images, lambda x: x * (1 + f), lambda x: x * (1 - f), out, atol=1e-6)


@settings(max_examples=15, deadline=None)
@given(magnitude=st.integers(0, 30))
def test_solarize_threshold(magnitude):
    images = make_images(4, lo=0.0, hi=1.0)
    out = only("solarize", magnitude)(images, gen(0))
    above = images > 1 - magnitude / 30
    assert torch.equal(out[~above], images[~above])
    assert torch.equal(out[above], 1 - images[above])


def test_color_keeps_gray_and_scales_chroma():
    images = make_images(16, lo=0.3, hi=0.6)
    out = only("color")(images, gen(0))
    luma = lambda x: (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)
    torch.testing.assert_close(luma(out), luma(images))
    g = luma(images)
    two_signs(images, lambda x: g + (1 + 0.9 * m) * (x - g), lambda x: g + (1 - 0.9 * m) * (x - g),
              out, atol=1e-6)


def test_contrast_scales_around_the_mean_gray():
    images = make_images(16, lo=0.3, hi=0.6)
    out = only("contrast")(images, gen(0))
    mean = (0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2]).mean((1, 2))
    mean = mean.view(-1, 1, 1, 1)
    two_signs(images, lambda x: mean + (1 + 0.9 * m) * (x - mean),
              lambda x: mean + (1 - 0.9 * m) * (x - mean), out, atol=1e-6)


def test_sharpness_on_a_single_spike():
    images = torch.full((16, 1, 5, 5), 0.5)
    images[:, :, 2, 2] = 0.6
    images[:, :, 0, 0] = 0.9  # border pixels are never changed
    out = only("sharpness")(images, gen(0))
    smooth = (8 * 0.5 + 5 * 0.6) / 13
    centre = out[:, 0, 2, 2]
    hi, lo = smooth + (1 + 0.9 * m) * (0.6 - smooth), smooth + (1 - 0.9 * m) * (0.6 - smooth)
    assert ((centre - hi).abs() < 1e-6).sum() + ((centre - lo).abs() < 1e-6).sum() == 16
    assert (out[:, 0, 0, 0] == 0.9).all()
    # A neighbour of the spike is sharpened away from it.
    assert (out[:, 0, 1, 1] != 0.5).all()


def test_posterize_keeps_six_bits_at_m14():
    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8, generator=gen(0))
    out = only("posterize")(images, gen(0))
    assert torch.equal(out, images & 0xFC)
    assert torch.equal(only("posterize", 30)(images, gen(0)), images & 0xF0)
    assert torch.equal(only("posterize", 0)(images, gen(0)), images)


def test_autocontrast_stretches_each_channel():
    images = (make_images(8) * 255).round().to(torch.uint8)
    out = only("autocontrast")(images, gen(0))
    assert (out.amin((2, 3)) == 0).all() and (out.amax((2, 3)) == 255).all()
    # Order-preserving per channel.
    flat_in, flat_out = images.flatten(2).long(), out.flatten(2).long()
    order = flat_in.argsort(2)
    assert (flat_out.gather(2, order).diff(dim=2) >= 0).all()


def test_equalize_by_hand():
    """1024 pixels on 4 levels, 256 each: step = (1024 - 256) // 255 = 3, lut = (1 + cum) // 3."""
    levels = torch.tensor([10, 20, 30, 40], dtype=torch.uint8).repeat_interleave(256)
    images = levels.view(1, 1, 32, 32).repeat(2, 3, 1, 1)
    out = only("equalize")(images, gen(0))
    expected = torch.tensor([0, 85, 171, 255], dtype=torch.uint8).repeat_interleave(256)
    assert torch.equal(out, expected.view(1, 1, 32, 32).expand_as(out))
    flat = torch.full((1, 1, 32, 32), 77, dtype=torch.uint8)
    assert torch.equal(only("equalize")(flat, gen(0)), flat)  # one level: unchanged


@pytest.mark.parametrize("op, tol", [("equalize", 0), ("posterize", 0), ("solarize", 0),
                                     ("autocontrast", 1), ("color", 2), ("contrast", 2),
                                     ("brightness", 1), ("sharpness", 2)])
def test_color_ops_agree_with_pil(op, tol):
    """PIL (installed with matplotlib) as an independent oracle on 8-bit RGB images."""
    Image = pytest.importorskip("PIL.Image")
    ImageEnhance = pytest.importorskip("PIL.ImageEnhance")
    ImageOps = pytest.importorskip("PIL.ImageOps")
    images = (make_images(8, lo=0.0, hi=1.0) * 255).round().to(torch.uint8)
    out = only(op)(images, gen(0))
    enhancers = {"color": ImageEnhance.Color, "contrast": ImageEnhance.Contrast,
                 "brightness": ImageEnhance.Brightness, "sharpness": ImageEnhance.Sharpness}
    for k in range(images.shape[0]):
        pil = Image.fromarray(images[k].permute(1, 2, 0).numpy())
        if op == "equalize":
            refs = [ImageOps.equalize(pil)]
        elif op == "posterize":
            refs = [ImageOps.posterize(pil, 8 - round(4 * m))]
        elif op == "solarize":
            refs = [ImageOps.solarize(pil, math.floor(255 * (1 - m)) + 1)]
        elif op == "autocontrast":
            refs = [ImageOps.autocontrast(pil)]
        else:
            refs = [enhancers[op](pil).enhance(1 + s * 0.9 * m) for s in (1, -1)]
        got = out[k].permute(1, 2, 0).numpy().astype(int)
        errs = [np.abs(np.asarray(r).astype(int) - got).max() for r in refs]
        assert min(errs) <= tol, (op, k, errs)


# --- errors, speed, devices -----------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    (dict(num_ops=-1), "num_ops"), (dict(magnitude=31), "magnitude"),
    (dict(magnitude=-1), "magnitude"), (dict(ops=("blur",)), "ops"), (dict(ops=()), "ops"),
    (dict(interpolation="cubic"), "interpolation"), (dict(fill=2.0), "fill"),
])
def test_bad_config_raises(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        RandAugment(**kwargs)


@pytest.mark.parametrize("images", [torch.rand(3, 32, 32), torch.rand(2, 4, 8, 8),
                                    torch.zeros(2, 3, 8, 8, dtype=torch.int32)])
def test_bad_images_raise(images):
    with pytest.raises(DataError):
        RandAugment()(images, gen(0))


def test_batch_of_256_is_fast():
    images = torch.randint(0, 256, (256, 3, 32, 32), dtype=torch.uint8, generator=gen(0))
    ra = RandAugment(2, M)
    ra(images, gen(0))
    start = time.perf_counter()
    for seed in range(5):
        ra(images, gen(seed))
    # About 15 ms on 2 idle CPU cores; generous because other jobs may share the cores.
    assert (time.perf_counter() - start) / 5 < 1.0


def test_bilinear_and_fill_options():
    images = make_images(8)
    out = RandAugment(1, M, ops=("rotate",), interpolation="bilinear", fill=0.5)(images, gen(0))
    assert torch.allclose(out[:, :, 0, 0], torch.tensor(0.5))  # uncovered corner is grey
    assert out.min() >= 0 and out.max() <= 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    images = torch.randint(0, 256, (256, 3, 32, 32), dtype=torch.uint8, generator=gen(0))
    ra = RandAugment(2, M)
    cpu = ra(images, gen(5))
    cuda = ra(images.cuda(), gen(5))  # CPU generator, CUDA images: same draws
    assert cuda.device.type == "cuda"
    diff = (cuda.cpu().int() - cpu.int()).abs()
    assert diff.max() <= 1 and (diff == 0).float().mean() > 0.99
    cuda_gen = torch.Generator(device="cuda").manual_seed(5)
    assert torch.equal(ra(images.cuda(), cuda_gen),
                       ra(images.cuda(), torch.Generator(device="cuda").manual_seed(5)))
