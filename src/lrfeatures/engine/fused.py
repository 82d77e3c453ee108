"""Fused image grids: M models of one architecture trained as one program (SPEC §2, §4).

The models' parameters and BN buffers are stacked along a leading model axis ([M, ...]) and
one functional forward is vmapped over it (`torch.func.vmap` of `functional_call`). For
convolutions vmap's batching rule is a grouped convolution over the stacked models, and BN
runs per model with per-model running statistics, updated in place in the stacked buffers.
One step is then one forward, one backward and one batched update for all M models:

    SI group       `sphere_step` on the flat [M, P] group, each model at its own effective LR
                   and joint norm rho (one batched op, no host sync)
    other params   SGD (momentum, L2), Adam (L2) or AdamW, batched over the model axis with a
                   per-model LR table [steps, M] precomputed from the schedule
    divergence     a non-finite step freezes that model (its weights, and after the epoch in
                   which it diverged its BN buffers); the others go on bit for bit unchanged

Models of one training seed share the batch order (and the augmentation draws), so the LR is
the only difference between them. The result of every model equals `train_image_model`'s
(engine/images.py, the one-model reference) to float rounding: tests compare the two in float64.
Chunks of models that fit `engine.memory_budget_gb` run one after the other (`plan_chunks`),
and a chunk's results do not depend on which other models share it.

Dropout (the ViT's default) draws per model inside vmap from one global stream, which would tie
a model's masks to the chunk it runs in, so models with dropout > 0 are not fused (`fusable`).
bf16 (`engine.precision`) uses the one-model engine's rule, `amp_context`: convolutions and linear
layers compute in bf16, BN and the rest in fp32. autocast cannot do it here: it does not reach
inside `torch.func.vmap` (on torch 2.13 a conv's output stays fp32 under autocast), so a fused
"bf16" run under autocast would silently be fp32.
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from ..config.images import check_precision
from ..data.batches import batch_indices
from ..errors import ConfigError
from ..models.registry import si_parameters
from ..optim import OptimizerConfig, ScheduleConfig
from ..seeding import generator
from ..sphere import sphere_step
from .common import LOG_FIELDS
from .images import (CONVERGED_LOSS, DeviceImages, ImageTask, ImageTrainResult, amp_context, free_parameters,
                     prepare_input, upcast)

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def fusable(model: nn.Module) -> str:
    """'' if the model can be fused, else why not (one line, for the fallback warning)."""
    drops = [m.p for m in model.modules() if isinstance(m, nn.Dropout) and m.p > 0]
    drops += [m.dropout for m in model.modules() if isinstance(getattr(m, "dropout", None), float)
              and m.dropout > 0]
    if drops:
        return (f"{type(model).__name__} uses dropout (p={drops[0]:g}), whose masks would depend on the "
                "chunk a model runs in; set its dropout options to 0 to fuse it")
    return ""


def flat(parts: list[torch.Tensor]) -> torch.Tensor:
    """Stacked tensors [M, ...] (scalars per model included) as one [M, P] matrix."""
    return torch.cat([p.reshape(p.shape[0], -1) for p in parts], dim=1)


class StackedModels:
    """M models of one architecture as stacked tensors [M, ...] and one vmapped functional forward."""

    def __init__(self, models: list[nn.Module]):
        first = models[0]
        names = [n for n, _ in first.named_parameters()]
        for m in models[1:]:
            if [n for n, _ in m.named_parameters()] != names or type(m) is not type(first):
                raise ConfigError("fused models must share one architecture; build them from one model config")
        by_id = {id(p): n for n, p in first.named_parameters()}
        self.si_names = [by_id[id(p)] for p in si_parameters(first)] if hasattr(first, "si_parameters") else []
        self.free_names = [by_id[id(p)] for p in free_parameters(first)]
        self.trained = self.si_names + self.free_names
        self.params = {n: torch.stack([m.get_parameter(n).detach() for m in models]).clone() for n in names}
        for n in self.trained:
            self.params[n].requires_grad_(True)
        self.buffers = {n: torch.stack([m.get_buffer(n) for m in models]).clone() for n, _ in first.named_buffers()}
        self.float_buffers = [n for n, b in self.buffers.items() if b.is_floating_point()]
        self.base = first
        for module in first.modules():
            if hasattr(module, "explicit_attention"):  # see models.vit: batched matmuls instead of SDPA
                module.explicit_attention = True
        self.size = len(models)

    def forward(self, x: torch.Tensor, train: bool, shared_input: bool = False,
                precision: str = "fp32") -> torch.Tensor:
        """Logits [M, B, K] for inputs [M, B, C, H, W] (or one batch [B, C, H, W] with shared_input)."""
        self.base.train(train)

        def one(params: dict, buffers: dict, xb: torch.Tensor) -> torch.Tensor:
            return functional_call(self.base, (params, buffers), (xb,))

        with amp_context(self.base, precision == "bf16"):
            return vmap(one, in_dims=(0, 0, None if shared_input else 0))(self.params, self.buffers, x)

    def tracked(self) -> torch.Tensor:
        """The tracked vectors [M, P]: SI group, then the other trainable parameters (as checkpoints hold)."""
        return flat([self.params[n].detach() for n in self.trained])

    def flat_buffers(self) -> torch.Tensor:
        """BN running statistics [M, Q] in module order (empty when there are none)."""
        parts = [self.buffers[n] for n in self.float_buffers]
        return flat(parts) if parts else torch.zeros(self.size, 0)

    def state_dict(self, m: int) -> dict[str, torch.Tensor]:
        """Model m's state dict on the CPU, keyed as the one-model network's."""
        tensors = {**self.params, **self.buffers}
        return {k: tensors[k][m].detach().cpu().clone() for k in self.base.state_dict()}

    def load_into(self, m: int, model: nn.Module) -> nn.Module:
        """Copy model m's parameters and buffers into an nn.Module of the same architecture."""
        model.load_state_dict(self.state_dict(m))
        return model


