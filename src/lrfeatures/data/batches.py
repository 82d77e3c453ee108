"""Seeded minibatch order: without replacement, last partial batch dropped.

Epoch e of a stream is a permutation drawn from its own seed, so any range of steps can
be produced independently. Every model of one stream (all LRs of one training seed) sees
the same sequence of batches, which is what lets a grid step in lockstep.
"""

from __future__ import annotations

import torch

from ..seeding import derive_seed


def batch_indices(n: int, batch_size: int, stream: tuple, start: int, count: int) -> torch.Tensor:
    """Sample indices [count, batch_size] for steps start .. start+count-1 of `stream`."""
    per_epoch = n // batch_size
    first, last = start // per_epoch, (start + count - 1) // per_epoch
    gen = torch.Generator()
    epochs = []
    for epoch in range(first, last + 1):
        gen.manual_seed(derive_seed(*stream, "epoch", epoch))
        epochs.append(torch.randperm(n, generator=gen)[: per_epoch * batch_size])
    flat = torch.cat(epochs).view(-1, batch_size)
    offset = start - first * per_epoch
    return flat[offset: offset + count]
