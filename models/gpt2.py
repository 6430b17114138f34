"""GPT-2 (Radford et al. 2019), written after nanoGPT's model.py.

Pre-LayerNorm transformer: learned absolute positions, LayerNorm, GELU MLP (4x), causal SDPA
attention with a fused qkv projection, optional biases, and a head tied to the token embedding.
At vocab 50257, context 1024, with biases: gpt2_125m has 124,439,808 parameters.

Options the papers' forks use:
  pos="rope"                         rotary positions on q and k instead of ``wpe`` (interleaved
                                     pairs, θ = 10000: Variance-Adaptive-Muon NanoGPT/gpt2/models/model.py)
  tie_head=False                     an LM head of its own (the same file: ``weight_tying = False``)
  scale_attn_by_inverse_layer_idx    scores q·kᵀ/(sqrt(d)·(l + 1)) in block l = 0, 1, ... (AGI-Arena/MARS
                                     model.py, True in all its training scripts)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.attention import QKLogitTracking, causal_attention, row_heads
from models.blocks import run_blocks
from models.loss import chunked_cross_entropy
from models.rope import apply_rope, rope_tables


@dataclass
class GPT2Config:
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    vocab_size: int = 50257  # GPT-2 BPE; 50304 pads it to a multiple of 64
    block_size: int = 1024  # context length (number of learned positions)
    bias: bool = True  # biases in Linear and LayerNorm, as in OpenAI's GPT-2
    dropout: float = 0.0
    pos: str = "learned"  # "learned": a wpe table (GPT-2); "rope": rotary positions on q and k
    rope_theta: float = 10000.0
    tie_head: bool = True  # the LM head is the token embedding (GPT-2)
    scale_attn_by_inverse_layer_idx: bool = False  # attention scores also divided by (layer index + 1)

    @property
    def context_length(self) -> int:
        return self.block_size


class CausalSelfAttention(QKLogitTracking):
    def __init__(self, cfg: GPT2Config, layer: int):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout
        head_dim = cfg.n_embd // cfg.n_head  # scores q·kᵀ · scale; None: SDPA's 1/sqrt(head_dim)
        self.scale = 1.0 / math.sqrt(head_dim) / (layer + 1) if cfg.scale_attn_by_inverse_layer_idx else None

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if rope is not None:
            q, k = (apply_rope(t, *rope, layout="interleaved") for t in (q, k))
        self.record_max_logits(q, k, self.scale)
        y = causal_attention(q, k, v, dropout=self.dropout if self.training else 0.0, scale=self.scale)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))

    def qk_row_heads(self):
        C = self.proj.weight.shape[0]
        d = C // self.n_head
        heads = torch.cat([row_heads(C, d), row_heads(C, d), torch.full((C,), -1, dtype=torch.long)])
        return [(self.qkv.weight, heads)] + ([(self.qkv.bias, heads)] if self.qkv.bias is not None else [])


class MLP(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: GPT2Config, layer: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg, layer)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), rope)
        return x + self.mlp(self.ln_2(x))


class GPT2(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.pos == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, layer) for layer in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_head:
            self.lm_head.weight = self.wte.weight
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.activation_checkpointing = False  # recompute each block's activations in the backward pass
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """N(0, 0.02) weights, residual projections N(0, 0.02/sqrt(2L)) (GPT-2 paper §2.3); the RoPE
        tables too with pos="rope" (they are not saved, so an empty-initialised model needs them)."""
        cfg = self.config
        if cfg.pos == "rope":
            cos, sin = rope_tables(cfg.n_embd // cfg.n_head, cfg.block_size, cfg.rope_theta)
            self.rope_cos, self.rope_sin = cos.to(self.rope_cos.device), sin.to(self.rope_sin.device)
        residual_std = 0.02 / math.sqrt(2 * cfg.n_layer)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=residual_std if name.endswith(".proj") else 0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
            elif isinstance(module, nn.LayerNorm):
                module.reset_parameters()

    def head_splits(self) -> dict[nn.Parameter, tuple[int, int]]:
        """(blocks, dim) of the attention matrices: the fused qkv has 3·n_head row blocks (q, k and v of
        each head), the output projection n_head column blocks."""
        H = self.config.n_head
        return {p: split for block in self.blocks for p, split in ((block.attn.qkv.weight, (3 * H, 0)), (block.attn.proj.weight, (H, 1)))}

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """The logits (batch, seq, vocab) of the next token at each position; with `targets`, their
        mean cross-entropy instead, computed without ever holding all the logits (models/loss.py)."""
        x = self.wte(idx)
        rope = (self.rope_cos, self.rope_sin) if self.wpe is None else None
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        x = run_blocks(self.blocks, self.drop(x), rope, checkpointed=self.activation_checkpointing and self.training)
        if targets is None:
            return self.lm_head(self.ln_f(x))
        return chunked_cross_entropy(self.ln_f(x), self.lm_head, targets)
