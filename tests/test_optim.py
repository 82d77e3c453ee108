"""Unconstrained optimizers and LR schedules, checked against hand-computed steps."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lrfeatures.errors import ConfigError
from lrfeatures.optim import OptimizerConfig, ScheduleConfig, build_optimizer, build_schedule


def one_step(name: str, p0: float, grad: float, **kw) -> float:
    """Value of a float64 scalar parameter after one optimizer step with gradient `grad`."""
    p = torch.nn.Parameter(torch.tensor(p0, dtype=torch.float64))
    opt = build_optimizer([p], name, **kw)
    p.grad = torch.tensor(grad, dtype=torch.float64)
    opt.step()
    return p.item()


def adam_first_step(p: float, g: float, lr: float, b1: float, b2: float, eps: float) -> float:
    """Adam's first step by hand: bias-corrected moments of a single gradient g."""
    m_hat = (1 - b1) * g / (1 - b1)
    v_hat_sqrt = math.sqrt((1 - b2) * g * g) / math.sqrt(1 - b2)
    return p - lr * m_hat / (v_hat_sqrt + eps)


@settings(max_examples=25, deadline=None)
@given(p=st.floats(-3, 3), g=st.floats(-2, 2).filter(lambda g: abs(g) > 1e-3),
       wd=st.floats(0.0, 0.5), lr=st.floats(1e-4, 0.1))
def test_adam_l2_and_adamw_first_step_by_hand(p, g, wd, lr):
    b1, b2, eps = 0.9, 0.999, 1e-8
    kw = dict(lr=lr, weight_decay=wd, betas=(b1, b2), eps=eps)
    # L2: the decay joins the gradient, then Adam normalizes it away on the first step.
    expected_l2 = adam_first_step(p, g + wd * p, lr, b1, b2, eps)
    # Decoupled: shrink the weight first, then the plain Adam step on g.
    expected_w = adam_first_step(p * (1 - lr * wd), g, lr, b1, b2, eps)
    assert one_step("adam", p, g, **kw) == pytest.approx(expected_l2, rel=1e-14, abs=1e-15)
    assert one_step("adamw", p, g, **kw) == pytest.approx(expected_w, rel=1e-14, abs=1e-15)


def test_adam_l2_and_adamw_differ_as_they_should():
    """With L2, a decay term larger than the gradient flips the first step's direction."""
    kw = dict(lr=0.01, weight_decay=0.1)
    # g' = -0.05 + 0.1 * 1 = 0.05 > 0: Adam-L2 steps down by ~lr.
    assert one_step("adam", 1.0, -0.05, **kw) == pytest.approx(1.0 - 0.01, abs=1e-8)
    # AdamW: shrink by lr*wd = 0.001, then step up by ~lr against the negative gradient.
    assert one_step("adamw", 1.0, -0.05, **kw) == pytest.approx(1.0 * 0.999 + 0.01, abs=1e-8)
    # Without decay the two are the same optimizer.
    assert one_step("adam", 1.0, -0.05, lr=0.01) == one_step("adamw", 1.0, -0.05, lr=0.01)


def test_sgd_momentum_two_steps_by_hand():
    lr, mu, wd = 0.1, 0.9, 0.01
    p = torch.nn.Parameter(torch.tensor(2.0, dtype=torch.float64))
    opt = build_optimizer([p], "sgd", lr=lr, momentum=mu, weight_decay=wd)
    grads = [0.5, -0.3]
    expected, buf = 2.0, None
    for g in grads:
        p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
        d = g + wd * expected            # L2 joins the gradient
        buf = d if buf is None else mu * buf + d   # first step seeds the buffer
        expected -= lr * buf
        assert p.item() == pytest.approx(expected, rel=1e-15)
    # By hand: 2 - 0.1*0.52 = 1.948; buf = 0.9*0.52 - 0.3 + 0.01948 = 0.18748; 1.948 - 0.018748.
    assert p.item() == pytest.approx(1.929252, rel=1e-12)


