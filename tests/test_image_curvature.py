"""Image curvature (analysis/image_curvature.py): a tiny SI ConvNet (BN in eval mode) against its explicit
tangent-projected Hessian in float64, the 1/c² law, P H P θ = 0, the full space of practical models, and the
measurement end to end."""

from __future__ import annotations

import copy
import json

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lrfeatures.analysis.curvature import measure_curvature
from lrfeatures.analysis.image_curvature import ModuleProblem, check_image_curvature_model
from lrfeatures.errors import ConfigError
from lrfeatures.models.convnet import SIConvNet
from lrfeatures.models.registry import si_parameters
from lrfeatures.seeding import generator

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def net_and_data():
    """A 1-block SI ConvNet (126 conv weights) in eval mode with BN statistics from a few batches, float64."""
    torch.manual_seed(0)
    model = SIConvNet(3, 8, width=2, depth=1, num_outputs=3).double()
    gen = generator("image-curvature-test")
    x = torch.randn(24, 3, 8, 8, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (24,), generator=gen)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 3, 8, 8, generator=gen, dtype=torch.float64))
    return model.eval(), x, y


def explicit_tangent_hessian(problem: ModuleProblem) -> torch.Tensor:
    """P H P [P, P] by torch.func.hessian of the eval-mode loss."""
    theta = problem.theta[0]
    hessian = torch.func.hessian(lambda t: F.cross_entropy(problem.logits(t, problem.x), problem.y))(theta)
    proj = torch.eye(len(theta), dtype=theta.dtype) - torch.outer(theta, theta) / theta.dot(theta)
    return proj @ hessian @ proj


def test_tangent_top5_and_trace_equal_the_explicit_projected_hessian(net_and_data):
    model, x, y = net_and_data
    problem = ModuleProblem(model, x, y, on_sphere=True)
    assert problem.theta.shape == (1, 126)
    out = measure_curvature(problem, 5, 125, 48, 8, (0,))   # a full Krylov space of the tangent space
    explicit = explicit_tangent_hessian(problem)
    top = torch.linalg.eigvalsh(explicit).flip(0)[:5]
    torch.testing.assert_close(torch.stack([out[f"eig_{i + 1}"][0] for i in range(5)]), top, rtol=1e-6, atol=0)
    assert abs(out["hessian_trace"][0] - explicit.trace()) < 3 * out["hessian_trace_se"][0]
    assert out["sharpness"][0] > 0 and torch.isfinite(out["grad_noise_ratio"]).all()
    # The empirical Fisher trace equals the mean squared norm of explicit tangent per-sample gradients.
    theta = problem.theta[0]
    grads = torch.stack([torch.func.grad(lambda t: F.cross_entropy(problem.logits(t, x[i:i + 1]), y[i:i + 1]))(theta)
                         for i in range(len(x))])
    tangent = grads - (grads @ theta)[:, None] * theta / theta.dot(theta)
    torch.testing.assert_close(out["fisher_trace_empirical"][0], tangent.square().sum(1).mean())


def test_tangent_hessian_annihilates_theta(net_and_data):
    model, x, y = net_and_data
    problem = ModuleProblem(model, x, y, on_sphere=True)
    random = problem.hvp(torch.randn(1, 126, generator=generator("v"), dtype=torch.float64))
    assert problem.hvp(problem.theta).norm() < 1e-12 * random.norm()
    assert random.norm() > 0


