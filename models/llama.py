"""LLaMA (Touvron et al. 2023) in the GaLore configuration used by the Muon-family papers.

RMSNorm (pre-norm), rotary position embeddings, SwiGLU MLP, no biases, untied LM head (tied with
``tie_head``, as Suite A), causal SDPA attention. At vocab 32000 the named sizes match GaLore's configs (llama_60m: 58.1M,
llama_1b: 1339.1M); with the padded GPT-2 vocab 50304 they are 76.8M and 1414.1M.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.attention import QKLogitTracking, causal_attention, row_heads
from models.blocks import run_blocks
from models.loss import chunked_cross_entropy
from models.rope import apply_rope, rope_tables


@dataclass
class LlamaConfig:
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    intermediate_size: int = 2048  # SwiGLU hidden width
    vocab_size: int = 50304
    max_seq_len: int = 1024  # context length (RoPE tables are built for this many positions)
    rope_theta: float = 10000.0
    rope_layout: str = "half"  # "half": HF/GaLore's rotate_half; "interleaved": Meta's and Suite A's pairs
    norm_eps: float = 1e-6
    dropout: float = 0.0
    tie_head: bool = False  # True: the LM head is the token embedding (Suite A)

    @property
    def context_length(self) -> int:
        return self.max_seq_len


class Attention(QKLogitTracking):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.rope_layout = cfg.rope_layout
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.o_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        heads = lambda t: t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # noqa: E731
        q = apply_rope(heads(self.q_proj(x)), cos, sin, self.rope_layout)
        k = apply_rope(heads(self.k_proj(x)), cos, sin, self.rope_layout)
        self.record_max_logits(q, k)
        y = causal_attention(q, k, heads(self.v_proj(x)), dropout=self.dropout if self.training else 0.0)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C))

    def qk_row_heads(self):
        C = self.q_proj.weight.shape[0]
        heads = row_heads(C, C // self.n_head)
        return [(self.q_proj.weight, heads), (self.k_proj.weight, heads)]


class SwiGLU(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_head:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.activation_checkpointing = False  # recompute each block's activations in the backward pass
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """N(0, 0.02) for every matrix (HF LlamaConfig.initializer_range), ones for RMSNorm gains;
        the RoPE tables are rebuilt too (they are not saved, so an empty-initialised model needs them)."""
        cfg = self.config
        cos, sin = rope_tables(cfg.n_embd // cfg.n_head, cfg.max_seq_len, cfg.rope_theta)
        self.rope_cos, self.rope_sin = cos.to(self.rope_cos.device), sin.to(self.rope_sin.device)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            elif isinstance(module, nn.RMSNorm):
                module.reset_parameters()

    def head_splits(self) -> dict[nn.Parameter, tuple[int, int]]:
        """(blocks, dim) of the attention matrices: n_head row blocks of q, k and v, n_head column
        blocks of the output projection."""
        H = self.config.n_head
        return {p: (H, 1 if p is block.attn.o_proj.weight else 0) for block in self.blocks
                for p in (block.attn.q_proj.weight, block.attn.k_proj.weight, block.attn.v_proj.weight, block.attn.o_proj.weight)}

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """The logits (batch, seq, vocab) of the next token at each position; with `targets`, their
        mean cross-entropy instead, computed without ever holding all the logits (models/loss.py)."""
        x = run_blocks(self.blocks, self.embed_tokens(idx), self.rope_cos, self.rope_sin,
                       checkpointed=self.activation_checkpointing and self.training)
        if targets is None:
            return self.lm_head(self.norm(x))
        return chunked_cross_entropy(self.norm(x), self.lm_head, targets)
