"""MuonClip's QK-clip (optim/qk_clip.py) on the two model families: the logged maxima are the true
largest causal logits per head, a clipped head's largest logit is τ afterwards, the others are
untouched, and evaluation forwards are not counted."""

import pytest
import torch
from omegaconf import OmegaConf

from models import build_model
from models.attention import max_causal_logits
from optim import QKClip
from optim.qk_clip import clip_factors
from configs import compose


def tiny(family: str, **overrides):
    torch.manual_seed(0)
    spec = OmegaConf.to_container(compose([f"model={family}_tiny"]).model)
    return build_model({**spec, **overrides})


def largest_logits(model, idx) -> torch.Tensor:
    """(layers, heads) of one training forward, measured by the model's own tracking."""
    clip = QKClip(model, threshold=1e30)  # tracks, never clips
    model.train()
    model(idx)
    return torch.stack([layer.pop_max_logits() for layer in clip.layers])


def test_max_causal_logits_is_the_largest_unmasked_score():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(3, 2, 5, 4, generator=g), torch.randn(3, 2, 5, 4, generator=g)
    expected = torch.full((2,), float("-inf"))
    for b in range(3):
        for h in range(2):
            for i in range(5):
                for j in range(i + 1):
                    expected[h] = max(expected[h], (q[b, h, i] @ k[b, h, j]).item() * 0.5)
    assert torch.allclose(max_causal_logits(q, k), expected, atol=1e-6)
    assert torch.allclose(max_causal_logits(q, k, scale=0.25), expected / 2, atol=1e-6)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_clipped_heads_end_at_the_threshold_and_the_others_are_untouched(family):
    model = tiny(family)
    with torch.no_grad():  # large q/k weights so that the logits are worth clipping
        for layer in QKClip(model).layers:
            for param, heads in layer.qk_row_heads():
                param.mul_(torch.where(heads >= 0, 6.0, 1.0).view(-1, *([1] * (param.ndim - 1))))
    idx = torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(2))
    before = largest_logits(model, idx)
    tau = before[0].mean().item()  # between the first layer's two heads: one clips, one does not
    clip = QKClip(model, threshold=tau)
    model(idx)
    logged = clip()
    assert logged["qk_max_logit"] == pytest.approx(before.max().item(), rel=1e-6)
    assert logged["qk_logit/l1h0"] == pytest.approx(before[1, 0].item(), rel=1e-6)
    # the first layer sees the same input again (later layers see its changed output)
    after = largest_logits(model, idx)[0]
    clipped = before[0] > tau
    assert clipped.sum() == 1
    assert after[clipped].item() == pytest.approx(tau, rel=1e-5)
    assert after[~clipped].item() == pytest.approx(before[0][~clipped].item(), rel=1e-6)


def test_only_heads_over_the_threshold_are_scaled_even_when_all_their_logits_are_negative():
    assert clip_factors(torch.tensor([-3.0, 0.0, 50.0, 100.0, 200.0]), 100.0).tolist() == [1.0, 1.0, 1.0, 1.0, 0.5]


def test_evaluation_forwards_are_not_counted():
    model = tiny("gpt2")
    clip = QKClip(model, threshold=1.0)
    model.eval()
    model(torch.zeros(1, 8, dtype=torch.long))
    assert clip() == {}


def test_a_model_without_tracked_attention_is_refused():
    with pytest.raises(ValueError, match="has no attention module that reports its logits"):
        QKClip(torch.nn.Linear(2, 2))


def test_a_muon_clip_run_logs_every_heads_largest_logit_and_holds_them_near_the_threshold(make_cfg, tmp_path):
    from trainer.metrics import read_metrics
    from trainer.run import run

    tokens = "budget.tokens=768"
    run(make_cfg("optim=muon_clip", "optim.qk_clip_threshold=1e-4", tokens, run_dir=tmp_path / "clip"))
    run(make_cfg("optim=muon", tokens, run_dir=tmp_path / "muon"))
    clipped, plain = read_metrics(tmp_path / "clip" / "metrics.csv"), read_metrics(tmp_path / "muon" / "metrics.csv")
    heads = [f"qk_logit/l{layer}h{head}" for layer in range(2) for head in range(2)]  # gpt2_tiny: 2 layers x 2 heads
    for row in clipped:
        assert row["qk_max_logit"] == pytest.approx(max(row[h] for h in heads), rel=1e-6) and row["qk_max_logit"] > 1e-4
    assert "qk_max_logit" not in plain[0]
    assert clipped[0]["train_loss"] == plain[0]["train_loss"]  # the clip acts after the first step...
    assert clipped[0]["qk_max_logit"] > 100 * 1e-4  # ...on logits far over τ,
    assert all(row["qk_max_logit"] < 5 * 1e-4 for row in clipped[1:])  # and keeps the next steps' near it


