"""The compiled C kernel (engine/native.py) against the torch kernels it replaces."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lrfeatures.config import ModelConfig, SyntheticDataConfig
from lrfeatures.data.synthetic import make_synthetic
from lrfeatures.engine import native
from lrfeatures.engine.common import loss_and_correct
from lrfeatures.engine.grid import GridTrainer, evaluate_models
from lrfeatures.engine.kernels import MLPKernel
from lrfeatures.engine.native import NativeMLP
from lrfeatures.models import build_model, si_parameters
from lrfeatures.sphere import flatten, project, split

from grids import make_task

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def data():
    """A small tick data set in float64."""
    return make_synthetic(SyntheticDataConfig(n_train=200, n_test=120, n_probe=10), seed=5)


def grid_task(model_cfg: ModelConfig, lrs, seeds, iterations, batch, rule="projected", dtype=torch.float64):
    """lrs x seeds models, logged every 25 steps with the last three of the checkpoints every 20."""
    return make_task(lrs, seeds, iterations, dtype, log_every=25, ckpt_every=20, keep=3, model_cfg=model_cfg,
                     batch=batch, rule=rule)


def run(task, model_cfg, data, use_native, dtype=torch.float64):
    """Train the task with or without the C kernel."""
    trainer = GridTrainer(lambda: build_model(model_cfg, (32,), 1, 0), native=use_native)
    tensors = (data.x_train, data.y_train, data.x_test, data.y_test)
    return trainer.train(task, *(t.to(dtype) for t in tensors))


@settings(max_examples=10, deadline=None)
@given(depth=st.integers(1, 3), width=st.sampled_from([16, 32, 48]), batch=st.sampled_from([16, 7, 20, 32]),
       rule=st.sampled_from(["projected", "riemannian"]), seed=st.integers(0, 100))
def test_c_kernel_equals_torch_kernel(data, depth, width, batch, rule, seed):
    """float64, non-chaotic LRs: weights, checkpoints and every logged metric agree to 1e-10.

    Covers several depths and widths, batches that are not a multiple of the kernel's 16-sample
    vectors (padded lanes must not leak into the loss or gradient), and both sphere-step rules."""
    cfg = ModelConfig(depth=depth, width=width)
    task = grid_task(cfg, [1e-4, 2e-3], (seed, seed + 1), iterations=60, batch=batch, rule=rule)
    fast, slow = run(task, cfg, data, True), run(task, cfg, data, False)
    torch.testing.assert_close(fast.final, slow.final, rtol=0, atol=1e-10)
    torch.testing.assert_close(fast.checkpoints, slow.checkpoints, rtol=0, atol=1e-10)
    for name in slow.logs:
        torch.testing.assert_close(fast.logs[name], slow.logs[name], rtol=1e-10, atol=1e-10, equal_nan=True)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_evaluate_equals_torch_forward(data, dtype, tol):
    """Mean loss and accuracy on a set equal loss_and_correct of the torch forward pass,
    including a model with NaN weights (counted as predicting class 0, as torch does)."""
    cfg = ModelConfig()
    models = [build_model(cfg, (32,), 1, seed).to(dtype) for seed in range(5)]
    theta = torch.stack([project(flatten(si_parameters(m)).detach(), 1.0) for m in models])
    theta[4] = float("nan")
    head = torch.stack([m.head.weight.detach() for m in models])
    x, y = data.x_test.to(dtype), data.y_test.to(dtype)  # 120 samples: not a multiple of 64
    kernel = MLPKernel(models[0])
    logits = kernel.forward(split(theta, kernel.shapes), head, x, shared=True)
    loss, correct = loss_and_correct(logits, y)
    got_loss, got_acc = evaluate_models(lambda: build_model(cfg, (32,), 1, 0).to(dtype), theta,
                                        {"head.weight": head}, x, y)
    torch.testing.assert_close(got_loss, loss.mean(1), rtol=tol, atol=tol, equal_nan=True)
    torch.testing.assert_close(got_acc, correct.to(dtype).mean(1), rtol=0, atol=1e-12)
    assert torch.isnan(got_loss[4]) and got_acc[4] == (y < 0.5).to(dtype).mean()


def test_results_do_not_depend_on_thread_count(data):
    """Each model runs start to end on one thread, so even a chaotic LR in float32 gives
    bit-identical results with one thread or two."""
    cfg = ModelConfig()
    task = grid_task(cfg, [1e-3, 0.3], (0, 1, 2), iterations=200, batch=16, dtype=torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(task, cfg, data, True, torch.float32)
        torch.set_num_threads(2)
        two = run(task, cfg, data, True, torch.float32)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one.final, two.final)
    for name in one.logs:
        assert torch.equal(one.logs[name].nan_to_num(), two.logs[name].nan_to_num())


def test_diverged_model_matches_torch_kernel(data):
    """An overflowing step: the same step is flagged and the weights end up NaN in both kernels."""
    cfg = ModelConfig()
    task = grid_task(cfg, [1e-3, 1e38], (0,), iterations=40, batch=16, dtype=torch.float32)
    fast, slow = run(task, cfg, data, True, torch.float32), run(task, cfg, data, False, torch.float32)
    assert torch.equal(fast.logs["diverged"], slow.logs["diverged"])
    assert fast.logs["diverged"][-1].tolist() == [0.0, 1.0]
    assert torch.isnan(fast.final[1]).all() and torch.isnan(slow.final[1]).all()


@pytest.mark.parametrize("change", [dict(activation="tanh"), dict(width=24)])
def test_unsupported_models_use_torch(change):
    """tanh, widths that are not a multiple of 16, other devices, multi-class heads: no C kernel."""
    model = build_model(ModelConfig(**change), (32,), 1, 0)
    assert NativeMLP.create(model, CPU, torch.float32) is None
    plain = build_model(ModelConfig(), (32,), 1, 0)
    assert NativeMLP.create(plain, CPU, torch.float32) is not None
    assert NativeMLP.create(plain, torch.device("cuda"), torch.float32) is None
    assert NativeMLP.create(build_model(ModelConfig(), (32,), 3, 0), CPU, torch.float32) is None


def test_without_a_compiler_the_engine_falls_back(data, monkeypatch, tmp_path):
    """No C compiler: one warning, and the grid engine trains with its torch kernels."""
    monkeypatch.setattr(native, "compiler", lambda: None)
    monkeypatch.setattr(native, "_libraries", {})
    monkeypatch.setenv("LRF_CACHE_DIR", str(tmp_path))
    cfg = ModelConfig()
    task = grid_task(cfg, [1e-3], (0,), iterations=30, batch=16)
    with pytest.warns(UserWarning, match="compiled MLP kernel is unavailable"):
        result = run(task, cfg, data, True)
    expected = run(task, cfg, data, False)
    assert torch.equal(result.final, expected.final)


def test_compiled_library_is_cached(monkeypatch, tmp_path):
    """A second build of the same source and flags reuses the cached library."""
    monkeypatch.setenv("LRF_CACHE_DIR", str(tmp_path))
    first = native.build(torch.float32)
    stamp = first.stat().st_mtime_ns
    assert native.build(torch.float32) == first and first.stat().st_mtime_ns == stamp
    assert list(tmp_path.rglob("*.so")) == [first]


def test_kernel_works_in_a_forked_child(data):
    """A process forked after the kernel ran (multiprocessing's default on Linux) can still
    train: the child builds its own thread pool instead of waiting on its parent's threads."""
    import multiprocessing

    cfg = ModelConfig()
    task = grid_task(cfg, [1e-3], (0,), iterations=20, batch=16)
    expected = run(task, cfg, data, True)
    context = multiprocessing.get_context("fork")
    with context.Pool(1) as pool:
        final = pool.apply_async(_train_final, (task, cfg, data)).get(timeout=60)
    assert torch.equal(final, expected.final)


def _train_final(task, cfg, data):
    """Final weights of a task trained with the C kernel (run in a child process)."""
    return run(task, cfg, data, True).final


def test_mismatched_inputs_are_converted_or_refused():
    """Inputs in another dtype are converted; tensors written in place must already be right."""
    model = build_model(ModelConfig(), (32,), 1, 0)
    kernel = NativeMLP.create(model, CPU, torch.float32)
    theta = project(flatten(si_parameters(model)).detach(), 1.0).unsqueeze(0).contiguous()
    head = model.head.weight.detach().unsqueeze(0)
    x64, y64 = torch.randn(40, 32, dtype=torch.float64), (torch.rand(40) > 0.5).double()
    loss, _ = kernel.evaluate(theta, head, x64, y64)
    expected, _ = kernel.evaluate(theta, head, x64.float(), y64.float())
    assert torch.equal(loss, expected)
    with pytest.raises(ValueError, match="contiguous CPU torch.float32"):
        kernel.evaluate(theta.double(), head, x64, y64)


def test_build_tries_the_next_architecture_flag(monkeypatch, tmp_path):
    """A compiler that refuses the first -march/-mcpu spelling gets the next one."""
    monkeypatch.setenv("LRF_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(native, "ARCH_FLAGS", (["-march=no-such-cpu"], ["-march=native"]))
    path = native.build(torch.float32)
    assert path.exists() and len(list(tmp_path.rglob("*.so"))) == 1
    monkeypatch.setattr(native, "ARCH_FLAGS", (["-march=no-such-cpu"],))
    with pytest.raises(native.subprocess.CalledProcessError):
        native.build(torch.float64)
