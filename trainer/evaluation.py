"""Validation: the mean next-token loss over the fixed validation windows."""

from __future__ import annotations

import math
from typing import Callable

import torch


@torch.no_grad()
def evaluate(model: torch.nn.Module, loss: Callable, windows: torch.Tensor, micro_batch: int, trainer) -> float:
    """Mean `loss(inputs, targets)` over `windows` (split across ranks). Every rank runs the same
    number of forward passes (FSDP gathers weights in each), the short ones on an empty remainder
    that counts zero."""
    was_training = model.training
    model.eval()
    world, device, strategy = trainer.world_size, trainer.strategy.root_device, trainer.strategy
    mine = windows[trainer.global_rank :: world]
    total = torch.zeros((), device=device, dtype=torch.float64)
    count = torch.zeros((), device=device, dtype=torch.float64)
    passes = math.ceil(math.ceil(len(windows) / world) / micro_batch)
    with trainer.precision_plugin.forward_context():
        for i in range(passes):
            chunk = mine[i * micro_batch : (i + 1) * micro_batch]
            weight = len(chunk)
            chunk = (chunk if weight else windows[:1]).to(device)
            total += loss(chunk[:, :-1], chunk[:, 1:]).double() * weight
            count += weight
    total = strategy.reduce(total, reduce_op="sum")
    count = strategy.reduce(count, reduce_op="sum")
    model.train(was_training)
    return (total / count).item()