class BatchedOptimizer:
    """SGD / Adam / AdamW over stacked parameters [M, ...], with a per-model LR per step.

    Follows torch.optim's single-tensor formulas (L2 weight decay added to the gradient for sgd
    and adam, decoupled for adamw), so a model's trajectory equals the one-model engine's.
    """

    def __init__(self, params: list[torch.Tensor], config: OptimizerConfig):
        self.params, self.cfg, self.step_count = params, config, 0
        self.state = [dict() for _ in params]

    @torch.no_grad()
    def step(self, grads: list[torch.Tensor], lr: torch.Tensor) -> None:
        """One update; lr [M] is each model's LR at this step."""
        c = self.cfg
        self.step_count += 1
        t = self.step_count
        for p, g, state in zip(self.params, grads, self.state):
            lr_p = lr.view((-1,) + (1,) * (p.dim() - 1)).to(p.dtype)
            if c.name == "sgd":
                d = g.add(p, alpha=c.weight_decay) if c.weight_decay else g
                if c.momentum:
                    buf = state.get("momentum")
                    state["momentum"] = d.clone() if buf is None else buf.mul_(c.momentum).add_(d)
                    d = state["momentum"]
                p.sub_(lr_p * d)
                continue
            beta1, beta2 = c.betas
            if c.name == "adamw":
                p.mul_(1 - lr_p * c.weight_decay)
            elif c.weight_decay:
                g = g.add(p, alpha=c.weight_decay)
            if not state:
                state["m"], state["v"] = torch.zeros_like(p), torch.zeros_like(p)
            state["m"].lerp_(g, 1 - beta1)
            state["v"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
            bias1, bias2 = 1 - beta1 ** t, 1 - beta2 ** t
            denom = (state["v"].sqrt() / math.sqrt(bias2)).add_(c.eps)
            p.sub_((lr_p / bias1) * state["m"] / denom)


def lr_table(config: OptimizerConfig | None, lrs: list[float], schedule: ScheduleConfig | None,
             total_steps: int, device: torch.device) -> torch.Tensor:
    """The LR of each model's non-SI parameters at each step, [steps, M], as the one-model schedule gives it."""
    dummies = [{"params": [torch.zeros(1, requires_grad=True)], "lr": lr} for lr in lrs]
    optimizer = torch.optim.SGD(dummies, lr=1.0)
    scheduler = (schedule or ScheduleConfig()).build(optimizer, total_steps)
    rows = []
    for _ in range(total_steps):
        rows.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return torch.tensor(rows, dtype=torch.float64, device=device)


def check_homogeneous(tasks: list[ImageTask]) -> None:
    """Fused tasks may differ only in LR, rho and seed streams (one epoch loop serves them all)."""
    first = tasks[0]
    same = ("epochs", "batch_size", "rule", "log_every", "ckpt_every", "keep_checkpoints", "swa_ks",
            "eval_batch_size", "schedule")
    for task in tasks[1:]:
        for name in same:
            if getattr(task, name) != getattr(first, name):
                raise ValueError(f"fused tasks differ in {name}; fuse only tasks of one stage")
        if (task.optimizer is None) != (first.optimizer is None) or (
                task.optimizer and (task.optimizer.name, task.optimizer.momentum, task.optimizer.weight_decay,
                                    task.optimizer.betas, task.optimizer.eps)
                != (first.optimizer.name, first.optimizer.momentum, first.optimizer.weight_decay,
                    first.optimizer.betas, first.optimizer.eps)):
            raise ValueError("fused tasks differ in their optimizer settings (only the LR may differ)")


class FusedTrainer:
    """Steps a StackedModels: SI group on the sphere, the rest batched; device-side metric sums."""

    def __init__(self, stack: StackedModels, tasks: list[ImageTask], precision: str, total_steps: int):
        device = stack.params[stack.trained[0]].device if stack.trained else torch.device("cpu")
        self.stack, self.precision, self.rule = stack, precision, tasks[0].rule
        if tasks[0].optimizer is None and stack.free_names:
            raise ConfigError(f"{type(stack.base).__name__} trains parameters outside its SI group "
                              f"({stack.free_names[0]}, ...); training on the sphere needs a fully SI model")
        if not stack.trained:
            raise ConfigError(f"{type(stack.base).__name__} has no trainable parameters; check the model")
        dtype = stack.params[stack.trained[0]].dtype if stack.trained else torch.float32
        self.elr = torch.tensor([t.effective_lr for t in tasks], dtype=dtype, device=device)
        self.rho = torch.tensor([t.rho for t in tasks], dtype=dtype, device=device)
        self.rho64 = torch.tensor([t.rho for t in tasks], dtype=torch.float64, device=device)
        self.free = [stack.params[n] for n in stack.free_names]
        self.si = [stack.params[n] for n in stack.si_names]
        self.optimizer = BatchedOptimizer(self.free, tasks[0].optimizer) if self.free else None
        self.lrs = (lr_table(tasks[0].optimizer, [t.optimizer.lr for t in tasks], tasks[0].schedule,
                             total_steps, device) if self.free else None)
        m = stack.size
        self.active = torch.ones(m, dtype=torch.bool, device=device)
        zeros = lambda dtype: torch.zeros(m, dtype=dtype, device=device)  # noqa: E731
        self.loss_sum, self.grad_sum, self.last_grad = zeros(torch.float64), zeros(torch.float64), zeros(torch.float64)
        self.correct, self.seen, self.steps = zeros(torch.int64), zeros(torch.int64), zeros(torch.int64)
        self.t = 0

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """One step on normalized batches x [M, B, C, H, W] (or one shared [B, C, H, W]) with labels y [M, B]."""
        stack, m = self.stack, self.stack.size
        # A shared batch enters unbatched: the first convolution is then one dense conv over all models.
        logits = upcast(stack.forward(x, train=True, shared_input=x.dim() == 4, precision=self.precision))
        losses = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(m, -1).mean(1)
        # Each model's loss depends on its own parameters only, so the sum's gradient is per model.
        grads = torch.autograd.grad(losses.sum(), self.si + self.free)
        si_grads, free_grads = grads[:len(self.si)], grads[len(self.si):]
        with torch.no_grad():
            finite = torch.isfinite(losses)
            if self.si:
                theta, grad = flat(self.si), flat(list(si_grads))  # [M, P]
                grad_norm = grad.norm(dim=1).double() * self.rho64  # at the unit-sphere scale
            if self.free:
                free_norm = torch.linalg.vector_norm(
                    flat(list(free_grads)), dim=1).double()
                finite &= torch.isfinite(free_norm)
                grad_norm = grad_norm if self.si else free_norm
            finite &= torch.isfinite(grad_norm)
            self.active &= finite
            if self.si:
                stepped = sphere_step(theta, grad, self.elr, self.rho, self.rule)
                new = torch.where(self.active[:, None], stepped, theta)
                for p, part in zip(self.si, new.split([p[0].numel() for p in self.si], dim=1)):
                    p.copy_(part.view_as(p))
            if self.free:
                before = [p.clone() for p in self.free]
                self.optimizer.step(list(free_grads), self.lrs[self.t])
                for p, old in zip(self.free, before):
                    p.copy_(torch.where(self.active.view((-1,) + (1,) * (p.dim() - 1)), p, old))
            took = self.active.long()
            self.last_grad = torch.where(self.active, grad_norm, self.last_grad)
            self.loss_sum += torch.where(self.active, losses.double(), 0.0)
            self.grad_sum += torch.where(self.active, grad_norm, 0.0)
            self.correct += (logits.argmax(2) == y).sum(1) * took
            self.seen += y.shape[1] * took
            self.steps += took
        self.t += 1

    def read_and_reset(self) -> list[dict[str, float]]:
        """Per model, the means since the last read (one host sync), then zero the sums."""
        values = torch.stack([self.loss_sum, self.correct.double(), self.seen.double(), self.grad_sum,
                              self.steps.double(), self.last_grad, (~self.active).double()], 1).tolist()
        for t in (self.loss_sum, self.correct, self.seen, self.grad_sum, self.steps):
            t.zero_()
        rows, nan = [], math.nan
        for loss_sum, correct, seen, grad_sum, steps, last_grad, diverged in values:
            rows.append({"train_loss": loss_sum / steps if steps else nan,
                         "train_acc": correct / seen if seen else nan,
                         "grad_norm": last_grad if steps else nan,
                         "grad_norm_mean": grad_sum / steps if steps else nan,
                         "batch_loss_mean": loss_sum / steps if steps else nan, "diverged": bool(diverged)})
        return rows


@torch.no_grad()
def evaluate_stack(stack: StackedModels, x: torch.Tensor, y: torch.Tensor,
                   normalization: tuple[torch.Tensor, torch.Tensor], batch_size: int = 1000,
                   precision: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
    """Per model, eval-mode mean loss [M] and accuracy [M] on a whole set (device tensors)."""
    check_precision(precision)
    m = stack.size
    loss_sum = torch.zeros(m, device=x.device, dtype=torch.float64)
    correct = torch.zeros(m, device=x.device, dtype=torch.int64)
    for start in range(0, len(x), batch_size):
        xb = prepare_input(x[start:start + batch_size], normalization)
        yb = y[start:start + batch_size]
        logits = upcast(stack.forward(xb, train=False, shared_input=True, precision=precision))  # [M, b, K]
        loss_sum += F.cross_entropy(logits.flatten(0, 1), yb.repeat(m), reduction="none").view(m, -1).sum(1)
        correct += (logits.argmax(2) == yb).sum(1)
    return loss_sum / len(x), correct.double() / len(x)


@torch.no_grad()
def recompute_bn_stack(stack: StackedModels, x_uint8: torch.Tensor, batch_size: int,
                       normalization: tuple[torch.Tensor, torch.Tensor], precision: str = "fp32") -> None:
    """Per model, reset BN running statistics and recompute them on `x_uint8` (the plain batch average)."""
    check_precision(precision)
    norms = [m for m in stack.base.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for name, buf in stack.buffers.items():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("running_mean", "num_batches_tracked"):
            buf.zero_()
        elif leaf == "running_var":
            buf.fill_(1.0)
    try:
        for k, start in enumerate(range(0, len(x_uint8), batch_size), 1):
            # momentum=None (the cumulative average) reads a counter on the host, which vmap forbids;
            # momentum 1/k at the k-th batch is the same average.
            for m in norms:
                m.momentum = 1.0 / k
            stack.forward(prepare_input(x_uint8[start:start + batch_size], normalization), train=True,
                          shared_input=True, precision=precision)
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        stack.base.eval()


def activation_bytes(model: nn.Module, data: DeviceImages, batch_size: int) -> int:
    """Bytes autograd saves for one model's training step at `batch_size` (measured on one batch)."""
    saved = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[0] += t.numel() * t.element_size()
        return t

    x = prepare_input(data.train_x[:batch_size], data.normalization)
    probe = copy.deepcopy(model)  # the forward moves BN statistics: never on the model itself
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        probe.train()
        out = probe(x)
    del out
    return saved[0]


def plan_chunks(n_models: int, per_model_bytes: float, budget_gb: float) -> list[range]:
    """Consecutive chunks of models that fit the budget (one-line error if not even one model does)."""
    fit = int(budget_gb * 2**30 // max(per_model_bytes, 1))
    if fit < 1:
        raise ConfigError(f"one model needs about {per_model_bytes / 2**30:.3g} GB to train, over "
                          f"engine.memory_budget_gb={budget_gb:g}; raise the budget or lower the batch size")
    return [range(i, min(i + fit, n_models)) for i in range(0, n_models, fit)]


def model_bytes(model: nn.Module, data: DeviceImages, task: ImageTask) -> float:
    """What one fused model costs: weights x (kept checkpoints, float64 SWA sums, 5 working copies) + activations."""
    weights = sum(p.numel() * 4 for p in model.parameters()) + sum(b.numel() * 4 for b in model.buffers())
    copies = task.keep_checkpoints + 2 * len(task.swa_ks) + 5
    return weights * copies + 1.5 * activation_bytes(model, data, task.batch_size)


def train_image_models(models: list[nn.Module], data: DeviceImages, tasks: list[ImageTask],
                       augment: Augment | None = None, precision: str = "fp32",
                       memory_budget_gb: float = 4.0,
                       progress: Callable[[int], None] | None = None) -> list[ImageTrainResult]:
    """Train every model at its task (one chunk of models per program) and return one result per model.

    Results equal `train_image_model(models[i], data, tasks[i])`'s; see the module docstring.
    """
    if not models:
        return []
    check_precision(precision)
    check_homogeneous(tasks)
    per_model = model_bytes(models[0], data, tasks[0])
    results: list[ImageTrainResult] = []
    for chunk in plan_chunks(len(models), per_model, memory_budget_gb):
        results += _train_chunk([models[i] for i in chunk], data, [tasks[i] for i in chunk], augment,
                                precision, progress or (lambda n: None))
    return results


def _train_chunk(models: list[nn.Module], data: DeviceImages, tasks: list[ImageTask], augment: Augment | None,
                 precision: str, progress: Callable[[int], None]) -> list[ImageTrainResult]:
    """The epoch loop of one chunk (mirrors engine.images._train, per model)."""
    device, task, m = data.train_x.device, tasks[0], len(models)
    n_train = len(data.train_x)
    per_epoch = n_train // task.batch_size
    if per_epoch < 1:
        raise ConfigError(f"batch_size={task.batch_size} exceeds the {n_train} training images; "
                          "lower pretrain.batch_size or use more images")
    stack = StackedModels(models)
    trainer = FusedTrainer(stack, tasks, precision, task.epochs * per_epoch)
    streams = list(dict.fromkeys(t.order_stream for t in tasks))     # shared batch orders, in order
    group = torch.tensor([streams.index(t.order_stream) for t in tasks], device=device)
    aug_streams = {t.order_stream: t.augment_stream for t in tasks}
    aug_gens = [generator(*aug_streams[s], device=device) for s in streams] if augment is not None else None
    log_epochs, ckpt_epochs = task.log_epochs(), task.checkpoint_epochs()
    kept = ckpt_epochs[len(ckpt_epochs) - task.keep_checkpoints:] if task.keep_checkpoints else []
    n_p, n_q = stack.tracked().shape[1], stack.flat_buffers().shape[1]
    checkpoints = torch.zeros(m, len(kept), n_p, device=device)
    checkpoint_buffers = torch.zeros(m, len(kept), n_q, device=device)
    swa_sums = {k: torch.zeros(m, n_p, dtype=torch.float64, device=device) for k in task.swa_ks}
    splits = data.eval_splits()
    fields = list(LOG_FIELDS) + [f"val_{x}" for x in ("loss", "acc") if "val" in splits]
    metrics = [{"step": [], **{name: [] for name in fields}} for _ in range(m)]
    stopped = [False] * m           # diverged in an earlier epoch: BN buffers frozen from then on
    frozen: dict[str, torch.Tensor] = {}
    for epoch in range(1, task.epochs + 1):
        if not all(stopped):
            orders = [batch_indices(n_train, task.batch_size, s, (epoch - 1) * per_epoch, per_epoch).to(device)
                      for s in streams]                                # each [steps, B]
            mask = torch.tensor(stopped, device=device)
            for i in range(per_epoch):
                batches = []
                for g, order in enumerate(orders):
                    xb = data.train_x[order[i]]
                    if augment is not None:
                        xb = augment(xb, aug_gens[g])
                    batches.append(prepare_input(xb, data.normalization))
                x = batches[0] if len(streams) == 1 else torch.stack(batches)[group]
                y = torch.stack([data.train_y[o[i]] for o in orders])[group]
                trainer.step(x, y)
                if any(stopped):
                    with torch.no_grad():
                        for name, buf in frozen.items():
                            live = stack.buffers[name]
                            live.copy_(torch.where(mask.view((-1,) + (1,) * (live.dim() - 1)), buf, live))
            active = trainer.active.tolist()          # the one divergence check per epoch
            if any(not a and not s for a, s in zip(active, stopped)):  # a model diverged in this epoch
                stopped = [not a for a in active]
                frozen = {n: b.clone() for n, b in stack.buffers.items()}
        progress(m)
        if epoch in ckpt_epochs:
            with torch.no_grad():
                theta = stack.tracked()
                for k, total in swa_sums.items():
                    if epoch in ckpt_epochs[-k:]:
                        total += theta.double()
                if epoch in kept:
                    checkpoints[:, kept.index(epoch)] = theta
                    if n_q:
                        checkpoint_buffers[:, kept.index(epoch)] = stack.flat_buffers()
        if epoch in log_epochs:
            rows = trainer.read_and_reset()
            evals = {split: [t.tolist() for t in evaluate_stack(stack, x, y, data.normalization,
                                                                task.eval_batch_size, precision)]
                     for split, (x, y) in splits.items()}
            for j, row in enumerate(rows):
                if stopped[j]:
                    row = {name: math.nan for name in row} | {"diverged": True}
                for split, (losses, accs) in evals.items():
                    row[f"{split}_loss"], row[f"{split}_acc"] = ((math.nan, math.nan) if stopped[j]
                                                                 else (losses[j], accs[j]))
                metrics[j]["step"].append(epoch)
                for name in fields:
                    metrics[j][name].append(row[name])
    final = [dict() for _ in range(m)]
    for split, (x, y) in {"train": (data.train_x, data.train_y), **splits}.items():
        losses, accs = (t.tolist() for t in evaluate_stack(stack, x, y, data.normalization,
                                                            task.eval_batch_size, precision))
        for j in range(m):
            final[j][f"{split}_loss"], final[j][f"{split}_acc"] = losses[j], accs[j]
    n_ckpts = len(ckpt_epochs)
    results = []
    for j in range(m):
        converged = [e for e, loss in zip(metrics[j]["step"], metrics[j]["train_loss"]) if loss < CONVERGED_LOSS]
        results.append(ImageTrainResult(
            state=stack.state_dict(j), checkpoints=checkpoints[j].cpu(), checkpoint_buffers=checkpoint_buffers[j].cpu(),
            checkpoint_epochs=kept,
            swa={k: (total[j] / min(k, n_ckpts)).float().cpu() for k, total in swa_sums.items()},
            metrics=metrics[j], final=final[j], diverged=stopped[j],
            epochs_to_convergence=float(converged[0]) if converged else math.nan))
    return results


def warn_fallback(reason: str) -> None:
    """The one warning when a model falls back to the one-model engine."""
    warnings.warn(f"engine.name='fused' falls back to one model at a time: {reason}", stacklevel=3)