def scaled(model: SIConvNet, c: float) -> SIConvNet:
    """The model at cθ with the BN statistics cθ produces (mean × c, var × c²), BN eps 0 in both."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for p in si_parameters(out):
            p.mul_(c)
        for m in out.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.mul_(c)
                m.running_var.mul_(c * c)
    return out


@settings(max_examples=6, deadline=None)
@given(c=st.floats(0.25, 4.0))
def test_image_curvature_follows_the_inverse_square_law(net_and_data, c):
    model, x, y = net_and_data
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eps = 0.0  # eps breaks the invariance slightly; without it the law is exact
    base = measure_curvature(ModuleProblem(model, x, y, True), 3, 10, 4, 8, (1,))
    at_c = measure_curvature(ModuleProblem(scaled(model, c), x, y, True), 3, 10, 4, 8, (1,))
    for name in ("eig_1", "eig_2", "eig_3", "hessian_trace", "fisher_trace_empirical"):
        torch.testing.assert_close(at_c[name] * c ** 2, base[name], rtol=1e-7, atol=0)
    for name in ("sharpness_unit", "hessian_trace_unit", "fisher_trace_empirical_unit", "grad_noise_ratio"):
        torch.testing.assert_close(at_c[name], base[name], rtol=1e-7, atol=0)


def test_practical_models_use_the_full_parameter_space(net_and_data):
    model, x, y = net_and_data
    problem = ModuleProblem(model, x, y, on_sphere=False)
    theta = problem.theta[0]
    hessian = torch.func.hessian(lambda t: F.cross_entropy(problem.logits(t, x), y))(theta)
    v = torch.randn(1, 2, 126, generator=generator("full"), dtype=torch.float64)
    torch.testing.assert_close(problem.hvp(v)[0], v[0] @ hessian, rtol=1e-9, atol=1e-12)
    out = measure_curvature(problem, 2, 126, 2, 8, (0,))
    torch.testing.assert_close(out["eig_1"][0], torch.linalg.eigvalsh(hessian)[-1], rtol=1e-6, atol=0)
    assert torch.isnan(out["sharpness_unit"]).all()  # no unit norm without an SI group


def test_k_larger_than_the_tangent_dimension_is_a_one_line_error(net_and_data):
    model, _, _ = net_and_data
    check_image_curvature_model(model, 125, True)
    with pytest.raises(ConfigError, match="top_k=126 exceeds the 125 dimensions") as err:
        check_image_curvature_model(model, 126, True)
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_image_curvature_measurement_end_to_end(tmp_path, colour_folder):
    from lrfeatures.config import load_config
    from lrfeatures.experiments import Experiment

    folder = colour_folder(tmp_path / "set", ["ant", "bee", "cat"], seed=0, n_per_class=12, size=8)
    cfg = load_config({"kind": "images", "name": "tiny-curvature",
                       "data": {"dataset": f"folder:{folder}"},
                       "model": {"name": "convnet-si", "width": 2, "depth": 1},
                       "pretrain": {"lrs": [1e-3, 0.3], "epochs": 2, "batch_size": 8},
                       "finetune": {"lrs": [1e-3], "epochs": 1}, "swa": {"ks": [1]},
                       "curvature": {"enabled": True, "samples": 16, "iterations": 6, "probes": 3, "top_k": 2}})
    with pytest.warns(UserWarning, match="one model at a time"):
        Experiment(cfg, tmp_path / "run").run()
    table = pd.read_parquet(tmp_path / "run" / "curvature.parquet")
    assert sorted(table["stage"].unique()) == ["finetune", "pretrain", "swa"]
    assert len(table) == 2 * 3 and set(table["space"]) == {"tangent"} and set(table["bn"]) == {"eval"}
    finite = table[~table["diverged"]]
    assert len(finite) and (finite["sharpness"] > 0).all() and finite["hessian_trace_se"].notna().all()
    norms = pd.read_parquet(tmp_path / "run" / "filter_norms.parquet")
    assert set(norms["layer"]) == {"features.0", "features.3"} and len(norms) == 2 * len(table)
    block = json.loads((tmp_path / "run" / "summary.json").read_text())["per_plr"][0]["curvature"]
    assert set(block) == {"pretrain", "finetune", "swa"} and block["pretrain"]["sharpness"]["n"] == 1
    from lrfeatures.report import write_report

    write_report(tmp_path / "run")
    assert (tmp_path / "run" / "figures" / "curvature.png").is_file()


IMAGE_CONFIG = {"kind": "images", "name": "tiny-errors", "data": {"dataset": "folder:/nonexistent"},
                "model": {"name": "convnet-si", "width": 2, "depth": 1},
                "pretrain": {"lrs": [1e-3], "epochs": 2, "batch_size": 8}, "swa": {"ks": [1]}}


@pytest.mark.parametrize("section, fields, message", [
    ("curvature", {"enabled": True, "probes": 0}, "curvature.probes=0 must be > 0"),
    ("curvature", {"enabled": True, "probes": -2}, "curvature.probes=-2 must be > 0"),
    ("pretrain", {"stages": [{}]}, r"pretrain.stages\[0\] is empty"),
    ("pretrain", {"stages": [{"lr": -0.1, "epochs": 1}]}, r"pretrain.stages\[0\].lr=-0.1 must be > 0"),
    ("pretrain", {"stages": [{"lr": 0.0, "epochs": 1}]}, "exactly one of lr"),
])
def test_bad_image_curvature_and_stage_settings_are_one_line_errors(section, fields, message):
    from lrfeatures.config import load_config

    data = {**IMAGE_CONFIG, section: {**IMAGE_CONFIG.get(section, {}), **fields}}
    with pytest.raises(ConfigError, match=message) as err:
        load_config(data)
    assert "\n" not in str(err.value)
