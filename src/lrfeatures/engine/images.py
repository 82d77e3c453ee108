"""Image training on the sphere: one model, a plain and efficient epoch loop (SPEC §2, §4).

The whole data set is one uint8 tensor on the device. A batch is gathered by indexing with
a seeded order (`data.batches.batch_indices`, shared by every LR of a training seed), then
optionally augmented and normalized on the device, so there is no per-sample Python and no
worker process. Inside a step nothing is read back to the host: loss, accuracy and gradient
norm sums stay on the device and are read once per log, and divergence is checked once per
epoch. Each step is forward -> cross-entropy -> backward -> `sphere_step` on the flat SI group
(the rate is an effective LR; the joint norm stays rho).

Models with trainable parameters outside their SI group (the practical setting: "resnet18" and
"vit" have no SI group at all, "vit-si" has one plus ordinary parameters) are split, see
`SplitOptimizer`: the SI group still steps on the sphere at the task's fixed effective LR, every
other trainable parameter steps with an ordinary torch optimizer (`ImageTask.optimizer`, with its
own LR and weight decay) under a per-step LR schedule. Checkpoints and SWA averages then hold the
"tracked" vector: the SI group first, then the other trainable parameters (`tracked_parameters`).
Dropout (the ViT) draws from the global RNG, which each task seeds inside `fork_rng`, so a run
is reproducible and resumable.

This is the one-model engine: the reference that the fused engine (engine/fused.py, a whole
stage's models as one program, the default) is tested against, and the fallback for models the
fused engine cannot take (dropout).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..data.batches import batch_indices
from ..data.images import CIFAR_MEAN, CIFAR_STD, ImageDataset, channel_mean_std, normalize
from ..errors import ConfigError
from ..models.registry import si_parameters
from ..optim import OptimizerConfig, ScheduleConfig
from ..seeding import derive_seed, generator
from ..sphere import flatten, project, sphere_step, unflatten_into_
from .common import LOG_FIELDS

CONVERGED_LOSS = 1e-2  # "converged": running epoch train loss below this (SPEC §4 epochs to convergence)


@dataclass
class DeviceImages:
    """Train/test (and optional val) uint8 images on one device, with the normalization to apply."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    val_x: torch.Tensor | None = None
    val_y: torch.Tensor | None = None

    @classmethod
    def from_dataset(cls, dataset: ImageDataset, device: str | torch.device,
                     normalization: str = "cifar") -> "DeviceImages":
        """Move a dataset to `device`; normalization "cifar" (SPEC mean/std) or "dataset" (train stats)."""
        if normalization == "cifar":
            mean, std = CIFAR_MEAN, CIFAR_STD
        elif normalization == "dataset":
            mean, std = channel_mean_std(dataset.train_x)
        else:
            raise ConfigError(f"data.normalization={normalization!r} is unknown; use 'cifar' or 'dataset'")
        if len(mean) != dataset.train_x.shape[1]:
            raise ConfigError(f"normalization {normalization!r} has {len(mean)} channels but the images have "
                              f"{dataset.train_x.shape[1]}; use data.normalization='dataset'")
        moved = dataset.to(device)
        as_tensor = lambda v: torch.tensor(v, dtype=torch.float32, device=device)  # noqa: E731
        return cls(moved.train_x, moved.train_y, moved.test_x, moved.test_y, as_tensor(mean), as_tensor(std),
                   moved.val_x, moved.val_y)

    @property
    def normalization(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) on the device."""
        return self.mean, self.std

    def eval_splits(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The splits evaluated besides training: test, and val when there is one."""
        splits = {"test": (self.test_x, self.test_y)}
        if self.val_x is not None and len(self.val_x):
            splits["val"] = (self.val_x, self.val_y)
        return splits


@dataclass
class ImageTask:
    """One training run of one model at one effective LR."""

    effective_lr: float
    epochs: int
    batch_size: int
    rho: float
    order_stream: tuple                   # seed parts of the batch order (shared by all LRs of a seed)
    augment_stream: tuple = ()            # seed parts of the augmentation draws
    rule: str = "projected"
    log_every: int = 1                    # epochs between logs (the last epoch is always logged)
    ckpt_every: int = 1                   # epochs between checkpoints
    keep_checkpoints: int = 0             # the most recent checkpoints returned
    swa_ks: tuple[int, ...] = ()          # averages of the last K checkpoints, accumulated online
    eval_batch_size: int = 1000
    optimizer: OptimizerConfig | None = None  # parameters outside the SI group (None: there must be none)
    schedule: ScheduleConfig | None = None    # their LR schedule over the task's steps (None: constant)

    def log_epochs(self) -> list[int]:
        """Epochs after which metrics are logged."""
        epochs = list(range(self.log_every, self.epochs + 1, self.log_every))
        return epochs if epochs and epochs[-1] == self.epochs else epochs + [self.epochs]

    def checkpoint_epochs(self) -> list[int]:
        """Epochs at which a checkpoint is taken."""
        return list(range(self.ckpt_every, self.epochs + 1, self.ckpt_every))


