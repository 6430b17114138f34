"""Causal multi-head attention through PyTorch's scaled_dot_product_attention (flash / memory-
efficient kernels on GPU, a fused CPU kernel otherwise), and what the attention modules expose to the
optimizers: their heads' rows and columns (per-head orthogonalization) and the largest pre-softmax
logit of each head (MuonClip's QK-clip, optim/qk_clip.py)."""

import torch
import torch.nn as nn
import torch.nn.functional as F


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float = 0.0,
                     scale: float | None = None) -> torch.Tensor:
    """q, k, v: (batch, heads, seq, head_dim) -> (batch, heads, seq, head_dim); scores q·kᵀ · scale
    (default 1/sqrt(head_dim))."""
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scale)


SCORE_ELEMENTS = 2**26  # scores per block of query rows: 256 MB in fp32


@torch.no_grad()
def max_causal_logits(q: torch.Tensor, k: torch.Tensor, scale: float | None = None,
                      block_elements: int = SCORE_ELEMENTS) -> torch.Tensor:
    """(heads,) the largest score q_i·k_j · scale over the batch and all j ≤ i. The scores are fp32
    (bf16 activations are upcast, and autocast is off so the matmul stays fp32), computed for every
    sequence and head at once, a block of query rows at a time (at most `block_elements` scores, each
    block against the keys up to its last row): only runs that clip pay for them."""
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    B, H, T, _ = q.shape
    dtype = torch.promote_types(q.dtype, torch.float32)
    rows = max(1, block_elements // (B * H * T))
    best = torch.full((H,), float("-inf"), dtype=dtype, device=q.device)
    with torch.autocast(q.device.type, enabled=False):
        for start in range(0, T, rows):
            end = min(T, start + rows)
            scores = q[:, :, start:end].to(dtype) @ k[:, :, :end].to(dtype).transpose(-2, -1)  # (B, H, rows, end)
            future = torch.arange(start, end, device=q.device)[:, None] < torch.arange(end, device=q.device)
            best = torch.maximum(best, scores.masked_fill(future, float("-inf")).amax(dim=(0, 2, 3)))
    return best * scale


class QKLogitTracking(nn.Module):
    """An attention module that, when ``track_max_logits`` is on, keeps the largest logit of each head
    seen in training forwards since the last ``pop_max_logits()``. Subclasses name their query and
    key rows per head in ``qk_row_heads()``."""

    n_head: int
    track_max_logits: bool = False
    _max_logits: torch.Tensor | None = None

    def record_max_logits(self, q: torch.Tensor, k: torch.Tensor, scale: float | None = None) -> None:
        if self.track_max_logits and self.training:
            seen = max_causal_logits(q, k, scale)
            self._max_logits = seen if self._max_logits is None else torch.maximum(self._max_logits, seen)

    def pop_max_logits(self) -> torch.Tensor | None:
        logits, self._max_logits = self._max_logits, None
        return logits

    def qk_row_heads(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """[(parameter, head of each of its rows: (rows,) long, −1 for rows outside q and k)]."""
        raise NotImplementedError


def row_heads(rows: int, head_dim: int) -> torch.Tensor:
    """Head index of each of `rows` rows of consecutive heads of `head_dim` rows each."""
    return torch.arange(rows) // head_dim
