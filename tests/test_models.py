import math

import pytest
import torch
import yaml

from conftest import ROOT, run_cli
from models import ModelConfigError, build_model, count_parameters

# (total at the config's vocab, total at vocab 32000, hidden-matrix params); reference/frameworks.md §4.1-4.2
NAMED_SIZES = {
    "gpt2_125m": (124_439_808, None, 84_934_656),
    "gpt2_350m": (354_823_168, None, 301_989_888),
    "gpt2_774m": (774_030_080, None, 707_788_800),
    "gpt2_1.5b": (1_557_611_200, None, 1_474_560_000),
    "llama_60m": (76_816_896, 58_073_600, 25_296_896),
    "llama_130m": (162_220_800, 134_105_856, 84_934_656),
    "llama_350m": (405_455_872, 367_969_280, 302_383_104),
    "llama_1b": (1_414_055_936, 1_339_082_752, 1_207_910_400),
}


def spec(name: str, **overrides) -> dict:
    return {**yaml.safe_load(open(ROOT / "configs" / "model" / f"{name}.yaml")), **overrides}


def meta_count(model_spec: dict):
    with torch.device("meta"):
        return count_parameters(build_model(model_spec))


@pytest.mark.parametrize("name", NAMED_SIZES)
def test_named_sizes_match_the_reference_counts(name):
    total, total_32k, hidden = NAMED_SIZES[name]
    count = meta_count(spec(name))
    assert count.total == total
    assert count.hidden_matrices == hidden
    if total_32k is not None:
        assert meta_count(spec(name, vocab_size=32000)).total == total_32k


def test_rounded_counts_are_the_published_ones():
    assert f"{meta_count(spec('gpt2_125m')).total / 1e6:.1f}M" == "124.4M"
    assert f"{meta_count(spec('llama_1b')).total / 1e6:.1f}M" == "1414.1M"
    assert f"{meta_count(spec('llama_1b', vocab_size=32000)).total / 1e6:.1f}M" == "1339.1M"


def test_count_params_script_prints_total_and_non_embedding():
    result = run_cli("scripts/count_params.py", "model=gpt2_125m")
    assert result.returncode == 0, result.stderr
    assert "gpt2_125m: 124.4M parameters (124,439,808)" in result.stdout
    assert "non-embedding 85.1M" in result.stdout


def test_count_params_script_rejects_unknown_model():
    result = run_cli("scripts/count_params.py", "model=gpt2_huge")
    assert result.returncode == 2
    assert "Could not find 'model/gpt2_huge'" in result.stderr and "gpt2_125m" in result.stderr


def test_gpt2_head_is_tied_and_llama_head_is_not():
    gpt2, llama = build_model(spec("gpt2_tiny")), build_model(spec("llama_tiny"))
    assert gpt2.lm_head.weight is gpt2.wte.weight
    assert llama.lm_head.weight is not llama.embed_tokens.weight


@pytest.mark.parametrize("name", ["gpt2_tiny", "llama_tiny"])
def test_forward_shape_and_initial_loss_near_uniform(name):
    torch.manual_seed(0)
    model = build_model(spec(name))
    idx = torch.randint(0, 50257, (2, 16))
    logits = model(idx)
    assert logits.shape == (2, 16, model.config.vocab_size)
    targets = torch.randint(0, 50257, (2, 16))
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
    assert abs(loss.item() - math.log(model.config.vocab_size)) < 0.5


@pytest.mark.parametrize("name", ["gpt2_tiny", "llama_tiny"])
def test_attention_is_causal(name):
    torch.manual_seed(0)
    model = build_model(spec(name)).eval()
    idx = torch.randint(0, 50257, (1, 12))
    changed = idx.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 50257
    assert torch.allclose(model(idx)[0, :8], model(changed)[0, :8], atol=1e-6)
    assert not torch.allclose(model(idx)[0, 8:], model(changed)[0, 8:], atol=1e-4)


def test_gpt2_without_bias_has_no_bias_parameters():
    model = build_model(spec("gpt2_tiny", bias=False))
    assert not [n for n, _ in model.named_parameters() if n.endswith("bias")]


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_rope_preserves_norms_and_depends_on_relative_position(layout):
    from models.rope import apply_rope, rope_tables

    cos, sin = rope_tables(8, 16, 10000.0)
    q, k = torch.randn(1, 1, 16, 8), torch.randn(1, 1, 16, 8)
    rq = apply_rope(q, cos, sin, layout)
    assert torch.allclose(rq.norm(dim=-1), q.norm(dim=-1), atol=1e-5)
    # the same q, k placed at (2, 5) and at (7, 10) give the same score: only the offset matters
    same_q, same_k = q[..., :1, :].expand(1, 1, 16, 8), k[..., :1, :].expand(1, 1, 16, 8)
    rq, rk = apply_rope(same_q, cos, sin, layout), apply_rope(same_k, cos, sin, layout)
    assert torch.allclose(rq[0, 0, 2] @ rk[0, 0, 5], rq[0, 0, 7] @ rk[0, 0, 10], atol=1e-5)


