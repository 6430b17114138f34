"""Validation: the mean next-token loss over the fixed validation windows, and what it is in perplexity
and in bits per byte:

    val_loss = Σ −ln p(target) / N          nats per target token (N targets)
    val_ppl  = exp(val_loss)
    val_bpb  = Σ −ln p(target) / (ln 2 · B)  bits per UTF-8 byte, B = the bytes the N targets stand for
                                             (the tokenizer's piece_bytes), so runs with different
                                             tokenizers compare (nats per token do not)
"""

from __future__ import annotations

import math
from typing import Callable

import torch


def target_bytes(windows: torch.Tensor, piece_bytes) -> int:
    """B: the UTF-8 bytes of the validation targets (every window's tokens after its first)."""
    return int(torch.as_tensor(piece_bytes)[windows[:, 1:]].sum())


def target_count(windows: torch.Tensor, pad_id: int | None = None) -> int:
    """N: the validation targets, the pads of unpacked documents not among them."""
    targets = windows[:, 1:]
    return int(targets.numel() if pad_id is None else (targets != pad_id).sum())


def validation_metrics(loss: float, windows: torch.Tensor, n_bytes: int | None, pad_id: int | None = None) -> dict[str, float]:
    """val_loss, val_ppl and (when the targets' bytes are known) val_bpb of a mean loss over `windows`."""
    metrics = {"val_loss": loss, "val_ppl": math.exp(min(loss, 700.0))}
    if n_bytes:
        metrics["val_bpb"] = loss * target_count(windows, pad_id) / (math.log(2) * n_bytes)
    return metrics


@torch.no_grad()
def loss_sum(loss: Callable, windows: torch.Tensor, micro_batch: int, device: torch.device, passes: int | None = None,
             pad_with: torch.Tensor | None = None, pad_id: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ of loss(inputs, targets) weighted by each forward's targets, Σ of the weights) in float64,
    `micro_batch` windows a forward: the mean over all targets (those that are not pads, unpacked). With
    `passes`, exactly that many forwards, those past the windows on `pad_with` weighted zero (every FSDP
    rank must run as many as the others)."""
    total = torch.zeros((), device=device, dtype=torch.float64)
    count = torch.zeros((), device=device, dtype=torch.float64)
    for i in range(passes if passes is not None else math.ceil(len(windows) / micro_batch)):
        chunk = windows[i * micro_batch : (i + 1) * micro_batch]
        weight = target_count(chunk, pad_id)
        chunk = (chunk if len(chunk) else pad_with).to(device)
        total += loss(chunk[:, :-1], chunk[:, 1:]).double() * weight
        count += weight
    return total, count


def evaluate(model: torch.nn.Module, loss: Callable, windows: torch.Tensor, micro_batch: int, trainer,
             pad_id: int | None = None) -> float:
    """Mean `loss(inputs, targets)` over `windows` (split across ranks). Every rank runs the same
    number of forward passes (FSDP gathers weights in each), the short ones on an empty remainder
    that counts zero."""
    was_training = model.training
    model.eval()
    world, strategy = trainer.world_size, trainer.strategy
    passes = math.ceil(math.ceil(len(windows) / world) / micro_batch)
    with trainer.precision_plugin.forward_context():
        total, count = loss_sum(loss, windows[trainer.global_rank :: world], micro_batch, strategy.root_device, passes,
                                pad_with=windows[:1], pad_id=pad_id)
    total = strategy.reduce(total, reduce_op="sum")
    count = strategy.reduce(count, reduce_op="sum")
    model.train(was_training)
    return (total / count).item()
