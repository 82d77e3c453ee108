"""The grid engine against the reference engine, and the hand-written kernel against autograd."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lrfeatures.config import ModelConfig, SyntheticDataConfig
from lrfeatures.data.synthetic import make_synthetic
from lrfeatures.engine.common import loss_and_correct
from lrfeatures.engine.grid import GridTrainer, plan_chunks
from lrfeatures.engine.kernels import FuncKernel, MLPKernel
from lrfeatures.engine.reference import train_reference
from lrfeatures.models import build_model, si_parameters
from lrfeatures.sphere import flatten

from grids import make_task


@pytest.fixture(scope="module")
def data():
    """A small tick data set."""
    return make_synthetic(SyntheticDataConfig(n_train=256, n_test=256, n_probe=10), seed=3)


def builder(model_cfg=ModelConfig(), num_outputs=1):
    """A model factory as the engines expect it."""
    return lambda: build_model(model_cfg, (32,), num_outputs, 0)


@settings(max_examples=12, deadline=None)
@given(depth=st.integers(1, 3), activation=st.sampled_from(["relu", "tanh"]),
       classes=st.sampled_from([1, 3]), shared=st.booleans(), seed=st.integers(0, 1000))
def test_mlp_kernel_matches_autograd(depth, activation, classes, shared, seed):
    """The hand-written batched backward equals autograd on the nn.Module, model by model."""
    torch.manual_seed(seed)
    cfg = ModelConfig(depth=depth, activation=activation, width=8)
    models = [build_model(cfg, (32,), classes, seed + i).double() for i in range(3)]
    kernel = MLPKernel(models[0])
    weights = [torch.stack(ws) for ws in zip(*[[w.detach() for w in si_parameters(m)] for m in models])]
    head = torch.stack([m.head.weight.detach() for m in models])
    x = torch.randn(5, 32, dtype=torch.float64) if shared else torch.randn(3, 5, 32, dtype=torch.float64)
    y = (torch.rand(5) > 0.5).double() if classes == 1 else torch.randint(0, classes, (5,))
    y = y if shared else y.expand(3, 5)
    loss, grads = kernel.loss_and_grad(weights, head, x, y, shared)
    grad = flatten(grads, batch_dims=1)
    for m, model in enumerate(models):
        xm, ym = (x, y) if shared else (x[m], y[m])
        expected_loss = loss_and_correct(model(xm), ym)[0].mean()
        expected_grad = flatten(torch.autograd.grad(expected_loss, si_parameters(model)))
        torch.testing.assert_close(loss[m], expected_loss, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(grad[m], expected_grad, rtol=1e-8, atol=1e-10)


KERNELS = pytest.mark.parametrize("native", [True, False], ids=["c-kernel", "torch-kernel"])


@KERNELS
@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_grid_equals_reference_in_regime_one(data, dtype, atol, native):
    """Small LRs: both engines give the same weights, losses and gradient norms over 1,000 steps.

    float64 agrees to 1e-10. In float32, a ReLU input within rounding of 0 may take the other
    side in one engine: that flips one gradient entry and moves the weights by ~lr*|g|, so
    float32 agreement is checked at 1e-4 (weights are ~2e-2 per entry on the unit sphere).
    """
    task = make_task([1e-4, 1e-3, 3e-3], iterations=1000, log_every=100, dtype=dtype)
    x, y, x_test, y_test = (t.to(dtype) for t in (data.x_train, data.y_train, data.x_test, data.y_test))
    ref = train_reference(builder(), task, x, y, x_test, y_test)
    grid = GridTrainer(builder(), native=native).train(task, x, y, x_test, y_test)
    torch.testing.assert_close(grid.final, ref.final, rtol=0, atol=atol)
    for name in ("train_loss", "test_acc", "grad_norm", "grad_norm_mean", "batch_loss_mean"):
        torch.testing.assert_close(grid.logs[name], ref.logs[name], rtol=1e3 * atol, atol=atol, equal_nan=True)


def first_departure(a: torch.Tensor, b: torch.Tensor, tol: float) -> int:
    """Index of the first checkpoint where two trajectories [K, M, P] differ by more than tol."""
    gap = (a - b).abs().amax(dim=(1, 2))
    over = torch.nonzero(gap > tol)
    return int(over[0]) if len(over) else len(gap)


@KERNELS
@pytest.mark.parametrize("lr", [1e-2, 0.3])
def test_grid_tracks_reference_until_chaos(data, lr, native):
    """Chaotic LRs (regime 2 and 3): float32 rounding is amplified, so exact agreement cannot last.

    The check: both float32 engines are compared with a float64 run of the reference (the
    "exact" trajectory). The grid engine must stay within 1e-4 of it at least half as long as
    the float32 reference engine does: it is no worse an approximation of the true dynamics.
    Before the reference itself departs, the two float32 engines must also agree with each other.
    """
    task = make_task([lr], seeds=(0,), iterations=1000, ckpt_every=10, keep=100)
    exact = train_reference(builder(), make_task([lr], seeds=(0,), iterations=1000, ckpt_every=10, keep=100,
                                                 dtype=torch.float64),
                            data.x_train.double(), data.y_train.double(), data.x_test.double(), data.y_test.double())
    ref = train_reference(builder(), task, data.x_train, data.y_train, data.x_test, data.y_test)
    grid = GridTrainer(builder(), native=native).train(task, data.x_train, data.y_train, data.x_test, data.y_test)
    ref_departs = first_departure(ref.checkpoints.double(), exact.checkpoints, 1e-4)
    grid_departs = first_departure(grid.checkpoints.double(), exact.checkpoints, 1e-4)
    assert grid_departs >= ref_departs // 2
    agree = first_departure(grid.checkpoints, ref.checkpoints, 1e-4)
    assert agree >= min(ref_departs, grid_departs) // 2


def test_generic_kernel_matches_hand_kernel(data):
    """The torch.func path (any stateless model) gives the hand kernel's trajectories."""
    task = make_task([1e-3, 3e-3], iterations=100, log_every=50)
    hand = GridTrainer(builder(), native=False).train(task, data.x_train, data.y_train, data.x_test, data.y_test)
    trainer = GridTrainer(builder(), kernel=FuncKernel(builder()()))
    generic = trainer.train(task, data.x_train, data.y_train, data.x_test, data.y_test)
    torch.testing.assert_close(generic.final, hand.final, rtol=0, atol=1e-5)
    torch.testing.assert_close(generic.logs["train_loss"], hand.logs["train_loss"], rtol=1e-5, atol=1e-6)


