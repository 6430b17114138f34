"""Model definitions: GPT-2 and LLaMA, built from a plain mapping (one `configs/model/*.yaml`).

    from models import build_model
    model = build_model({"family": "gpt2", "n_layer": 12, "n_head": 12, "n_embd": 768})
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import torch.nn as nn

from models.gpt2 import GPT2, GPT2Config
from models.llama import Llama, LlamaConfig
from models.rope import LAYOUTS as ROPE_LAYOUTS

POSITIONS = ("learned", "rope")  # GPT-2's position encodings

FAMILIES: dict[str, tuple[type, type[nn.Module]]] = {
    "gpt2": (GPT2Config, GPT2),
    "llama": (LlamaConfig, Llama),
}


class ModelConfigError(ValueError):
    """A model specification that cannot be built; the message says what would be valid."""


def build_config(spec: Mapping) -> GPT2Config | LlamaConfig:
    """The family's config dataclass from a mapping with a `family` key (extra `name` is ignored)."""
    spec = dict(spec)
    spec.pop("name", None)
    family = spec.pop("family", None)
    if family not in FAMILIES:
        raise ModelConfigError(f"model.family={family!r} is not one of {sorted(FAMILIES)}")
    config_cls = FAMILIES[family][0]
    fields = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(spec) - fields)
    if unknown:
        raise ModelConfigError(f"unknown {family} model field(s) {unknown}; valid fields: {sorted(fields)}")
    return config_cls(**spec)


def config_problems(config: GPT2Config | LlamaConfig) -> list[str]:
    """Every reason this config cannot be built, as user-facing sentences (empty when it is fine)."""
    problems = []
    for name in ("n_layer", "n_head", "n_embd", "vocab_size"):
        if getattr(config, name) < 1:
            problems.append(f"model.{name}={getattr(config, name)} must be >= 1")
    if config.n_head >= 1 and config.n_embd % config.n_head:
        valid = [h for h in range(1, config.n_embd + 1) if config.n_embd % h == 0]
        problems.append(
            f"model.n_embd={config.n_embd} is not divisible by model.n_head={config.n_head} "
            f"(valid n_head for this width: {valid[:12]}{' ...' if len(valid) > 12 else ''})"
        )
    if isinstance(config, GPT2Config) and config.pos not in POSITIONS:
        problems.append(f"model.pos={config.pos!r} is not one of {list(POSITIONS)}")
    if isinstance(config, LlamaConfig) and config.rope_layout not in ROPE_LAYOUTS:
        problems.append(f"model.rope_layout={config.rope_layout!r} is not one of {list(ROPE_LAYOUTS)}")
    uses_rope = isinstance(config, LlamaConfig) or config.pos == "rope"
    if uses_rope and config.n_head >= 1 and (config.n_embd // config.n_head) % 2:
        problems.append(f"head dim n_embd/n_head={config.n_embd // config.n_head} must be even for RoPE")
    return problems


def build_model(spec: Mapping | GPT2Config | LlamaConfig) -> nn.Module:
    config = spec if isinstance(spec, (GPT2Config, LlamaConfig)) else build_config(spec)
    problems = config_problems(config)
    if problems:
        raise ModelConfigError("; ".join(problems))
    model_cls = next(m for c, m in FAMILIES.values() if isinstance(config, c))
    return model_cls(config)


@dataclass
class ParameterCount:
    total: int
    embedding: int  # token + position embeddings and an untied LM head (vocab/position-sized)
    hidden_matrices: int  # 2-D weights of the transformer blocks (what Muon updates)

    @property
    def non_embedding(self) -> int:
        return self.total - self.embedding


def count_parameters(model: nn.Module) -> ParameterCount:
    """Unique parameters (a tied head counts once); works on the meta device."""
    unique = {id(p): p for p in model.parameters()}
    embedding = {id(m.weight): m.weight for m in model.modules() if isinstance(m, nn.Embedding)}
    embedding[id(model.lm_head.weight)] = model.lm_head.weight
    hidden = {id(p): p for n, p in model.blocks.named_parameters() if p.ndim == 2}
    size = lambda d: sum(p.numel() for p in d.values())  # noqa: E731
    return ParameterCount(total=size(unique), embedding=size(embedding), hidden_matrices=size(hidden))


__all__ = ["GPT2", "GPT2Config", "Llama", "LlamaConfig", "build_config", "build_model", "config_problems",
           "count_parameters", "ParameterCount", "ModelConfigError", "FAMILIES"]