def test_interleaved_rope_rotates_adjacent_pairs_as_the_variance_adaptive_gpt2():
    """NanoGPT/gpt2/models/model.py: x.reshape(..., -1, 2) -> (x0 cos - x1 sin, x0 sin + x1 cos), flattened; the half
    layout is the same rotation of the features permuted to (0, 2, 4, ..., 1, 3, 5, ...)."""
    from models.rope import apply_rope, rope_tables

    d, T = 8, 5
    cos, sin = rope_tables(d, T, 10000.0)
    x = torch.randn(1, 2, T, d)
    theta = 1.0 / (10000.0 ** (2 * torch.arange(0, d // 2, dtype=torch.float32) / d))
    angle = torch.arange(T, dtype=torch.float32)[:, None] * theta  # their code, transcribed
    x0, x1 = x.reshape(1, 2, T, d // 2, 2).unbind(-1)
    theirs = torch.stack([x0 * angle.cos() - x1 * angle.sin(), x0 * angle.sin() + x1 * angle.cos()], -1).flatten(-2)
    assert torch.allclose(apply_rope(x, cos, sin, "interleaved"), theirs, atol=1e-6)
    perm = torch.cat([torch.arange(0, d, 2), torch.arange(1, d, 2)])
    assert torch.allclose(apply_rope(x[..., perm], cos, sin, "half"), theirs[..., perm], atol=1e-6)


def test_variance_adaptive_gpt2_has_rope_no_wpe_and_an_untied_head():
    model = build_model(spec("gpt2_tiny", pos="rope", tie_head=False, bias=False))
    names = {n for n, _ in model.named_parameters()}
    assert "wpe.weight" not in names and "lm_head.weight" in names and model.lm_head.weight is not model.wte.weight
    count = meta_count(spec("gpt2_125m", pos="rope", tie_head=False, bias=False, vocab_size=50304))
    # GPT-2 small's 84.9M hidden matrices, wte and its own head (2 x 50304 x 768), 25 LayerNorm gains; no wpe, no biases
    assert count.total == 84_934_656 + 2 * 50304 * 768 + 25 * 768 == 162_220_800
    torch.manual_seed(0)
    model.eval()
    idx = torch.randint(0, 50257, (1, 12))
    changed = idx.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 50257
    assert torch.allclose(model(idx)[0, :8], model(changed)[0, :8], atol=1e-6)  # causal


def test_scale_attn_by_inverse_layer_idx_divides_block_ls_scores_by_l_plus_1():
    """AGI-Arena/MARS MARS_M/model.py: att = (q @ kᵀ) * (1 / sqrt(head_dim) / (idx_layer + 1)), layers from 0."""
    torch.manual_seed(0)
    model = build_model(spec("gpt2_tiny", scale_attn_by_inverse_layer_idx=True)).eval()
    attn, x = model.blocks[1].attn, torch.randn(1, 6, 64)
    q, k, v = (t.view(1, 6, 2, 32).transpose(1, 2) for t in attn.qkv(x).split(64, dim=2))
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(32) / 2.0
    scores = scores.masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1), float("-inf"))
    expected = attn.proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(1, 6, 64))
    assert torch.allclose(attn(x, None), expected, atol=1e-5)
    assert attn.scale == 1 / math.sqrt(32) / 2 and build_model(spec("gpt2_tiny")).blocks[1].attn.scale is None  # off: SDPA's


def test_suite_a_llama_ties_its_head():
    model = build_model(spec("llama_tiny", tie_head=True, rope_layout="interleaved"))
    assert model.lm_head.weight is model.embed_tokens.weight
    assert model(torch.randint(0, 50304, (1, 8))).shape == (1, 8, 50304)


@pytest.mark.parametrize("name", ["llama_marin_130m", "llama_marin_300m", "llama_marin_520m", "llama_marin_1.2b",
                                  "llama_suite_a_210m", "llama_suite_a_720m"])
def test_marin_and_suite_a_shapes(name):
    """Hidden matrices L(3 d d_ff + 4 d²): Marin's Chinchilla calculator (reference/optimizers.md §10.3); Marin's
    models are 32 layers deep (marin/optimizer_sweep/models.py), Suite A's 210M/720M 24 x 768 and 12 x 2048."""
    s = spec(name)
    expected_layers = {"llama_suite_a_210m": 24, "llama_suite_a_720m": 12}.get(name, 32)
    assert s["n_layer"] == expected_layers
    count = meta_count(s)
    d, ff = s["n_embd"], s["intermediate_size"]
    assert count.hidden_matrices == s["n_layer"] * (3 * d * ff + 4 * d * d)
    head = 0 if s["tie_head"] else s["vocab_size"] * d
    assert count.total == count.hidden_matrices + s["vocab_size"] * d + head + (2 * s["n_layer"] + 1) * d


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "configs" / "model").glob("*.yaml")))
def test_every_model_config_names_itself_and_lists_every_field(name):
    """So that `model.<field>=...` works without a `+` for every field of the family's config."""
    import dataclasses

    from models import FAMILIES

    s = spec(name)
    assert s["name"] == name
    fields = {f.name for f in dataclasses.fields(FAMILIES[s["family"]][0])}
    assert fields == set(s) - {"name", "family"}


def test_an_unknown_position_encoding_names_the_valid_ones():
    with pytest.raises(ModelConfigError, match=r"model.pos='alibi' is not one of \['learned', 'rope'\]"):
        build_model(spec("gpt2_tiny", pos="alibi"))


def test_n_embd_not_divisible_by_n_head_is_a_clear_error():
    with pytest.raises(ModelConfigError, match=r"model.n_embd=64 is not divisible by model.n_head=3 \(valid n_head for this width: \[1, 2, 4, 8"):
        build_model(spec("gpt2_tiny", n_head=3))


def test_unknown_model_field_names_the_valid_ones():
    with pytest.raises(ModelConfigError, match=r"unknown gpt2 model field\(s\) \['n_layers'\]; valid fields: .*'n_layer'"):
        build_model(spec("gpt2_tiny", n_layers=3))