def test_qk_clip_matches_its_equations_in_float64():
    """GPT-2's first layer: S_max^h by brute force from the layer's input, then W_q^h, W_k^h and their
    biases scaled by sqrt(τ / S_max^h) where S_max^h > τ, v untouched; to 1e-12."""
    model = tiny("gpt2", bias=True).double()
    attn = model.blocks[0].attn
    with torch.no_grad():
        attn.qkv.weight.mul_(8.0)
        attn.qkv.bias.normal_(0.0, 0.5)
    seen = {}
    attn.register_forward_hook(lambda module, args, out: seen.setdefault("x", args[0].detach().clone()))
    clip = QKClip(model, threshold=1.0)
    idx = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(5))
    model.train()
    model(idx)
    W, b = attn.qkv.weight.detach().clone(), attn.qkv.bias.detach().clone()
    C, H = W.shape[1], attn.n_head
    d = C // H
    qkv = seen["x"] @ W.T + b
    S = torch.full((H,), float("-inf"), dtype=torch.float64)
    for h in range(H):
        q, k = qkv[..., h * d:(h + 1) * d], qkv[..., C + h * d:C + (h + 1) * d]
        for n in range(idx.shape[0]):
            for i in range(idx.shape[1]):
                for j in range(i + 1):
                    S[h] = max(S[h], (q[n, i] @ k[n, j]).item() / d**0.5)
    clip()
    expected_W, expected_b = W.clone(), b.clone()
    for h in range(H):
        if S[h] > 1.0:
            factor = (1.0 / S[h]).sqrt()
            for rows in (slice(h * d, (h + 1) * d), slice(C + h * d, C + (h + 1) * d)):
                expected_W[rows] *= factor
                expected_b[rows] *= factor
    assert (S > 1.0).any()
    assert torch.allclose(attn.qkv.weight, expected_W, rtol=1e-12, atol=0) and torch.allclose(attn.qkv.bias, expected_b, rtol=1e-12, atol=0)


def test_max_causal_logits_in_blocks_of_query_rows_equals_the_whole_score_matrix():
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 3, 37, 8, generator=g), torch.randn(2, 3, 37, 8, generator=g)
    whole = max_causal_logits(q, k, block_elements=10**9)
    for block_elements in (1, 2 * 3 * 37 * 5, 2 * 3 * 37 * 36):  # one row, 5 rows, 36 rows per block
        assert torch.equal(max_causal_logits(q, k, block_elements=block_elements), whole)


def test_max_causal_logits_are_fp32_under_bf16_autocast():
    """bf16 activations under autocast (trainer.precision=bf16-mixed): the scores are not cast back to bf16."""
    g = torch.Generator().manual_seed(4)
    q, k = (torch.randn(1, 2, 16, 8, generator=g) * 3).bfloat16(), (torch.randn(1, 2, 16, 8, generator=g) * 3).bfloat16()
    exact = max_causal_logits(q.double(), k.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        seen = max_causal_logits(q, k)
    assert seen.dtype == torch.float32
    assert torch.allclose(seen.double(), exact, rtol=1e-6)  # a bf16 result would be off by up to 2^-8 relative


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_compiled_blocks_track_logits_without_a_graph_break_even_under_activation_checkpointing(family):
    """compile=true compiles each block (models/blocks.py); QK-clip's tracking writes an attribute inside the
    block's forward, which runs again in the checkpointed backward: dynamo must capture it whole (a graph break
    per block per forward would split every compiled block in two). Dynamo alone (backend "eager") suffices to count."""
    from torch._dynamo.utils import counters

    from models.blocks import compile_blocks

    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    eager = largest_logits(tiny(family), idx)
    model = tiny(family)
    clip = QKClip(model, threshold=1e30)
    model.activation_checkpointing = True
    compile_blocks(model, backend="eager")
    torch._dynamo.reset()
    counters.clear()
    model.train()
    model(idx, idx).backward()
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] >= 1  # it was compiled
    assert torch.allclose(clip.take_maxima(), eager, rtol=1e-5)
