"""Curvature (analysis/curvature.py): Lanczos and Hutchinson on known spectra, the batched SI-MLP code
against explicit tangent-projected Hessians, the 1/c² law, config errors, and the measurement end to end."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lrfeatures.analysis.curvature import (CurvatureProblem, explicit_tangent_hessian, functional_logits,
                                           hutchinson, lanczos, measure_curvature, seeded_subset)
from lrfeatures.engine.kernels import kernel_for
from lrfeatures.errors import ConfigError
from lrfeatures.experiments import Experiment, load_experiment_config
from lrfeatures.experiments.synthetic import SyntheticRecipe
from lrfeatures.seeding import generator
from lrfeatures.store import ExperimentStore

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def quadratic(eigenvalues: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A symmetric matrix [P, P] with the given spectrum in a random orthonormal basis."""
    q, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), generator=generator("q", seed),
                                       dtype=torch.float64))
    return q @ torch.diag(eigenvalues) @ q.T


def batched(matrices: torch.Tensor):
    """hvp of M quadratics [M, P, P] on v [M, P] or [M, S, P]."""
    return lambda v: torch.einsum("mpq,mq->mp", matrices, v) if v.dim() == 2 else \
        torch.einsum("mpq,msq->msp", matrices, v)


def test_lanczos_finds_the_top_k_of_a_known_spectrum_exactly():
    spectra = torch.stack([torch.linspace(-3, 10, 60, dtype=torch.float64),
                           torch.logspace(-2, 2, 60, dtype=torch.float64)])
    matrices = torch.stack([quadratic(s, i) for i, s in enumerate(spectra)])
    gen = generator("start")
    ritz = lanczos(batched(matrices), torch.randn(2, 60, generator=gen, dtype=torch.float64), 60,
                   lambda v: v, gen)
    top = spectra.sort(1, descending=True).values[:, :5]
    torch.testing.assert_close(ritz[:, :5], top, rtol=1e-10, atol=1e-10)  # a full Krylov space is exact
    # Fewer steps: the largest eigenvalue of a spread spectrum is already converged.
    ritz = lanczos(batched(matrices), torch.randn(2, 60, generator=gen, dtype=torch.float64), 30, lambda v: v, gen)
    torch.testing.assert_close(ritz[:, 0], top[:, 0], rtol=1e-8, atol=0)


def test_lanczos_restarts_when_its_krylov_space_closes():
    # Three distinct eigenvalues: the Krylov space of any start vector closes after 3 steps.
    spectrum = torch.tensor([5.0] * 4 + [2.0] * 10 + [-1.0] * 16, dtype=torch.float64)
    matrix = quadratic(spectrum)[None]
    gen = generator("start")
    ritz = lanczos(batched(matrix), torch.randn(1, 30, generator=gen, dtype=torch.float64), 30, lambda v: v, gen)
    torch.testing.assert_close(ritz[0], spectrum, rtol=1e-9, atol=1e-9)


def test_hutchinson_is_within_three_standard_errors_and_exact_for_a_diagonal():
    matrices = torch.stack([quadratic(torch.linspace(-1, 4, 50, dtype=torch.float64), i) for i in range(4)])
    trace, se = hutchinson(batched(matrices), (4, 50), 64, generator("probes"), torch.float64)
    exact = torch.diagonal(matrices, dim1=1, dim2=2).sum(1)
    assert ((trace - exact).abs() < 3 * se).all() and (se > 0).all()
    diagonal = torch.diag_embed(torch.rand(2, 50, generator=generator("d"), dtype=torch.float64))
    trace, _ = hutchinson(batched(diagonal), (2, 50), 3, generator("probes"), torch.float64)
    torch.testing.assert_close(trace, torch.diagonal(diagonal, dim1=1, dim2=2).sum(1))  # z_i² = 1


@pytest.fixture(scope="module")
def trained(tiny_run):
    """Pre-trained tiny-run models at PLRs 1e-3, 1e-2, 0.3 (regimes 1, 2, 3), float64, with their subset."""
    store = ExperimentStore(tiny_run)
    cfg = store.config()
    runner = SyntheticRecipe().open(cfg, store)
    shard = next(s for s in Experiment(cfg, tiny_run).plan() if s.stage == "pretrain")
    theta = runner.pretrained(shard)["final"][:3].double()          # seed 0: the three PLRs
    frozen = {k: v[:3].double() for k, v in runner.frozen_of(shard, 3).items()}
    data = runner.data(0)
    x, y = seeded_subset(data.x_train, data.y_train, 96, 0, 0)
    template = runner.make_model().double()
    assert torch.isfinite(theta).all()
    return template, CurvatureProblem(kernel_for(template), theta, frozen, x.double(), y.double())


