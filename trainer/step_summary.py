"""What an optimizer step reads back from the device, read once.

A GPU runs ahead of the Python that feeds it until something asks for a number (`.item()`, `bool()`,
`.tolist()`): each such read waits for all queued work. A step needs five kinds of numbers: the
training loss (metrics and the NaN check), the gradient norm (metrics; clipping is decided on the
device), the targets that were not pads (unpacked documents: metrics), whether any rank received a
stop signal (trainer/preemption.py), and QK-clip's largest logit per layer and head (metrics; the
clip itself is computed on the device). They go into one vector, one all-gather across ranks (the
loss averaged, the targets summed, the signal and the logits maximised over ranks), and one
`.tolist()`: one wait per step, and one collective instead of three.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from optim.qk_clip import logit_columns


@dataclass
class StepSummary:
    loss: float  # the step's mean training loss over micro-batches and ranks
    grad_norm: float  # the global gradient norm before clipping
    stop_signal: int | None  # the stop signal any rank received, or None
    targets: float  # the step's training targets over all ranks (unpacked: those that were not pads)
    qk_maxima: torch.Tensor | None = None  # (layers, heads) largest logits, the max over ranks, on the device
    qk_values: list[list[float]] | None = None  # the same, read

    def qk_columns(self) -> dict[str, float]:
        """QK-clip's metrics.csv columns: the largest logit overall and per layer and head."""
        return logit_columns(self.qk_values) if self.qk_values is not None else {}


def summarize(loss: torch.Tensor, grad_norm: torch.Tensor, targets: torch.Tensor, signum: int,
              qk_maxima: torch.Tensor | None, world_size: int) -> StepSummary:
    """The step's numbers, combined over ranks (every rank calls this at the same step) and read."""
    values = [loss.float().view(1), grad_norm.float().view(1), targets.float().view(1),
              loss.new_full((1,), float(signum), dtype=torch.float32)]
    if qk_maxima is not None:
        values.append(qk_maxima.float().reshape(-1))
    local = torch.cat(values)  # built on the device: no host-to-device copy either
    if world_size > 1:
        ranks = local.new_empty(world_size * local.numel())
        dist.all_gather_into_tensor(ranks, local)
        ranks = ranks.view(world_size, -1)
        local = torch.cat([ranks[:, :1].mean(0), ranks[0, 1:2], ranks[:, 2:3].sum(0), ranks[:, 3:].amax(0)])
    loss_value, norm_value, targets_value, signal, *logits = local.tolist()  # the step's one wait on the device
    maxima = values_ = None
    if qk_maxima is not None:
        maxima = local[4:].view(qk_maxima.shape)
        heads = qk_maxima.shape[-1]
        values_ = [logits[i:i + heads] for i in range(0, len(logits), heads)]
    return StepSummary(loss_value, norm_value, int(signal) or None, targets_value, maxima, values_)