def test_chunking_does_not_change_results(data):
    """A memory budget that forces many chunks gives the same results as one chunk.

    Kernels may round differently for different batch counts, so this uses non-chaotic LRs
    (a chaotic LR amplifies any last-bit difference; see test_grid_tracks_reference_until_chaos).
    """
    task = make_task([1e-4, 1e-3, 3e-3], seeds=(0, 1, 2), iterations=60, log_every=20, ckpt_every=20, keep=2)
    whole = GridTrainer(builder()).train(task, data.x_train, data.y_train, data.x_test, data.y_test)
    small = GridTrainer(builder(), memory_budget_gb=3e-4)
    per_model, _ = small.bytes_per_model(task, data.x_train)
    assert len(plan_chunks(task, per_model, small.budget)) > 2
    chunked = small.train(task, data.x_train, data.y_train, data.x_test, data.y_test)
    torch.testing.assert_close(chunked.final, whole.final, rtol=0, atol=1e-6)
    torch.testing.assert_close(chunked.checkpoints, whole.checkpoints, rtol=0, atol=1e-6)


def test_same_seed_bit_identical(data):
    """Training is deterministic: two runs of one task are bit-identical."""
    task = make_task([1e-3, 0.1], iterations=100, log_every=50)
    first = GridTrainer(builder()).train(task, data.x_train, data.y_train, data.x_test, data.y_test)
    second = GridTrainer(builder()).train(task, data.x_train, data.y_train, data.x_test, data.y_test)
    assert torch.equal(first.final, second.final)
    for name in first.logs:
        assert torch.equal(first.logs[name].nan_to_num(), second.logs[name].nan_to_num())


@KERNELS
def test_divergence_is_recorded_and_training_goes_on(data, native):
    """A step that overflows makes the model non-finite: it is marked and frozen, the others train on."""
    task = make_task([1e-3, 1e38], seeds=(0,), iterations=50, log_every=10)
    for result in (GridTrainer(builder(), native=native).train(task, data.x_train, data.y_train, data.x_test, data.y_test),
                   train_reference(builder(), task, data.x_train, data.y_train, data.x_test, data.y_test)):
        diverged = result.logs["diverged"][-1]
        assert diverged.tolist() == [0.0, 1.0]
        assert torch.isfinite(result.final[0]).all()
        assert result.logs["train_loss"][-1, 0] < result.logs["train_loss"][0, 0]


@KERNELS
def test_norm_preserved_every_step(data, native):
    """Every kept checkpoint of every model lies on the sphere."""
    task = make_task([1e-4, 1e-2, 1.0], iterations=100, ckpt_every=10, keep=10)
    result = GridTrainer(builder(), native=native).train(task, data.x_train, data.y_train, data.x_test, data.y_test)
    norms = result.checkpoints.norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms), rtol=0, atol=1e-6)


def test_compiled_step_matches_eager(data):
    """torch.compile fuses the step; in the non-chaotic regime the trajectories stay the same."""
    task = make_task([1e-4, 1e-3], iterations=100, log_every=50)
    eager = GridTrainer(builder(), native=False).train(task, data.x_train, data.y_train, data.x_test, data.y_test)
    fused = GridTrainer(builder(), compile=True, native=False).train(task, data.x_train, data.y_train, data.x_test, data.y_test)
    torch.testing.assert_close(fused.final, eager.final, rtol=0, atol=1e-5)
    torch.testing.assert_close(fused.logs["test_acc"], eager.logs["test_acc"], rtol=0, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(data):
    """The same code path on CUDA gives the CPU trajectories in the non-chaotic regime."""
    task = make_task([1e-4, 1e-3], iterations=300, log_every=100)
    cpu = GridTrainer(builder()).train(task, data.x_train, data.y_train, data.x_test, data.y_test)
    gpu_data = data.to("cuda")
    gpu = GridTrainer(builder()).train(task, gpu_data.x_train, gpu_data.y_train, gpu_data.x_test, gpu_data.y_test)
    torch.testing.assert_close(gpu.final, cpu.final, rtol=0, atol=1e-4)
