"""Scale invariance of the SI MLP and the geometry of sphere steps (SPEC §2)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from lrfeatures.config import ModelConfig
from lrfeatures.models.registry import build_model, si_parameters
from lrfeatures.sphere import (flatten, joint_norm, project, sphere_step, sphere_step_, split, tangent,
                               unflatten_into_)

FAST = settings(max_examples=25, deadline=None)
IN_DIM = 32


def si_model(seed: int = 0, activation: str = "relu"):
    """A float64 SI MLP on 32 inputs with a negligible LayerNorm eps (so invariance is exact)."""
    cfg = ModelConfig(activation=activation, norm_eps=1e-30)
    return build_model(cfg, (IN_DIM,), 1, seed).double()


def inputs(seed: int, n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Random inputs and binary labels (float64)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, IN_DIM, generator=gen, dtype=torch.float64)
    y = (torch.rand(n, generator=gen, dtype=torch.float64) > 0.5).double()
    return x, y


def set_si(model, theta: torch.Tensor) -> None:
    unflatten_into_(theta, si_parameters(model))


def si_grad(model, x, y) -> torch.Tensor:
    """Flat gradient of the mean BCE loss w.r.t. the whole SI group."""
    params = si_parameters(model)
    loss = F.binary_cross_entropy_with_logits(model(x), y)
    return flatten(torch.autograd.grad(loss, params))


# ----- the SI MLP ---------------------------------------------------------------------------

@FAST
@given(c=st.floats(1e-2, 1e2), seed=st.integers(0, 2**16), activation=st.sampled_from(["relu", "tanh"]))
def test_mlp_output_invariant_under_joint_scaling(c, seed, activation):
    model = si_model(seed, activation)
    x, _ = inputs(seed + 1)
    theta = flatten(si_parameters(model)).detach().clone()
    with torch.no_grad():
        before = model(x)
        set_si(model, c * theta)
        after = model(x)
    assert after.shape == (len(x),)
    torch.testing.assert_close(after, before, rtol=1e-9, atol=1e-9)


def test_mlp_scaling_one_layer_alone_is_not_the_si_group():
    """Guard against a vacuous invariance test: the head is NOT scale-invariant."""
    model = si_model(0)
    x, _ = inputs(1)
    with torch.no_grad():
        before = model(x)
        model.head.weight.mul_(3.0)
        after = model(x)
    assert not torch.allclose(after, before)
    assert model.head.weight.requires_grad is False
    si_ids = {id(p) for p in si_parameters(model)}
    assert id(model.head.weight) not in si_ids
    assert len(si_ids) == ModelConfig().depth


@FAST
@given(seed=st.integers(0, 2**16), activation=st.sampled_from(["relu", "tanh"]))
def test_si_gradient_is_orthogonal_to_theta(seed, activation):
    model = si_model(seed, activation)
    x, y = inputs(seed + 7)
    theta = flatten(si_parameters(model)).detach()
    grad = si_grad(model, x, y)
    assert grad.norm() > 0
    cosine = (grad @ theta).abs() / (grad.norm() * theta.norm())
    assert cosine < 1e-5


@FAST
@given(c=st.floats(1e-2, 1e2), seed=st.integers(0, 2**16))
def test_si_gradient_norm_scales_inversely_with_theta(c, seed):
    model = si_model(seed)
    x, y = inputs(seed + 3)
    theta = flatten(si_parameters(model)).detach().clone()
    grad = si_grad(model, x, y)
    set_si(model, c * theta)
    scaled = si_grad(model, x, y)
    # Gradient of an SI function is homogeneous of degree -1: g(cθ) = g(θ) / c.
    torch.testing.assert_close(scaled, grad / c, rtol=1e-7, atol=1e-12 * grad.abs().max().item())


# ----- sphere steps -------------------------------------------------------------------------

@st.composite
def step_inputs(draw):
    """theta, grad [M, P] (float32), rho and an LR that is a float or a per-row [M, 1] tensor."""
    m, p = draw(st.integers(1, 6)), draw(st.integers(2, 300))
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    rho = draw(st.floats(0.05, 20.0))
    theta = project(torch.randn(m, p, generator=gen), rho)
    grad = torch.randn(m, p, generator=gen) * draw(st.floats(1e-3, 1e3))
    if draw(st.booleans()):
        lr = draw(st.floats(1e-5, 10.0))
    else:
        lr = torch.exp(torch.empty(m, 1).uniform_(math.log(1e-5), math.log(10.0), generator=gen))
    return theta, grad, lr, rho


def relative_norm_error(theta: torch.Tensor, rho: float) -> float:
    return ((theta.double().norm(dim=-1) - rho).abs() / rho).max().item()


@FAST
@given(args=step_inputs())
def test_projected_step_preserves_norm(args):
    theta, grad, lr, rho = args
    new = sphere_step(theta, grad, lr, rho, "projected")
    assert new.shape == theta.shape and new.dtype == theta.dtype
    assert relative_norm_error(new, rho) < 1e-6


@FAST
@given(args=step_inputs())
def test_riemannian_step_stays_on_sphere(args):
    theta, grad, lr, rho = args
    new = sphere_step(theta, grad, lr, rho, "riemannian")
    assert relative_norm_error(new, rho) < 1e-6


@FAST
@given(args=step_inputs(), rule=st.sampled_from(["projected", "riemannian"]))
def test_per_row_lr_equals_rowwise_scalar_steps(args, rule):
    theta, grad, lr, rho = args
    # float64: a riemannian step can turn by many radians, which amplifies float32 roundoff.
    theta, grad = theta.double(), grad.double()
    lrs = lr.double() if isinstance(lr, torch.Tensor) else torch.full((theta.shape[0], 1), lr, dtype=torch.float64)
    batched = sphere_step(theta, grad, lrs, rho, rule)
    for m in range(theta.shape[0]):
        alone = sphere_step(theta[m], grad[m], float(lrs[m, 0]), rho, rule)
        torch.testing.assert_close(batched[m], alone, rtol=1e-7, atol=1e-7 * rho)


@FAST
@given(seed=st.integers(0, 2**16), rho=st.floats(0.1, 10.0), p=st.integers(3, 200))
def test_riemannian_matches_projected_to_first_order(seed, rho, p):
    gen = torch.Generator().manual_seed(seed)
    theta = project(torch.randn(4, p, generator=gen, dtype=torch.float64), rho)
    grad = tangent(theta, torch.randn(4, p, generator=gen, dtype=torch.float64))
    # An ELR for which the step turns theta by about 0.05 rad: small but far above roundoff.
    lr = 0.05 / (rho * grad.norm(dim=-1, keepdim=True))

    def gap(scale):
        riem = sphere_step(theta, grad, lr * scale, rho, "riemannian")
        proj = sphere_step(theta, grad, lr * scale, rho, "projected")
        move = (proj - theta).norm(dim=-1)
        assert (move > 0.001 * scale * rho).all()  # the step really moves
        return (riem - proj).norm(dim=-1)

    big, small = gap(1.0), gap(0.1)
    assert (big < 1e-2 * rho).all()
    assert (big / small > 30).all()


@pytest.mark.parametrize("rule", ["projected", "riemannian"])
def test_zero_gradient_leaves_theta_unchanged(rule):
    gen = torch.Generator().manual_seed(0)
    for rho in (0.3, 1.0, 7.0):
        theta = project(torch.randn(3, 50, generator=gen), rho)
        new = sphere_step(theta, torch.zeros_like(theta), 0.5, rho, rule)
        assert torch.isfinite(new).all()
        torch.testing.assert_close(new, theta, rtol=1e-6, atol=0)


@pytest.mark.parametrize("rule", ["projected", "riemannian"])
def test_effective_lr_moves_direction_independently_of_rho(rule):
    """At rho=3 the MLP's gradient is 1/3 of the unit-norm one; an ELR step moves θ/ρ identically."""
    model = si_model(5)
    x, y = inputs(6)
    unit = project(flatten(si_parameters(model)).detach(), 1.0)
    set_si(model, unit)
    grad_unit = si_grad(model, x, y)
    rho = 3.0
    set_si(model, rho * unit)
    grad_rho = si_grad(model, x, y)
    torch.testing.assert_close(grad_rho, grad_unit / rho, rtol=1e-7, atol=1e-14)
    for elr in (1e-3, 0.05, 0.5):
        at_unit = sphere_step(unit, grad_unit, elr, 1.0, rule)
        at_rho = sphere_step(rho * unit, grad_rho, elr, rho, rule)
        torch.testing.assert_close(at_rho / rho, at_unit, rtol=1e-10, atol=1e-12)
        assert (at_unit - unit).norm() > 1e-4  # the step is not a no-op