@dataclass
class ImageTrainResult:
    """Final state, kept checkpoints, online SWA averages and per-log metrics of one run."""

    state: dict[str, torch.Tensor]                 # final state_dict (CPU)
    checkpoints: torch.Tensor                      # [K, P] tracked vectors (SI group first), oldest first
    checkpoint_buffers: torch.Tensor               # [K, Q] BN running statistics
    checkpoint_epochs: list[int]
    swa: dict[int, torch.Tensor]                   # K -> [P] mean of the last K checkpoints' tracked vectors
    metrics: dict[str, list[float]] = field(default_factory=dict)  # "step" and LOG_FIELDS (+ val_*)
    final: dict[str, float] = field(default_factory=dict)          # full eval-mode evaluation
    diverged: bool = False
    epochs_to_convergence: float = math.nan


def bn_buffers(model: nn.Module) -> list[torch.Tensor]:
    """The floating-point buffers (BN running means and variances) of a model."""
    return [b for b in model.buffers() if b.is_floating_point()]


BF16_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Linear)


def _bf16_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A conv's or linear layer's forward with inputs and weights rounded to bf16; output in x's dtype."""
    half = torch.bfloat16
    weight, bias = self.weight.to(half), None if self.bias is None else self.bias.to(half)
    if isinstance(self, nn.Linear):
        out = F.linear(x.to(half), weight, bias)
    else:
        out = self._conv_forward(x.to(half), weight, bias)
    return out.to(x.dtype)


@contextlib.contextmanager
def amp_context(model: nn.Module, bf16: bool):
    """With bf16: the model's convolutions and linear layers compute in bf16 inside the block.

    Everything else (BatchNorm, activations, pooling, attention softmax, the loss) stays in the
    input's dtype (fp32), as do the parameters, gradients and the sphere step. Why not autocast:
    it does not reach inside torch.func.vmap (torch 2.13: a conv's output stays fp32 under
    autocast inside or outside the vmapped function), and a bf16 activation entering BN with fp32
    running statistics breaks BN's batching rule. Casting at the layers that carry the FLOPs works
    the same in both engines, so the fused and the one-model engine compute the same bf16 numbers.
    """
    patched = []
    if bf16:
        for module in model.modules():
            if isinstance(module, BF16_LAYERS) and "forward" not in vars(module):
                module.forward = _bf16_forward.__get__(module)  # an instance attribute shadows the class's
                patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            del module.forward


def upcast(logits: torch.Tensor) -> torch.Tensor:
    """bf16 logits to float32 for the loss; float32 and float64 stay as they are."""
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def prepare_input(x: torch.Tensor, normalization: tuple[torch.Tensor, torch.Tensor],
                  channels_last: bool = False) -> torch.Tensor:
    """uint8 images -> normalized float32, in the memory format the model runs in.

    Computes (x/255 - mean)/std as one fused multiply-add on the cast images.
    """
    mean, std = normalization
    if x.dtype == torch.uint8:
        scale, shift = (1.0 / (255.0 * std)).view(1, -1, 1, 1), (-mean / std).view(1, -1, 1, 1)
        x = torch.addcmul(shift, x.to(scale.dtype), scale)
    else:
        x = normalize(x, mean, std)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
             normalization: tuple[torch.Tensor, torch.Tensor], batch_size: int = 1000,
             bf16: bool = False, channels_last: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean loss and accuracy of the model in eval mode on a whole set (0-d device tensors)."""
    model.eval()
    loss_sum = torch.zeros((), device=x.device, dtype=torch.float64)
    correct = torch.zeros((), device=x.device, dtype=torch.int64)
    for start in range(0, len(x), batch_size):
        xb = prepare_input(x[start:start + batch_size], normalization, channels_last)
        with amp_context(model, bf16):
            logits = upcast(model(xb))
        yb = y[start:start + batch_size]
        loss_sum += F.cross_entropy(logits, yb, reduction="sum")
        correct += (logits.argmax(1) == yb).sum()
    return loss_sum / len(x), correct.double() / len(x)


@torch.no_grad()
def recompute_bn(model: nn.Module, x_uint8: torch.Tensor, batch_size: int,
                 normalization: tuple[torch.Tensor, torch.Tensor], bf16: bool = False,
                 channels_last: bool = False) -> nn.Module:
    """Reset BN running statistics and recompute them on `x_uint8` without touching the weights.

    Forward passes in train mode with momentum=None, so each BN ends with the plain average of
    the batch statistics over the set. Used for SWA averages and every interpolation point
    (interpolated or averaged BN buffers are meaningless, SPEC §6-7). Leaves the model in eval mode.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:  # nothing to recompute (the ViT): spare the passes over the training set
        return model.eval()
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    try:
        for start in range(0, len(x_uint8), batch_size):
            with amp_context(model, bf16):
                model(prepare_input(x_uint8[start:start + batch_size], normalization, channels_last))
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.eval()
    return model


