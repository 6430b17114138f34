"""Hugging Face transformers export: a `config.json` and a `model.safetensors` (float32) that
`AutoModelForCausalLM.from_pretrained(dir)` loads as the same function (the same logits up to float32
rounding: tests/test_export_hf.py).

    GPT-2 -> GPT2LMHeadModel                             LLaMA -> LlamaForCausalLM
    wte, wpe             transformer.wte, .wpe           embed_tokens          model.embed_tokens
    blocks.i.ln_1, ln_2  transformer.h.i.ln_1, ln_2      blocks.i.attn_norm    model.layers.i.input_layernorm
    blocks.i.attn.qkv    transformer.h.i.attn.c_attn  ᵀ  blocks.i.mlp_norm     model.layers.i.post_attention_layernorm
    blocks.i.attn.proj   transformer.h.i.attn.c_proj  ᵀ  blocks.i.attn.X_proj  model.layers.i.self_attn.X_proj  (X = q, k, v, o)
    blocks.i.mlp.fc      transformer.h.i.mlp.c_fc     ᵀ  blocks.i.mlp.X_proj   model.layers.i.mlp.X_proj  (X = gate, up, down)
    blocks.i.mlp.proj    transformer.h.i.mlp.c_proj   ᵀ  norm                  model.norm
    ln_f                 transformer.ln_f                lm_head               lm_head  (untied only)
    lm_head              lm_head  (untied only)

GPT-2: transformers' Conv1D computes x·W + b with W of shape (in, out), nn.Linear x·Wᵀ + b with W (out, in),
so the block matrices (ᵀ) are transposed; the fused qkv keeps its [q; k; v] order, c_attn's. bias=false is
exported as zero biases (the same function: HF's GPT-2 always has them). GELU is the tanh approximation
("gelu_new"), LayerNorm eps 1e-5 (torch's default), scores q·kᵀ/sqrt(d), /(l + 1) in block l with
scale_attn_by_inverse_layer_idx. Dropout: ours drops the embeddings and the attention probabilities only.

LLaMA: names change only (RMSNorm eps = norm_eps, SwiGLU = "silu", no biases), except with
rope_layout=interleaved: it rotates the feature pairs (2i, 2i + 1), transformers' rotate_half the pairs
(i, i + d/2), at the same frequency i. Within each head the rows of q_proj and k_proj are reordered,

    new row j = old row 2j (j < d/2),   old row 2(j − d/2) + 1 (j ≥ d/2),

the same permutation of q's and k's features, so every score q·k is unchanged.

A tied head (tie_head) is written once, as the embedding, with tie_word_embeddings true (safetensors refuses
tensors that share memory). Token ids (bos/eos) are the tokenizer's: config.json sets none.
Not expressible: GPT-2 with pos=rope (GPT2LMHeadModel has learned positions only).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from models import GPT2Config, LlamaConfig, ModelConfigError, build_config, build_model

GPT2_LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, which models/gpt2.py uses


class ExportError(ValueError):
    """A model or checkpoint that cannot be exported; the message says why."""


def _config(model_cfg: Mapping) -> GPT2Config | LlamaConfig:
    try:
        config = build_config(model_cfg)
    except ModelConfigError as e:
        raise ExportError(str(e)) from None
    if isinstance(config, GPT2Config) and config.pos != "learned":
        raise ExportError(f"GPT-2 with model.pos={config.pos} has no transformers equivalent: GPT2LMHeadModel has "
                          "learned positions only; export a pos=learned model or a llama one")
    return config


def hf_model(model_cfg: Mapping) -> tuple[str, dict]:
    """(transformers architecture name, config.json) of our model config (the resolved config's `model` node)."""
    c = _config(model_cfg)
    common = {"vocab_size": c.vocab_size, "tie_word_embeddings": c.tie_head, "bos_token_id": None,
              "eos_token_id": None, "torch_dtype": "float32"}
    if isinstance(c, GPT2Config):
        return "GPT2LMHeadModel", {
            "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_positions": c.block_size,
            "n_embd": c.n_embd, "n_layer": c.n_layer, "n_head": c.n_head, "n_inner": 4 * c.n_embd,
            "activation_function": "gelu_new", "layer_norm_epsilon": GPT2_LAYER_NORM_EPS,
            "embd_pdrop": c.dropout, "attn_pdrop": c.dropout, "resid_pdrop": 0.0, "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": c.scale_attn_by_inverse_layer_idx, **common}
    return "LlamaForCausalLM", {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "max_position_embeddings": c.max_seq_len,
        "hidden_size": c.n_embd, "intermediate_size": c.intermediate_size, "num_hidden_layers": c.n_layer,
        "num_attention_heads": c.n_head, "num_key_value_heads": c.n_head, "head_dim": c.n_embd // c.n_head,
        "hidden_act": "silu", "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_theta, "attention_bias": False,
        "mlp_bias": False, "attention_dropout": c.dropout, **common}


def _check_weights(config: GPT2Config | LlamaConfig, state_dict: Mapping) -> None:
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in build_model(config).state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state_dict.items()}
    wrong = [f"{k}: {got.get(k)}, expected {expected.get(k)}" for k in sorted(set(expected) | set(got))
             if expected.get(k) != got.get(k)]
    if wrong:
        raise ExportError(f"the weights do not fit the model config ({len(wrong)} tensors missing, extra or of "
                          f"another shape: {'; '.join(wrong[:3])}{' ...' if len(wrong) > 3 else ''})")


