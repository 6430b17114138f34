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