@FAST
@given(seed=st.integers(0, 2**16), m=st.integers(1, 4), rho=st.floats(0.1, 10.0),
       shapes=st.lists(st.tuples(st.integers(1, 6), st.integers(1, 6)), min_size=1, max_size=4),
       rule=st.sampled_from(["projected", "riemannian"]), per_model=st.booleans())
def test_in_place_parts_step_equals_flat_step(seed, m, rho, shapes, rule, per_model):
    """sphere_step_ on a grid's parts [M, out, in] is the flat step on their concatenation."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [torch.Size(s) for s in shapes]
    theta = project(torch.randn(m, sum(s.numel() for s in shapes), generator=gen, dtype=torch.float64), rho)
    grad = torch.randn(theta.shape, generator=gen, dtype=torch.float64)
    lr = torch.rand(m, generator=gen, dtype=torch.float64) * 0.5 + 1e-3 if per_model else 0.2
    parts = [p.clone() for p in split(theta, shapes)]
    grads = split(grad, shapes)
    sphere_step_(parts, grads, lr, rho, rule, batch_dims=1)
    flat_lr = lr.unsqueeze(1) if per_model else lr
    expected = sphere_step(theta, grad, flat_lr, rho, rule)
    torch.testing.assert_close(flatten(parts, 1), expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(joint_norm(parts, 1), torch.full((m,), rho, dtype=torch.float64))


def test_in_place_step_on_model_parameters_keeps_function_of_direction():
    """One in-place step on a model's SI parameters keeps their joint norm and matches the flat step."""
    model = si_model(4)
    x, y = inputs(5)
    params = si_parameters(model)
    unflatten_into_(project(flatten(params).detach(), 2.0), params)
    theta = flatten(params).detach().clone()
    grads = list(torch.autograd.grad(F.binary_cross_entropy_with_logits(model(x), y), params))
    sphere_step_(list(params), grads, 0.1, 2.0, "projected")
    after = flatten(params).detach()
    torch.testing.assert_close(after, sphere_step(theta, flatten(grads), 0.1, 2.0), rtol=1e-12, atol=1e-14)
    assert after.norm().item() == pytest.approx(2.0, rel=1e-12)


