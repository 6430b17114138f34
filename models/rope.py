"""Rotary position embeddings (Su et al. 2021), in the two feature layouts the reference code uses.

The angle of position p and frequency i is p · θ^(−2i/d) for i < d/2 (d = head_dim). The layouts
differ only in which features form a rotated pair:

    "half"         (i, i + d/2)     HF/GaLore LLaMA (``rotate_half``)
    "interleaved"  (2i, 2i + 1)     Meta's LLaMA, the Variance-Adaptive-Muon GPT-2 and Suite A

The two are the same rotation up to a fixed permutation of q's and k's features, so they train
identically from scratch only when the permutation is absorbed by the projection weights; with a
given init and seed they are different runs. Tables and rotation are computed in float32.
"""

from __future__ import annotations

import torch

LAYOUTS = ("half", "interleaved")


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (max_seq_len, head_dim/2) for the rotation angle pos * theta^(-2i/d)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str = "half") -> torch.Tensor:
    """Rotate the feature pairs of x: (batch, heads, seq, head_dim) in the given layout."""
    cos, sin = cos[: x.shape[2]], sin[: x.shape[2]]
    if layout == "half":
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).type_as(x)
    pairs = x.float().unflatten(-1, (-1, 2))
    x1, x2 = pairs[..., 0], pairs[..., 1]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2).type_as(x)