def test_batched_tangent_top5_equals_the_explicit_projected_hessian(trained):
    template, problem = trained
    assert problem.theta.shape == (3, 2048)
    out = measure_curvature(problem, 5, 400, 64, 16, (0,))
    for m in range(3):
        explicit = explicit_tangent_hessian(template, problem.theta[m], {k: v[m] for k, v in problem.frozen.items()},
                                            problem.x, problem.y)
        top = torch.linalg.eigvalsh(explicit).flip(0)[:5]
        batched_top = torch.stack([out[f"eig_{i + 1}"][m] for i in range(5)])
        torch.testing.assert_close(batched_top, top, rtol=1e-6, atol=0)
        # Hutchinson's estimate is within 3 of its standard errors of the explicit trace.
        assert abs(out["hessian_trace"][m] - explicit.trace()) < 3 * out["hessian_trace_se"][m]


def test_fisher_traces_and_gradient_noise_equal_explicit_per_sample_gradients(trained):
    template, problem = trained
    out = measure_curvature(problem, 1, 2, 1, 16, (0,))
    logits = functional_logits(template)
    for m in range(3):
        frozen = {k: v[m] for k, v in problem.frozen.items()}
        theta = problem.theta[m]
        z = logits(theta, frozen, problem.x)                                          # [N]
        dz = torch.func.vmap(torch.func.grad(lambda t, xi: logits(t, frozen, xi[None])[0]),
                             in_dims=(None, 0))(theta, problem.x)                     # [N, P]
        p, sq = torch.sigmoid(z), dz.square().sum(1)
        torch.testing.assert_close(out["fisher_trace_empirical"][m], ((problem.y - p).square() * sq).mean())
        torch.testing.assert_close(out["fisher_trace_true"][m], (p * (1 - p) * sq).mean())
        batches = [torch.func.grad(lambda t: torch.nn.functional.binary_cross_entropy_with_logits(
            logits(t, frozen, problem.x[i:i + 16]), problem.y[i:i + 16]))(theta) for i in range(0, 96, 16)]
        g = torch.stack(batches)
        torch.testing.assert_close(out["grad_noise_ratio"][m], g.square().sum(1).mean() / g.mean(0).square().sum())


def test_tangent_hessian_annihilates_theta(trained):
    template, problem = trained
    hv = problem.hvp(problem.theta)
    assert (hv.norm(dim=1) < 1e-9 * problem.hvp(torch.randn_like(problem.theta)).norm(dim=1)).all()
    # Without the projection, scale invariance gives H θ = −∇L (differentiate ∇L(cθ) = ∇L(θ)/c at c = 1),
    # up to LayerNorm's eps (1e-7), which breaks the invariance slightly; regimes 1 and 2 only.
    full = CurvatureProblem(problem.kernel, problem.theta[:2], {k: v[:2] for k, v in problem.frozen.items()},
                            problem.x, problem.y, on_sphere=False)
    gradient = full.gradient(problem.x, problem.y)
    assert ((full.hvp(full.theta) + gradient).norm(dim=1) < 1e-3 * gradient.norm(dim=1)).all()


@settings(max_examples=8, deadline=None)
@given(c=st.floats(0.2, 5.0))
def test_curvature_follows_the_inverse_square_law(trained, c):
    template, problem = trained
    kernel = kernel_for(template)
    kernel.eps = 0.0  # LayerNorm's eps breaks scale invariance at ~1e-5; without it the law is exact
    one = CurvatureProblem(kernel, problem.theta[1:2], {k: v[1:2] for k, v in problem.frozen.items()},
                           problem.x, problem.y)
    scaled = CurvatureProblem(one.kernel, c * one.theta, one.frozen, one.x, one.y)
    base, at_c = measure_curvature(one, 3, 12, 4, 16, (1,)), measure_curvature(scaled, 3, 12, 4, 16, (1,))
    for name in ("eig_1", "eig_2", "eig_3", "hessian_trace", "fisher_trace_empirical", "fisher_trace_true"):
        torch.testing.assert_close(at_c[name] * c ** 2, base[name], rtol=1e-7, atol=0)
    for name in ("sharpness_unit", "hessian_trace_unit", "fisher_trace_true_unit", "grad_noise_ratio"):
        torch.testing.assert_close(at_c[name], base[name], rtol=1e-7, atol=0)