def free_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Trainable parameters outside the SI group, in module order (the practical setting's group)."""
    si = {id(p) for p in si_parameters(model)}
    return [p for p in model.parameters() if p.requires_grad and id(p) not in si]


def tracked_parameters(model: nn.Module) -> list[nn.Parameter]:
    """What checkpoints, SWA and geometry follow: the SI group, then every other trainable parameter."""
    return si_parameters(model) + free_parameters(model)


def check_trainable(model: nn.Module) -> list[nn.Parameter]:
    """The SI group, after checking that nothing else in the model is trainable."""
    params = si_parameters(model)
    if not params:
        raise ConfigError(f"{type(model).__name__} has an empty SI group; use a scale-invariant model "
                          "such as convnet-si or resnet18-si")
    si = {id(p) for p in params}
    others = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in si]
    if others:
        raise ConfigError(f"{type(model).__name__} trains parameters outside its SI group ({others[0]}, ...); "
                          "training on the sphere needs a fully SI model such as convnet-si or resnet18-si")
    return params


class SplitOptimizer:
    """Steps one model: its SI group on the sphere at a fixed effective LR, the rest with `free`.

    The SI group (possibly empty) moves by `sphere_step` and keeps its joint norm rho; `free`
    (an OptimizerConfig whose lr is the LR of these parameters) trains every other trainable
    parameter (possibly none), with its weight decay applying to them only, under `schedule`
    stepped once per step over `total_steps`. free=None demands a fully SI model (the SI
    setting). Keeps device-side sums of loss, accuracy and gradient norm. The reported
    gradient norm is the SI group's at the unit-sphere scale (||g|| * rho) when there is an SI
    group, else the norm of the whole gradient.
    """

    def __init__(self, model: nn.Module, effective_lr: float, rho: float, rule: str = "projected",
                 bf16: bool = False, free: OptimizerConfig | None = None,
                 schedule: ScheduleConfig | None = None, total_steps: int = 1):
        self.model, self.lr, self.rho, self.rule, self.bf16 = model, effective_lr, rho, rule, bf16
        if free is None:
            self.params, self.free = check_trainable(model), []
        else:
            self.params, self.free = si_parameters(model), free_parameters(model)
            if not self.params and not self.free:
                raise ConfigError(f"{type(model).__name__} has no trainable parameters; check the model")
        self.optimizer = free.build(self.free) if self.free else None
        self.scheduler = ((schedule or ScheduleConfig()).build(self.optimizer, total_steps)
                          if self.optimizer is not None else None)
        device = (self.params or self.free)[0].device
        self.active = torch.ones((), dtype=torch.bool, device=device)  # False once a step was non-finite
        zeros = lambda dtype: torch.zeros((), dtype=dtype, device=device)  # noqa: E731
        self.loss_sum, self.grad_sum, self.last_grad = zeros(torch.float64), zeros(torch.float64), zeros(torch.float64)
        self.correct, self.seen, self.steps = zeros(torch.int64), zeros(torch.int64), zeros(torch.int64)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """One step on the normalized batch x [B, C, H, W]: sphere step for SI, optimizer step for the rest."""
        self.model.train()
        with amp_context(self.model, self.bf16):
            logits = upcast(self.model(x))
        loss = F.cross_entropy(logits, y)
        grads = torch.autograd.grad(loss, self.params + self.free)
        si_grads, free_grads = grads[:len(self.params)], grads[len(self.params):]
        with torch.no_grad():
            finite = torch.isfinite(loss)
            if self.params:
                theta, grad = flatten(self.params), flatten(si_grads)
                # Reported at the unit-sphere scale: the gradient norm scales as 1/||theta|| (SPEC §2).
                grad_norm = grad.norm().double() * self.rho
            if self.free:
                free_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(free_grads))).double()
                finite &= torch.isfinite(free_norm)
                grad_norm = grad_norm if self.params else free_norm
            finite &= torch.isfinite(grad_norm)
            self.active &= finite
            # A rejected step keeps the last finite weights: the model is frozen, not crashed.
            if self.params:
                unflatten_into_(torch.where(self.active, sphere_step(theta, grad, self.lr, self.rho, self.rule),
                                            theta), self.params)
            if self.free:
                before = flatten(self.free)
                for p, g in zip(self.free, free_grads):
                    p.grad = g
        if self.free:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            with torch.no_grad():  # no host sync: undo a non-finite step on the device
                unflatten_into_(torch.where(self.active, flatten(self.free), before), self.free)
        with torch.no_grad():
            took = self.active.long()
            self.last_grad = torch.where(self.active, grad_norm, self.last_grad)
            self.loss_sum += torch.where(self.active, loss.double(), 0.0)
            self.grad_sum += torch.where(self.active, grad_norm, 0.0)
            self.correct += (logits.argmax(1) == y).sum() * took
            self.seen += len(y) * took
            self.steps += took

    def read_and_reset(self) -> dict[str, float]:
        """Means since the last read (one host sync), then zero the sums."""
        values = torch.stack([self.loss_sum, self.correct.double(), self.seen.double(), self.grad_sum,
                              self.steps.double(), self.last_grad, (~self.active).double()]).tolist()
        loss_sum, correct, seen, grad_sum, steps, last_grad, diverged = values
        for t in (self.loss_sum, self.correct, self.seen, self.grad_sum, self.steps):
            t.zero_()
        nan = math.nan
        return {"train_loss": loss_sum / steps if steps else nan, "train_acc": correct / seen if seen else nan,
                "grad_norm": last_grad if steps else nan, "grad_norm_mean": grad_sum / steps if steps else nan,
                "batch_loss_mean": loss_sum / steps if steps else nan, "diverged": bool(diverged)}