def _rotate_half_rows(n_embd: int, n_head: int) -> torch.Tensor:
    """Row order taking interleaved RoPE pairs (2i, 2i + 1) to rotate_half's (i, i + d/2) in every head."""
    d = n_embd // n_head
    within = torch.cat([torch.arange(0, d, 2), torch.arange(1, d, 2)])
    return (torch.arange(n_head)[:, None] * d + within).flatten()


def hf_state_dict(model_cfg: Mapping, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our weights (the keys of build_model(model_cfg).state_dict()) under transformers' names and layouts."""
    c = _config(model_cfg)
    _check_weights(c, state_dict)
    sd = state_dict
    if isinstance(c, GPT2Config):
        bias = lambda k, n: sd[k] if c.bias else torch.zeros(n)  # noqa: E731
        out = {"transformer.wte.weight": sd["wte.weight"], "transformer.wpe.weight": sd["wpe.weight"],
               "transformer.ln_f.weight": sd["ln_f.weight"], "transformer.ln_f.bias": bias("ln_f.bias", c.n_embd)}
        for i in range(c.n_layer):
            ours, hf = f"blocks.{i}.", f"transformer.h.{i}."
            for norm in ("ln_1", "ln_2"):
                out[f"{hf}{norm}.weight"] = sd[f"{ours}{norm}.weight"]
                out[f"{hf}{norm}.bias"] = bias(f"{ours}{norm}.bias", c.n_embd)
            for name, hf_name in (("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"), ("mlp.fc", "mlp.c_fc"), ("mlp.proj", "mlp.c_proj")):
                weight = sd[f"{ours}{name}.weight"]
                out[f"{hf}{hf_name}.weight"] = weight.t()
                out[f"{hf}{hf_name}.bias"] = bias(f"{ours}{name}.bias", weight.shape[0])
    else:
        rows = _rotate_half_rows(c.n_embd, c.n_head) if c.rope_layout == "interleaved" else slice(None)
        out = {"model.embed_tokens.weight": sd["embed_tokens.weight"], "model.norm.weight": sd["norm.weight"]}
        for i in range(c.n_layer):
            ours, hf = f"blocks.{i}.", f"model.layers.{i}."
            out[f"{hf}input_layernorm.weight"] = sd[f"{ours}attn_norm.weight"]
            out[f"{hf}post_attention_layernorm.weight"] = sd[f"{ours}mlp_norm.weight"]
            out[f"{hf}self_attn.q_proj.weight"] = sd[f"{ours}attn.q_proj.weight"][rows]
            out[f"{hf}self_attn.k_proj.weight"] = sd[f"{ours}attn.k_proj.weight"][rows]
            out[f"{hf}self_attn.v_proj.weight"] = sd[f"{ours}attn.v_proj.weight"]
            out[f"{hf}self_attn.o_proj.weight"] = sd[f"{ours}attn.o_proj.weight"]
            for proj in ("gate_proj", "up_proj", "down_proj"):
                out[f"{hf}mlp.{proj}.weight"] = sd[f"{ours}mlp.{proj}.weight"]
    if not c.tie_head:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in out.items()}


def export_model(model_cfg: Mapping, state_dict: Mapping[str, torch.Tensor], out_dir: Path | str) -> Path:
    """Write out_dir/config.json and out_dir/model.safetensors (out_dir is created); returns out_dir."""
    _, config = hf_model(model_cfg)
    tensors = hf_state_dict(model_cfg, state_dict)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    return out_dir


def load_checkpoint(path: Path | str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(resolved config, model state_dict) of a run directory's checkpoints/last.ckpt or of a .ckpt file.
    The LightningModule holds the model as `model` (trainer/module.py): its keys lose the "model." prefix,
    and torch.compile's "_orig_mod." wherever it appears."""
    path = Path(path)
    file = path / "checkpoints" / "last.ckpt" if path.is_dir() else path  # trainer/checkpoint.py last_checkpoint_path
    if not file.is_file():
        raise ExportError(f"{file} does not exist: pass a run directory (holding checkpoints/last.ckpt) or a .ckpt file")
    try:
        checkpoint = torch.load(file, map_location="cpu", mmap=True, weights_only=False)
    except Exception as e:  # truncated zip, garbage bytes, unpickling errors
        raise ExportError(f"{file} is not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "config" not in checkpoint.get("muonlab", {}):
        raise ExportError(f"{file} is not a muonlab checkpoint (expected a Lightning checkpoint with a 'state_dict' "
                          "and the config in its 'muonlab' entry)")
    keys = {k.replace("_orig_mod.", ""): v for k, v in checkpoint["state_dict"].items()}
    weights = {k.removeprefix("model."): v for k, v in keys.items() if k.startswith("model.")}
    return checkpoint["muonlab"]["config"], weights


def load_model(path: Path | str) -> tuple[dict, torch.nn.Module]:
    """(resolved config, the model with the checkpoint's weights, in eval mode) of a run dir or .ckpt file."""
    config, state_dict = load_checkpoint(path)
    model = build_model(config["model"])
    model.load_state_dict(state_dict)
    return config, model.eval()