def test_config_builds_the_same_optimizer():
    params = [torch.nn.Parameter(torch.zeros(3))]
    opt = OptimizerConfig(name="adam", lr=1e-3, weight_decay=1e-4).build(params)
    assert isinstance(opt, torch.optim.Adam) and not isinstance(opt, torch.optim.AdamW)
    assert opt.param_groups[0]["weight_decay"] == 1e-4
    assert isinstance(build_optimizer(params, "adamw", 1e-3), torch.optim.AdamW)
    sgd = build_optimizer(params, "sgd", 0.1, momentum=0.9, weight_decay=5e-4)
    assert sgd.param_groups[0]["momentum"] == 0.9


@pytest.mark.parametrize("kwargs, match", [
    (dict(name="rmsprop", lr=0.1), "unknown optimizer"),
    (dict(name="sgd", lr=0.0), "lr"),
    (dict(name="sgd", lr=-1.0), "lr"),
    (dict(name="adam", lr=float("nan")), "lr"),
    (dict(name="adam", lr=float("inf")), "lr"),
    (dict(name="sgd", lr=0.1, weight_decay=-1e-4), "weight_decay"),
    (dict(name="sgd", lr=0.1, momentum=1.0), "momentum"),
    (dict(name="adam", lr=0.1, momentum=0.9), "momentum"),
    (dict(name="adam", lr=0.1, betas=(0.9, 1.0)), "betas"),
    (dict(name="adamw", lr=0.1, eps=0.0), "eps"),
])
def test_bad_optimizer_inputs_raise(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        build_optimizer([torch.nn.Parameter(torch.zeros(1))], **kwargs)
    with pytest.raises(ConfigError, match="no parameters"):
        build_optimizer([], "sgd", 0.1)


def lrs(name: str, total: int, steps: int, base: float = 0.5, **opts) -> list[float]:
    """The LR used at optimizer steps 0 .. steps-1."""
    opt = build_optimizer([torch.nn.Parameter(torch.zeros(1))], "sgd", base)
    sched = build_schedule(name, opt, total, **opts)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_schedule_values():
    assert lrs("constant", 10, 10) == [0.5] * 10
    cos = lrs("cosine", 8, 9)
    assert cos[0] == 0.5
    assert cos[2] == pytest.approx(0.5 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert cos[4] == pytest.approx(0.25)
    assert cos[8] == pytest.approx(0.0, abs=1e-15)
    assert all(a >= b for a, b in zip(cos, cos[1:]))
    floor = lrs("cosine", 4, 6, final_factor=0.1)
    assert floor[4] == floor[5] == pytest.approx(0.05)  # clipped at the end
    assert lrs("step", 10, 7, step_size=3, gamma=0.5) == pytest.approx(
        [0.5, 0.5, 0.5, 0.25, 0.25, 0.25, 0.125])
    warm = lrs("cosine", 12, 5, warmup_steps=4)
    assert warm == pytest.approx([0.125, 0.25, 0.375, 0.5, 0.5])
    assert lrs("constant", 10, 3, warmup_steps=2) == pytest.approx([0.25, 0.5, 0.5])
    cfg = ScheduleConfig(name="step", step_size=2, gamma=0.1)
    opt = build_optimizer([torch.nn.Parameter(torch.zeros(1))], "sgd", 1.0)
    sched = cfg.build(opt, 10)
    for _ in range(2):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)


@pytest.mark.parametrize("name, total, opts, match", [
    ("linear", 10, {}, "unknown schedule"),
    ("constant", 0, {}, "total_steps"),
    ("constant", 10, {"gamma": 0.1}, "takes no option"),
    ("cosine", 10, {"final_factor": 2.0}, "final_factor"),
    ("step", 10, {}, "step_size"),
    ("step", 10, {"step_size": 2, "gamma": 0.0}, "gamma"),
    ("cosine", 10, {"warmup_steps": 10}, "warmup_steps"),
])
def test_bad_schedule_inputs_raise(name, total, opts, match):
    opt = build_optimizer([torch.nn.Parameter(torch.zeros(1))], "sgd", 0.1)
    with pytest.raises(ConfigError, match=match):
        build_schedule(name, opt, total, **opts)