class SphereSGD(SplitOptimizer):
    """Steps a fully SI model on the sphere (the SI setting: nothing else may be trainable)."""

    def __init__(self, model: nn.Module, effective_lr: float, rho: float, rule: str = "projected",
                 bf16: bool = False):
        super().__init__(model, effective_lr, rho, rule, bf16)


def run_epoch(optimizer: SplitOptimizer, data: DeviceImages, order: torch.Tensor,
              augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
              aug_gen: torch.Generator | None = None, channels_last: bool = False) -> None:
    """One step per row of `order` [steps, B]: gather, augment, normalize on the device, then step."""
    for batch in order:
        xb = data.train_x[batch]
        if augment is not None:
            xb = augment(xb, aug_gen)
        optimizer.step(prepare_input(xb, data.normalization, channels_last), data.train_y[batch])


def train_image_model(model: nn.Module, data: DeviceImages, task: ImageTask,
                      augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
                      bf16: bool = False, channels_last: bool = False, checkpoint_device: str | torch.device | None = None,
                      progress: Callable[[int], None] | None = None) -> ImageTrainResult:
    """Train `model` (already on the data's device, SI group at norm rho) for task.epochs epochs.

    The SI group steps on the sphere at task.effective_lr; other trainable parameters need
    task.optimizer (see `SplitOptimizer`).

    metrics rows (one per logged epoch, `step` = epoch): train loss/accuracy and gradient norms
    are running means over the epochs since the previous log (train mode, as the weights move);
    test (and val) loss/accuracy come from a full evaluation in eval mode. A non-finite step
    freezes the model; this is noticed at the end of the epoch, training stops and the rest
    of the log rows say diverged with NaN metrics.
    """
    device = data.train_x.device
    # Dropout draws from the global RNG: seed it per task without disturbing the caller's state.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(derive_seed("dropout", *task.order_stream))
        return _train(model, data, task, augment, bf16, channels_last, checkpoint_device, progress)


