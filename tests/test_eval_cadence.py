"""The C kernel's fused train+test evaluation at the paper's 5-step cadence, against the torch one.

Every logged evaluation metric (train/test loss and accuracy) of a native grid run logged every
5 steps is recomputed from the weights of that step with the torch kernels (the evaluation the
engine used before the fused one). Accuracy counts must be identical; losses agree to 2e-6
relative in float32 (a few ulps of a sum over ~500-2000 samples in another order), 1e-12 in float64.
"""

from __future__ import annotations

import pytest
import torch

from lrfeatures.config import ModelConfig, SyntheticDataConfig
from lrfeatures.data.synthetic import make_synthetic
from lrfeatures.engine.grid import GridTrainer, evaluate_models
from lrfeatures.engine.native import NativeMLP
from lrfeatures.models import build_model

from grids import make_task

LOSS_RTOL = {torch.float32: 2e-6, torch.float64: 1e-12}


@pytest.fixture(scope="module")
def data():
    """A tick data set with train and test sets of different sizes, neither a multiple of 64."""
    return make_synthetic(SyntheticDataConfig(n_train=300, n_test=500, n_probe=10), seed=11)


def make_model():
    """The paper's SI MLP (32-32-32-1)."""
    return build_model(ModelConfig(), (32,), 1, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_evaluation_matches_torch_evaluation_every_5_steps(data, dtype):
    """Logged metrics every 5 steps equal the torch kernels' evaluation of the same weights."""
    iterations, cadence = 40, 5
    task = make_task([1e-3, 0.05, 0.8], seeds=(0, 1), iterations=iterations, dtype=dtype, log_every=cadence,
                     ckpt_every=cadence, keep=iterations // cadence)
    x_train, y_train, x_test, y_test = (t.to(dtype) for t in (data.x_train, data.y_train, data.x_test, data.y_test))
    assert NativeMLP.create(make_model().to(dtype), torch.device("cpu"), dtype) is not None
    result = GridTrainer(make_model, native=True).train(task, x_train, y_train, x_test, y_test)
    assert result.log_steps == list(range(0, iterations + 1, cadence))
    weights = torch.cat([task.init.unsqueeze(0), result.checkpoints])  # [logs, M, P]: step 0, 5, 10, ...
    compared = 0
    for row, step in enumerate(result.log_steps):
        for name, (x, y) in {"train": (x_train, y_train), "test": (x_test, y_test)}.items():
            loss, acc = evaluate_models(lambda: make_model().to(dtype), weights[row], task.frozen, x, y, native=False)
            counts = (result.logs[f"{name}_acc"][row] * len(x)).round()
            assert torch.equal(counts, (acc * len(x)).round()), f"{name} accuracy counts differ at step {step}"
            torch.testing.assert_close(result.logs[f"{name}_loss"][row], loss, rtol=LOSS_RTOL[dtype], atol=0)
            compared += 1
    assert compared == 2 * len(result.log_steps)
    assert torch.isfinite(result.logs["test_loss"]).all() and (result.logs["train_acc"][-1] > 0.5).any()


def test_one_pass_over_two_sets_equals_two_passes(data):
    """evaluate_sets on [train, test] gives bit-identical results to one call per set."""
    model = make_model()
    kernel = NativeMLP.create(model, torch.device("cpu"), torch.float32)
    task = make_task([1e-3], seeds=(0, 1, 2))
    theta, head = task.init.contiguous(), task.frozen["head.weight"]
    both = kernel.prepare([(data.x_train, data.y_train), (data.x_test, data.y_test)])
    loss, acc = kernel.evaluate_sets(theta, head, both)
    assert loss.shape == acc.shape == (2, 3)
    for k, (x, y) in enumerate([(data.x_train, data.y_train), (data.x_test, data.y_test)]):
        single_loss, single_acc = kernel.evaluate(theta, head, x, y)
        assert torch.equal(loss[k], single_loss) and torch.equal(acc[k], single_acc)
    assert ((acc > 0) & (acc < 1)).all() and (loss > 0).all()