def test_unknown_rule_raises():
    theta = project(torch.randn(2, 5), 1.0)
    with pytest.raises(ValueError, match="unknown sphere step rule"):
        sphere_step(theta, torch.randn(2, 5), 0.1, 1.0, "adam")


def test_tangent_is_orthogonal_and_idempotent():
    gen = torch.Generator().manual_seed(3)
    theta = torch.randn(4, 30, generator=gen, dtype=torch.float64)
    grad = torch.randn(4, 30, generator=gen, dtype=torch.float64)
    tan = tangent(theta, grad)
    assert ((tan * theta).sum(-1).abs() < 1e-12).all()
    torch.testing.assert_close(tangent(theta, tan), tan)


def test_flatten_unflatten_round_trip():
    model = si_model(2)
    params = si_parameters(model)
    theta = flatten(params).detach().clone()
    assert theta.numel() == sum(p.numel() for p in params)
    replacement = torch.arange(theta.numel(), dtype=theta.dtype)
    unflatten_into_(replacement, params)
    assert torch.equal(flatten(params).detach(), replacement)
    assert torch.equal(params[0].detach().reshape(-1), replacement[:params[0].numel()])


def test_unflatten_handles_zero_dim_parameters():
    """0-d parameters (e.g. the ViT's attention temperature) round-trip like any other."""
    params = [torch.nn.Parameter(torch.tensor(1.5)), torch.nn.Parameter(torch.zeros(2, 3))]
    replacement = torch.arange(7, dtype=torch.float32)
    unflatten_into_(replacement, params)
    assert params[0].shape == () and params[0].item() == 0.0
    assert torch.equal(flatten(params).detach(), replacement)