def _train(model: nn.Module, data: DeviceImages, task: ImageTask,
           augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None, bf16: bool,
           channels_last: bool, checkpoint_device: str | torch.device | None,
           progress: Callable[[int], None] | None) -> ImageTrainResult:
    """The body of `train_image_model`."""
    device = data.train_x.device
    progress = progress or (lambda n: None)
    n_train = len(data.train_x)
    per_epoch = n_train // task.batch_size
    if per_epoch < 1:
        raise ConfigError(f"batch_size={task.batch_size} exceeds the {n_train} training images; "
                          "lower pretrain.batch_size or use more images")
    optimizer = SplitOptimizer(model, task.effective_lr, task.rho, task.rule, bf16, task.optimizer,
                               task.schedule, task.epochs * per_epoch)
    params, buffers = optimizer.params + optimizer.free, bn_buffers(model)
    aug_gen = generator(*task.augment_stream, device=device) if augment is not None else None
    log_epochs, ckpt_epochs = task.log_epochs(), task.checkpoint_epochs()
    kept = ckpt_epochs[len(ckpt_epochs) - task.keep_checkpoints:] if task.keep_checkpoints else []
    ckpt_device = checkpoint_device or device
    num_p, num_q = sum(p.numel() for p in params), sum(b.numel() for b in buffers)
    checkpoints = torch.zeros(len(kept), num_p, device=ckpt_device)
    checkpoint_buffers = torch.zeros(len(kept), num_q, device=ckpt_device)
    swa_sums = {k: torch.zeros(num_p, dtype=torch.float64, device=device) for k in task.swa_ks}
    fields = list(LOG_FIELDS) + [f"val_{m}" for m in ("loss", "acc") if "val" in data.eval_splits()]
    metrics: dict[str, list] = {"step": [], **{name: [] for name in fields}}
    diverged = False
    for epoch in range(1, task.epochs + 1):
        if not diverged:
            order = batch_indices(n_train, task.batch_size, task.order_stream, (epoch - 1) * per_epoch,
                                  per_epoch).to(device)
            run_epoch(optimizer, data, order, augment, aug_gen, channels_last)
            diverged = not bool(optimizer.active)  # the one divergence check per epoch
        progress(1)
        if epoch in ckpt_epochs:
            with torch.no_grad():
                theta = flatten(params)
                for k, total in swa_sums.items():
                    if epoch in ckpt_epochs[-k:]:
                        total += theta.double()
                if epoch in kept:
                    checkpoints[kept.index(epoch)] = theta.to(ckpt_device)
                    if num_q:
                        checkpoint_buffers[kept.index(epoch)] = flatten(buffers).to(ckpt_device)
        if epoch in log_epochs:
            row = optimizer.read_and_reset()
            if diverged:
                row = {name: math.nan for name in row} | {"diverged": True}
            for split, (x, y) in data.eval_splits().items():
                loss, acc = (math.nan, math.nan) if diverged else \
                    evaluate(model, x, y, data.normalization, task.eval_batch_size, bf16, channels_last)
                row[f"{split}_loss"], row[f"{split}_acc"] = float(loss), float(acc)
            metrics["step"].append(epoch)
            for name in fields:
                metrics[name].append(row[name])
    final = {}
    splits = {"train": (data.train_x, data.train_y), **data.eval_splits()}
    for split, (x, y) in splits.items():
        loss, acc = evaluate(model, x, y, data.normalization, task.eval_batch_size, bf16, channels_last)
        final[f"{split}_loss"], final[f"{split}_acc"] = float(loss), float(acc)
    converged = [e for e, loss in zip(metrics["step"], metrics["train_loss"]) if loss < CONVERGED_LOSS]
    n_ckpts = len(ckpt_epochs)
    return ImageTrainResult(
        state={k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        checkpoints=checkpoints.cpu(), checkpoint_buffers=checkpoint_buffers.cpu(), checkpoint_epochs=kept,
        swa={k: (total / min(k, n_ckpts)).float().cpu() for k, total in swa_sums.items()},
        metrics=metrics, final=final, diverged=diverged,
        epochs_to_convergence=float(converged[0]) if converged else math.nan)


def load_si_(model: nn.Module, theta: torch.Tensor, rho: float | None = None) -> nn.Module:
    """Put a flat SI vector into the model, rescaled to norm rho when given."""
    params = si_parameters(model)
    theta = theta.to(params[0].device, params[0].dtype)
    unflatten_into_(project(theta, rho) if rho is not None else theta, params)
    return model


def load_tracked_(model: nn.Module, vector: torch.Tensor, rho: float | None = None) -> nn.Module:
    """Put a flat tracked vector (SI group, then the other trainable parameters) into the model.

    The SI part is rescaled to norm rho when given (and the SI group is not empty); the other
    parameters are loaded as they are.
    """
    si, free = si_parameters(model), free_parameters(model)
    n_si = sum(p.numel() for p in si)
    if vector.shape[-1] != n_si + sum(p.numel() for p in free):
        raise ConfigError(f"a weight vector of length {vector.shape[-1]} does not fit {type(model).__name__} "
                          f"({n_si} SI + {sum(p.numel() for p in free)} other trainable values); "
                          "load weights saved from the same model and config")
    if si:
        load_si_(model, vector[:n_si], rho if rho else None)
    if free:
        unflatten_into_(vector[n_si:].to(free[0].device, free[0].dtype), free)
    return model
