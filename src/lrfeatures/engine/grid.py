"""The grid engine: a whole LR x seed grid of models as one batched program.

All models of a chunk step in lockstep: one batched forward/backward (see kernels.py), one
batched sphere step, and a device-side divergence mask, so a step never waits on the host.
Evaluation is batched over models too, at the task's log cadence. The grid is split into
chunks of models that fit a memory budget. On CPU the SI MLP runs through the compiled kernel
of native.py instead, one segment between two log or checkpoint steps per call.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable

import torch
from torch import nn

from ..data.batches import batch_indices
from ..sphere import flatten, joint_norm, sphere_step_, split
from .common import LOG_FIELDS, GridResult, GridTask, loss_and_correct
from .kernels import kernel_for
from .native import NativeMLP

STEPS_PER_BLOCK = 512  # batch indices are drawn this many steps at a time


def activation_elements(template: nn.Module, sample: torch.Tensor) -> int:
    """Elements of every module output for one input sample (a proxy for activation memory)."""
    total = 0

    def count(_module, _inputs, output):
        nonlocal total
        if isinstance(output, torch.Tensor):
            total += output[0].numel()

    handles = [m.register_forward_hook(count) for m in template.modules() if not list(m.children())]
    dtype = next(template.parameters()).dtype
    with torch.no_grad():
        template(sample[:1].to(dtype))
    for handle in handles:
        handle.remove()
    return max(total, 1)


def plan_chunks(task: GridTask, bytes_per_model: int, budget_bytes: float) -> list[torch.Tensor]:
    """Contiguous index ranges of models whose working set fits in the budget."""
    per_chunk = max(1, int(budget_bytes // bytes_per_model))
    return [torch.arange(lo, min(lo + per_chunk, task.num_models))
            for lo in range(0, task.num_models, per_chunk)]


def chunk_sums(kernel) -> Callable:
    """(parts, frozen, x, y) -> summed loss and number correct [M] on one shared chunk of samples."""

    def sums(parts, frozen, x, y):
        loss, correct = loss_and_correct(kernel.forward(parts, frozen, x, True), y)
        return loss.sum(1), correct.sum(1)

    return sums


@torch.no_grad()
def evaluate_grid(sums: Callable, parts: list[torch.Tensor], frozen, x: torch.Tensor, y: torch.Tensor,
                  chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean loss [M] and accuracy [M] of every model on a shared set, in sample chunks."""
    loss_sum = torch.zeros(parts[0].shape[0], device=parts[0].device, dtype=parts[0].dtype)
    correct_sum = torch.zeros_like(loss_sum)
    for lo in range(0, len(x), chunk_size):
        loss, correct = sums(parts, frozen, x[lo:lo + chunk_size], y[lo:lo + chunk_size])
        loss_sum += loss
        correct_sum += correct
    return loss_sum / len(x), correct_sum / len(x)


EVAL_CHUNK = 1024  # most samples per evaluation pass
EVAL_ELEMENTS = 2**19  # activations per layer and pass: small enough to stay in cache


