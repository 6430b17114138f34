"""The stack of transformer blocks, run plainly or with activation checkpointing (each block's
activations are recomputed in the backward pass instead of stored: one extra forward per block for
memory that no longer grows with depth; the gradients are the same)."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, *args, checkpointed: bool = False) -> torch.Tensor:
    for block in blocks:
        x = checkpoint(block, x, *args, use_reentrant=False) if checkpointed else block(x, *args)
    return x


def compile_blocks(model: nn.Module, **compile_options) -> None:
    """torch.compile each transformer block (torchtitan's way): one graph serves every block (same code,
    same shapes), compiled in seconds where the whole model took minutes; and, applied before FSDP2's
    fully_shard, each block's all-gather and reduce-scatter hooks stay outside the compiled graph.
    Activation checkpointing (run_blocks) wraps the compiled blocks."""
    for block in model.blocks:
        block.compile(**compile_options)
