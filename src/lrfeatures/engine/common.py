"""What both engines share: the task description, the result, losses and the log schema."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

LOG_FIELDS = ("train_loss", "train_acc", "test_loss", "test_acc", "grad_norm",
              "grad_norm_mean", "batch_loss_mean", "diverged")


@dataclass
class GridTask:
    """M models that train in lockstep on the sphere.

    Models with the same `stream_of_model` see the same minibatch sequence `streams[g]`.
    """

    init: torch.Tensor              # [M, P] initial SI weights (flat)
    frozen: dict[str, torch.Tensor]  # name -> [M, ...] every non-SI parameter and buffer
    effective_lrs: torch.Tensor     # [M]
    stream_of_model: torch.Tensor   # [M] long, index into streams
    streams: list[tuple]            # seed parts of each batch-order stream
    iterations: int
    batch_size: int
    rho: float
    rule: str = "projected"
    log_every: int = 100
    ckpt_every: int = 0             # 0: no checkpoints
    keep_checkpoints: int = 0

    @property
    def num_models(self) -> int:
        """M."""
        return self.init.shape[0]

    def select(self, models: torch.Tensor) -> "GridTask":
        """The sub-task of the given model indices (streams are kept whole)."""
        return GridTask(self.init[models], {k: v[models] for k, v in self.frozen.items()},
                        self.effective_lrs[models], self.stream_of_model[models], self.streams,
                        self.iterations, self.batch_size, self.rho, self.rule, self.log_every,
                        self.ckpt_every, self.keep_checkpoints)

    def log_steps(self) -> list[int]:
        """Steps at which metrics are logged: 0, every log_every, and the last."""
        steps = list(range(0, self.iterations + 1, self.log_every))
        return steps if steps[-1] == self.iterations else steps + [self.iterations]

    def checkpoint_steps(self) -> list[int]:
        """Steps of the checkpoints that are kept (the most recent keep_checkpoints)."""
        if not self.ckpt_every:
            return []
        steps = list(range(self.ckpt_every, self.iterations + 1, self.ckpt_every))
        return steps[-self.keep_checkpoints:] if self.keep_checkpoints else []


@dataclass
class GridResult:
    """Final weights, kept checkpoints and logged metrics of a GridTask."""

    final: torch.Tensor                       # [M, P]
    checkpoints: torch.Tensor                 # [K, M, P], oldest first
    checkpoint_steps: list[int]
    log_steps: list[int]
    logs: dict[str, torch.Tensor] = field(default_factory=dict)  # field -> [n_logs, M]

    @staticmethod
    def concat(parts: list["GridResult"]) -> "GridResult":
        """Join results of disjoint model chunks along the model axis."""
        return GridResult(torch.cat([p.final for p in parts]),
                          torch.cat([p.checkpoints for p in parts], dim=1),
                          parts[0].checkpoint_steps, parts[0].log_steps,
                          {k: torch.cat([p.logs[k] for p in parts], dim=1) for k in parts[0].logs})


def loss_and_correct(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample loss and correctness: float labels are binary (logits [..., N]),
    integer labels are classes (logits [..., N, C])."""
    if labels.is_floating_point():
        loss = F.binary_cross_entropy_with_logits(logits, labels.expand_as(logits), reduction="none")
        return loss, (logits > 0) == (labels > 0.5)
    loss = F.cross_entropy(logits.movedim(-1, 1), labels.expand(logits.shape[:-1]), reduction="none")
    return loss, logits.argmax(-1) == labels