def eval_chunk_size(num_models: int, width: int) -> int:
    """Samples per evaluation pass: many models -> small passes that stay in cache (~2 MB)."""
    return max(16, min(EVAL_CHUNK, EVAL_ELEMENTS // max(1, num_models * width)))


def evaluate_models(make_model: Callable[[], nn.Module], theta: torch.Tensor, frozen: dict[str, torch.Tensor],
                    x: torch.Tensor, y: torch.Tensor, memory_budget_gb: float = 4.0, native: bool = True
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and accuracy [M] of many flat-weight models on one set, chunked to the budget."""
    template = make_model().to(x.device)
    kernel = kernel_for(template)
    compiled_kernel = NativeMLP.create(template, x.device, theta.dtype) if native else None
    if compiled_kernel is not None:  # its working set is one model: no chunks needed
        return compiled_kernel.evaluate(theta.contiguous(), kernel.stack_frozen(frozen), x, y)
    acts = activation_elements(template, x)
    step = max(1, int(memory_budget_gb * 2**30 // (4 * (2 * theta.shape[1] + 3 * EVAL_CHUNK * acts))))
    results = [evaluate_grid(chunk_sums(kernel), split(theta[lo:lo + step], kernel.shapes),
                             kernel.stack_frozen({k: v[lo:lo + step] for k, v in frozen.items()}), x, y,
                             eval_chunk_size(min(step, theta.shape[0] - lo), acts))
               for lo in range(0, theta.shape[0], step)]
    return torch.cat([r[0] for r in results]), torch.cat([r[1] for r in results])


def compiled(step: Callable) -> Callable:
    """torch.compile(step), falling back to eager (with a warning) where compiling fails."""
    compiled_step = torch.compile(step, dynamic=False)
    state = {"fn": compiled_step}

    def run(*args):
        try:
            return state["fn"](*args)
        except Exception as err:  # no C++ compiler, unsupported backend, ...
            if state["fn"] is step:
                raise
            warnings.warn(f"torch.compile failed ({type(err).__name__}); running the grid engine eagerly")
            state["fn"] = step
            return step(*args)

    return run


class GridTrainer:
    """Trains a GridTask chunk by chunk; the model template fixes the architecture."""

    def __init__(self, make_model: Callable[[], nn.Module], memory_budget_gb: float = 4.0,
                 progress: Callable[[int], None] | None = None, compile: bool = False, kernel=None,
                 native: bool = True):
        self.template = make_model()
        # The compiled C kernel (native.py) trains SI MLPs on CPU; other models and devices use torch.
        self.native = native and kernel is None
        self.kernel = kernel or kernel_for(self.template)
        self.budget = memory_budget_gb * 2**30
        self.progress = progress or (lambda steps: None)
        # torch.compile fuses the element-wise work of a step (LayerNorm, ReLU, the sphere
        # projection): about 2x on CPU. Off for tiny grids, where compiling costs more than it saves.
        self.step = compiled(self.lockstep) if compile else self.lockstep
        self.sums = compiled(chunk_sums(self.kernel)) if compile else chunk_sums(self.kernel)

    def lockstep(self, parts: list[torch.Tensor], frozen, lrs: torch.Tensor, xb: torch.Tensor, yb: torch.Tensor,
                 shared: bool, active: torch.Tensor, grad_norm: torch.Tensor, rho: float, rule: str):
        """One step of every model: loss and gradient, divergence flags, sphere step (in place)."""
        loss, grads = self.kernel.loss_and_grad(parts, frozen, xb, yb, shared)
        grad_norm = torch.where(active, joint_norm(grads, 1), grad_norm)
        # Divergence is sticky and recorded; a diverged model's weights are non-finite and
        # stay so, exactly as in the reference engine.
        active = active & torch.isfinite(loss) & torch.isfinite(grad_norm)
        sphere_step_(parts, grads, lrs, rho, rule, batch_dims=1)
        return loss, grad_norm, active

    def bytes_per_model(self, task: GridTask, sample: torch.Tensor) -> tuple[int, int]:
        """Working-set bytes of one model (an upper bound), and its activations per sample."""
        num_params = task.init.shape[1] + sum(v[0].numel() for v in task.frozen.values())
        acts = activation_elements(self.template.to(sample.device), sample)
        per_model = 4 * (8 * num_params + task.keep_checkpoints * task.init.shape[1]
                         + 8 * task.batch_size * acts + 3 * EVAL_CHUNK * acts)
        return per_model, acts

    def train(self, task: GridTask, x_train: torch.Tensor, y_train: torch.Tensor,
              x_test: torch.Tensor, y_test: torch.Tensor) -> GridResult:
        """Train all models of the task; results in the task's model order."""
        per_model, acts = self.bytes_per_model(task, x_train)
        chunks = plan_chunks(task, per_model, self.budget)
        return GridResult.concat([self.train_chunk(task.select(idx), x_train, y_train, x_test, y_test,
                                                   eval_chunk_size(len(idx), acts)) for idx in chunks])

    def train_chunk(self, task: GridTask, x_train, y_train, x_test, y_test, eval_chunk: int) -> GridResult:
        """Train one chunk in lockstep, in segments between log and checkpoint steps."""
        device, num_models, kernel = x_train.device, task.num_models, self.kernel
        theta = task.init.to(device, copy=True).contiguous()
        dtype = theta.dtype
        native = NativeMLP.create(self.template, device, dtype) if self.native else None
        # The torch kernels want contiguous parts; the compiled one works on theta itself.
        parts = split(theta, kernel.shapes) if native else [p.contiguous() for p in split(theta, kernel.shapes)]
        frozen = kernel.stack_frozen({k: v.to(device) for k, v in task.frozen.items()})
        lrs = task.effective_lrs.to(device, dtype)
        floats = dict(device=device, dtype=dtype)
        used, local_stream = torch.unique(task.stream_of_model, return_inverse=True)
        local_stream = local_stream.to(device)
        shared = len(used) == 1  # one batch stream: the first layer is one large GEMM
        log_steps, ckpt_steps = task.log_steps(), task.checkpoint_steps()
        logs = {k: torch.full((len(log_steps), num_models), math.nan, **floats) for k in LOG_FIELDS}
        checkpoints = torch.empty(len(ckpt_steps), num_models, task.init.shape[1], **floats)
        sums = dict(active=torch.isfinite(task.init).all(1).to(device),  # a diverged start (fine-tuning) stays so
                    grad_norm=torch.full((num_models,), math.nan, **floats), grad_sum=torch.zeros(num_models, **floats),
                    loss_sum=torch.zeros(num_models, **floats), count=torch.zeros(num_models, **floats))

        # The C kernel evaluates train and test in one fused pass per model, on sets laid out once.
        eval_sets = native.prepare([(x_train, y_train), (x_test, y_test)]) if native is not None else None

        def evaluate_both():
            if native is None:
                return (*evaluate_grid(self.sums, parts, frozen, x_train, y_train, eval_chunk),
                        *evaluate_grid(self.sums, parts, frozen, x_test, y_test, eval_chunk))
            loss, acc = native.evaluate_sets(theta, frozen, eval_sets)  # [2, M] each
            return loss[0], acc[0], loss[1], acc[1]

        def log(row: int) -> None:
            train_loss, train_acc, test_loss, test_acc = evaluate_both()
            values = dict(train_loss=train_loss, train_acc=train_acc, test_loss=test_loss, test_acc=test_acc,
                          grad_norm=sums["grad_norm"], grad_norm_mean=sums["grad_sum"] / sums["count"],
                          batch_loss_mean=sums["loss_sum"] / sums["count"], diverged=(~sums["active"]).to(dtype))
            for key, value in values.items():
                logs[key][row] = value
            for key in ("grad_sum", "loss_sum", "count"):
                sums[key].zero_()

        def advance(order: torch.Tensor) -> None:
            """Every model through order's steps ([streams, steps, B])."""
            if native is not None:
                native.train(theta, frozen, lrs, task.rho, task.rule, x_train, y_train, order,
                             local_stream, sums)
                return
            for j in range(order.shape[1]):
                batch = order[0, j] if shared else order[:, j][local_stream]
                loss, sums["grad_norm"], sums["active"] = self.step(
                    parts, frozen, lrs, x_train[batch], y_train[batch], shared, sums["active"], sums["grad_norm"],
                    task.rho, task.rule)
                sums["grad_sum"] += torch.where(sums["active"], sums["grad_norm"], 0.0)
                sums["loss_sum"] += torch.where(sums["active"], loss, 0.0)
                sums["count"] += sums["active"]

        log(0)
        events = sorted(set(log_steps[1:]) | set(ckpt_steps))
        for start in range(0, task.iterations, STEPS_PER_BLOCK):
            count = min(STEPS_PER_BLOCK, task.iterations - start)
            order = torch.stack([batch_indices(len(x_train), task.batch_size, task.streams[int(s)], start, count)
                                 for s in used]).to(device)  # [streams, count, B]
            done = start
            for stop in [e for e in events if start < e < start + count] + [start + count]:
                advance(order[:, done - start:stop - start])
                done = stop
                if stop in ckpt_steps:
                    checkpoints[ckpt_steps.index(stop)] = flatten(parts, 1)
                if stop in log_steps:
                    log(log_steps.index(stop))
            self.progress(count * num_models)
        return GridResult(flatten(parts, 1).cpu(), checkpoints.cpu(), ckpt_steps, log_steps,
                          {k: v.cpu() for k, v in logs.items()})