@pytest.mark.parametrize("override, message", [
    ("curvature.probes=0", "curvature.probes=0 must be > 0"),
    ("curvature.probes=-3", "curvature.probes=-3 must be > 0"),
    ("curvature.top_k=0", "curvature.top_k=0 must be > 0"),
    ("curvature.samples=0", "curvature.samples=0 must be > 0"),
    ("curvature.iterations=3", "must be >= curvature.top_k=5"),
    ("curvature.stages=['warmup']", "curvature.stages"),
])
def test_bad_curvature_settings_are_one_line_errors(tiny_overrides, override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")) as err:
        load_experiment_config("synthetic-quick", tiny_overrides + ["curvature.enabled=true", override])
    assert "\n" not in str(err.value)


def test_k_larger_than_the_parameter_count_is_a_one_line_error(tiny_overrides):
    with pytest.raises(ConfigError, match="top_k=2048 exceeds the 2047 dimensions") as err:
        load_experiment_config("synthetic-quick", tiny_overrides + ["curvature.enabled=true", "curvature.top_k=2048",
                                                                    "curvature.iterations=3000"])
    assert "\n" not in str(err.value)


def test_curvature_measurement_end_to_end(make_tiny_config, tmp_path):
    from lrfeatures.report import write_report

    cfg = make_tiny_config(curvature={"enabled": True, "samples": 32, "iterations": 6, "probes": 3,
                                      "top_k": 2, "stages": ["pretrain", "swa"]},
                           finetune={"lrs": [1e-3], "iterations": 50, "log_every": 50})
    summary = Experiment(cfg, tmp_path / "run").run()
    table = pd.read_parquet(tmp_path / "run" / "curvature.parquet")
    evaluations = pd.read_parquet(tmp_path / "run" / "evaluations.parquet")
    keys = ["stage", "data_seed", "train_seed", "plr", "swa_k"]
    expected = evaluations[evaluations["stage"].isin(["pretrain", "swa"])][keys]
    pd.testing.assert_frame_equal(table[keys].sort_values(keys, ignore_index=True),
                                  expected.sort_values(keys, ignore_index=True))
    assert set(table["space"]) == {"tangent"} and (table["samples"] == 32).all()
    assert {"eig_1", "eig_2", "sharpness_unit", "hessian_trace_se", "grad_noise_ratio"} <= set(table.columns)
    block = summary["per_plr"][0]["curvature"]
    assert set(block) == {"pretrain", "swa"} and block["pretrain"]["sharpness"]["n"] == 2
    assert set(block["swa"]) == {"2", "5"}
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["per_plr"][0]["curvature"] == block
    write_report(tmp_path / "run")
    assert (tmp_path / "run" / "figures" / "curvature.png").is_file()
    assert (tmp_path / "run" / "figures" / "grad_noise.png").is_file()


def test_curvature_is_off_by_default(tiny_run):
    assert not (pd.read_parquet(tiny_run / "curvature.parquet") if (tiny_run / "curvature.parquet").is_file()
                else pd.DataFrame()).shape[0]
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert all("curvature" not in entry for entry in summary["per_plr"])
    assert not (tiny_run / "figures" / "curvature.png").exists()


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_handwritten_mlp_hvp_equals_autograd_double_backward(activation):
    from lrfeatures.models.mlp import SIMLP

    template = SIMLP(6, 5, 3, 1, activation).double()
    gen = generator("hvp", activation)
    m, p = 3, 6 * 5 + 5 * 5 * 2
    theta = torch.randn(m, p, generator=gen, dtype=torch.float64)
    frozen = {"head.weight": torch.randn(m, 1, 5, generator=gen, dtype=torch.float64)}
    x, y = torch.randn(20, 6, generator=gen, dtype=torch.float64), (torch.rand(20, generator=gen) > 0.5).double()
    fast = CurvatureProblem(kernel_for(template), theta, frozen, x, y)
    slow = CurvatureProblem(kernel_for(template), theta, frozen, x, y)
    slow.handwritten = False  # autograd's double backward through the same kernel
    assert fast.handwritten
    v = torch.randn(m, 4, p, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(fast.hvp(v), slow.hvp(v), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fast.hvp(v[:, 0]), slow.hvp(v[:, 0]), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fast.gradient(x, y), slow.gradient(x, y), rtol=1e-10, atol=1e-12)
    assert fast.hvp(v).abs().max() > 1e-3  # not trivially zero
