"""A trained tiny run through the tools a researcher uses after training: scripts/export_hf.py (the model
and the GPT-2 tokenizer as transformers reads them), scripts/evaluate.py (the run's own validation
numbers, and another evaluation set) and scripts/sample.py (greedy and sampled continuations)."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from conftest import load_script, run_cli
from data.tokenizer import gpt2_tokenizer
from models.hf_export import load_model
from trainer.metrics import read_metrics

TEXT = "ROMEO: But soft, what light through yonder window breaks?\n\tIt is the east, and Juliet is the sun! é"


@pytest.fixture
def run(trained_run):
    return trained_run


def test_the_export_loads_in_transformers_with_the_same_logits_and_tokenizer(run, tmp_path):
    result = run_cli("scripts/export_hf.py", str(run), str(tmp_path / "hf"))
    assert result.returncode == 0, result.stderr
    assert "GPT2LMHeadModel (gpt2, " in result.stdout and "vocab.json" in result.stdout
    _, ours = load_model(run)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf", local_files_only=True)
    ids = tokenizer(TEXT).input_ids
    assert ids == gpt2_tokenizer().encode_ordinary(TEXT)  # vocab.json + merges.txt rebuilt from the tiktoken ranks
    with torch.no_grad():
        x = torch.tensor([ids])
        reference = ours.eval()(x)
        assert (theirs(x).logits - reference).abs().max() <= 1e-5 * reference.abs().max()


def test_evaluate_reproduces_the_runs_final_validation_and_scores_other_settings(run):
    final = read_metrics(run / "metrics.csv")[-1]
    result = run_cli("scripts/evaluate.py", str(run))
    assert result.returncode == 0, result.stderr
    written = json.loads((run / "eval" / "shakespeare.json").read_text())
    for key in ("val_loss", "val_ppl", "val_bpb"):
        assert written[key] == pytest.approx(final[key], rel=1e-5), key
    assert written["tokens"] == 32 * (1023 // 32) and written["tokenizer"] == "gpt2"  # eval.tokens=1024: 31 windows of 33
    longer = run_cli("scripts/evaluate.py", str(run), "eval.tokens=4096", "data.seq_len=64")
    assert longer.returncode == 0, longer.stderr
    assert json.loads((run / "eval" / "shakespeare.json").read_text())["tokens"] == 64 * (4095 // 64)


def test_evaluate_mistakes_are_one_line(run, tmp_path):
    missing = run_cli("scripts/evaluate.py", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "evaluate: error: " in missing.stderr and "Traceback" not in missing.stderr
    bad = run_cli("scripts/evaluate.py", str(run), "eval.tokens")
    assert bad.returncode == 2 and "override 'eval.tokens' is not key=value" in bad.stderr


def test_greedy_sampling_follows_the_argmax_and_top_k_1_is_greedy(run):
    sample = load_script("sample")
    config, model = load_model(run)
    prompt = gpt2_tokenizer().encode_ordinary("ROMEO:")
    greedy = sample.generate(model, prompt, 8, context=128)
    ids = list(prompt)
    for _ in range(8):  # by hand
        with torch.no_grad():
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert greedy == ids[len(prompt):]
    assert sample.generate(model, prompt, 8, 128, temperature=1.0, top_k=1, generator=torch.Generator().manual_seed(3)) == greedy
    draws = [sample.generate(model, prompt, 8, 128, temperature=1.0, generator=torch.Generator().manual_seed(s)) for s in (0, 0, 1)]
    assert draws[0] == draws[1] != draws[2]
    result = run_cli("scripts/sample.py", str(run), "--prompt", "ROMEO:", "--tokens", "8")
    assert result.returncode == 0 and result.stdout == "ROMEO:" + gpt2_tokenizer().decode(greedy) + "\n"
