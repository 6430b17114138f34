"""Causal multi-head attention through PyTorch's scaled_dot_product_attention (flash / memory-
efficient kernels on GPU, a fused CPU kernel otherwise)."""

import torch
import torch.nn.functional as F


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float = 0.0,
                     scale: float | None = None) -> torch.Tensor:
    """q, k, v: (batch, heads, seq, head_dim) -> (batch, heads, seq, head_dim); scores q·kᵀ · scale
    (default 1/sqrt(head_dim))."""
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scale)
