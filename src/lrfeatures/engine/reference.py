"""The reference engine: one model at a time, a plain PyTorch loop. The oracle.

It stays simple on purpose: the fast grid engine must agree with it, and tests prove that.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from ..data.batches import batch_indices
from ..models.registry import si_parameters
from ..sphere import flatten, joint_norm, sphere_step_, unflatten_into_
from .common import LOG_FIELDS, GridResult, GridTask, loss_and_correct


def load_model_weights(model: nn.Module, task: GridTask, index: int) -> None:
    """Put model `index` of the task (SI weights and frozen tensors) into `model`."""
    unflatten_into_(task.init[index], si_parameters(model))
    state = model.state_dict()
    for name, stacked in task.frozen.items():
        state[name].copy_(stacked[index])


@torch.no_grad()
def evaluate_model(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Mean loss and accuracy of one model on a whole set."""
    loss, correct = loss_and_correct(model(x), y)
    return loss.mean().item(), correct.float().mean().item()


def train_reference(make_model: Callable[[], nn.Module], task: GridTask,
                    x_train: torch.Tensor, y_train: torch.Tensor,
                    x_test: torch.Tensor, y_test: torch.Tensor) -> GridResult:
    """Train each model of `task` in turn with a plain loop; same outputs as the grid engine."""
    log_steps, ckpt_steps = task.log_steps(), task.checkpoint_steps()
    logs = {k: torch.full((len(log_steps), task.num_models), float("nan"), dtype=task.init.dtype)
            for k in LOG_FIELDS}
    final = torch.empty_like(task.init)
    checkpoints = torch.empty(len(ckpt_steps), *task.init.shape, dtype=task.init.dtype)
    for m in range(task.num_models):
        model = make_model().to(x_train.device, task.init.dtype)
        load_model_weights(model, task, m)
        params = si_parameters(model)
        order = batch_indices(len(x_train), task.batch_size, task.streams[int(task.stream_of_model[m])],
                              0, task.iterations).to(x_train.device)
        lr = float(task.effective_lrs[m])
        diverged = not bool(torch.isfinite(task.init[m]).all())
        grad_sum, loss_sum, since_log, row = 0.0, 0.0, 0, 0
        grad_norm = float("nan")
        for step in range(task.iterations + 1):
            if step > 0:
                batch = order[step - 1]
                loss = loss_and_correct(model(x_train[batch]), y_train[batch])[0].mean()
                grads = torch.autograd.grad(loss, params)
                if not diverged:
                    grad_norm = joint_norm(list(grads)).item()
                # Divergence is sticky and recorded; the weights are non-finite from then on.
                diverged = diverged or not (math.isfinite(loss.item()) and math.isfinite(grad_norm))
                sphere_step_(params, list(grads), lr, task.rho, task.rule)
                if not diverged:
                    grad_sum, loss_sum, since_log = grad_sum + grad_norm, loss_sum + loss.item(), since_log + 1
            if step in ckpt_steps:
                checkpoints[ckpt_steps.index(step), m] = flatten(params).detach().cpu()
            if row < len(log_steps) and step == log_steps[row]:
                train_loss, train_acc = evaluate_model(model, x_train, y_train)
                test_loss, test_acc = evaluate_model(model, x_test, y_test)
                values = dict(train_loss=train_loss, train_acc=train_acc, test_loss=test_loss,
                              test_acc=test_acc, grad_norm=grad_norm if step else float("nan"),
                              grad_norm_mean=grad_sum / since_log if since_log else float("nan"),
                              batch_loss_mean=loss_sum / since_log if since_log else float("nan"),
                              diverged=float(diverged))
                for key, value in values.items():
                    logs[key][row, m] = value
                grad_sum, loss_sum, since_log, row = 0.0, 0.0, 0, row + 1
        final[m] = flatten(params).detach().cpu()
    return GridResult(final, checkpoints, ckpt_steps, log_steps, logs)
