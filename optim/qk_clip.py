"""MuonClip's QK-clip (Kimi Team 2025, "Kimi K2: Open Agentic Intelligence", arXiv 2507.20534, §2.1):
after each optimizer step, the query and key weights of every attention head whose largest
pre-softmax logit passed a threshold τ are scaled down, so the logits cannot grow without bound.

For each layer and head h, with S_max^h the largest q_i·k_j · scale (j ≤ i) seen in the step's
training forwards (the maximum over micro-batches and, under DDP/FSDP, over ranks):

    γ_h = τ / S_max^h  if S_max^h > τ,  else 1
    W_q^h ← sqrt(γ_h) W_q^h,    W_k^h ← sqrt(γ_h) W_k^h      (their biases too)

so the next logits of head h are scaled by γ_h (RoPE is linear in q and k, so it commutes). Heads
under τ are untouched; K2 uses τ = 100 (its multi-head-latent variant splits the shared rotary key,
which a plain multi-head attention does not have). The attention modules provide the logits and
their q/k rows per head (models/attention.py: ``QKLogitTracking``).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from optim.distributed import DTensor, own_rows, row_shard_dim


class QKClip:
    def __init__(self, model: nn.Module, threshold: float = 100.0):
        if not threshold > 0:
            raise ValueError(f"qk_clip_threshold={threshold} must be > 0")
        self.threshold = float(threshold)
        self.layers = [m for m in model.modules() if hasattr(m, "qk_row_heads") and hasattr(m, "pop_max_logits")]
        if not self.layers:
            raise ValueError(f"QK-clip: {type(model).__name__} has no attention module that reports its logits "
                             "(models.gpt2 and models.llama do)")
        for layer in self.layers:
            layer.track_max_logits = True
        self._heads: tuple[torch.device, list] | None = None  # see _heads_on

    def take_maxima(self) -> torch.Tensor | None:
        """(layers, heads): each head's largest logit in the training forwards since the last call, on
        this rank (None if there was none). Combined over ranks by the caller (trainer/step_summary.py)."""
        seen = [layer.pop_max_logits() for layer in self.layers]
        return None if any(s is None for s in seen) else torch.stack(seen)

    @torch.no_grad()
    def clip(self, maxima: torch.Tensor) -> None:
        """Scale the q/k rows of every head whose largest logit (`maxima`, the max over ranks) passed τ,
        after the step's update. Computed on the device without reading anything back: heads under τ
        are multiplied by 1 (exact)."""
        gammas = clip_factors(maxima, self.threshold).sqrt()
        for layer, gamma, layer_heads in zip(self.layers, gammas, self._heads_on(gammas.device)):
            for (param, _), heads in zip(layer.qk_row_heads(), layer_heads):
                factors = torch.where(heads >= 0, gamma[heads.clamp(min=0)], torch.ones((), device=gamma.device))
                scale_rows_(param, factors.to(param.dtype))

    def _heads_on(self, device: torch.device) -> list[list[torch.Tensor]]:
        """Each layer's head index of every q/k row (qk_row_heads' order), moved to `device` once, not
        copied from the host for every parameter every step."""
        if self._heads is None or self._heads[0] != device:
            self._heads = (device, [[heads.to(device) for _, heads in layer.qk_row_heads()] for layer in self.layers])
        return self._heads[1]

    def __call__(self) -> dict[str, float]:
        """Clip after a step on one process (no ranks to combine); returns the step's largest logit per
        layer and head, and overall."""
        maxima = self.take_maxima()
        if maxima is None:  # no training forward since the last step
            return {}
        self.clip(maxima)
        return logit_columns(maxima.tolist())


def logit_columns(maxima: list[list[float]]) -> dict[str, float]:
    """metrics.csv's QK-clip columns: the largest logit overall, and per layer and head."""
    out = {"qk_max_logit": max(max(row) for row in maxima)}
    for i, row in enumerate(maxima):
        out.update({f"qk_logit/l{i}h{h}": value for h, value in enumerate(row)})
    return out


def clip_factors(maxima: torch.Tensor, threshold: float) -> torch.Tensor:
    """γ = τ / S_max where S_max > τ, else 1 (a head whose logits are all negative is left alone too)."""
    return torch.where(maxima > threshold, threshold / maxima, torch.ones_like(maxima))


def scale_rows_(param: torch.Tensor, factors: torch.Tensor) -> None:
    """param[i] *= factors[i] along dim 0, in place; an FSDP2 (or HSDP) row shard scales its own rows."""
    if isinstance(param, DTensor):
        if row_shard_dim(param) is None:
            raise NotImplementedError(f"QK-clip scales rows of FSDP2/HSDP row shards; got placements {param.placements}")
        factors, param = own_rows([factors], [param])[0], param.to_local()
    param.mul_(factors.view(-1, *([1] * (param.ndim - 1))))
