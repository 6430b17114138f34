"""Evaluation sized in tokens, and its cross-entropy computed over chunks of the logits."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT
from models.loss import chunked_cross_entropy
from trainer.plan import eval_sequences


def test_chunked_cross_entropy_equals_the_whole_batch_loss():
    torch.manual_seed(0)
    hidden, targets = torch.randn(3, 50, 16, dtype=torch.float64), torch.randint(0, 1000, (3, 50))
    head = torch.nn.Linear(16, 1000, bias=False).double()
    whole = F.cross_entropy(head(hidden).flatten(0, 1), targets.flatten())
    for chunk_elements in (1000, 7 * 1000 + 3, 10**9):  # one position per chunk, 7 per chunk, one chunk
        assert chunked_cross_entropy(hidden, head, targets, chunk_elements).item() == pytest.approx(whole.item(), rel=1e-12)
    hidden.requires_grad_(True)
    chunked_cross_entropy(hidden, head, targets, 7000).backward()
    grad = hidden.grad.clone()
    hidden.grad = None
    F.cross_entropy(head(hidden).flatten(0, 1), targets.flatten()).backward()
    assert torch.allclose(grad, hidden.grad, rtol=1e-10, atol=1e-14)


# 4 sequences of 4096 tokens at GPT-2's padded vocabulary: 824M logits, 3.3 GB in fp32 (and as much
# again for the log-softmax) if they were made at once; in chunks at most 2^26 (256 MB) exist at once.
PEAK = """
import resource, torch
from models import build_model
torch.manual_seed(0)
model = build_model({"family": "gpt2", "n_layer": 1, "n_head": 1, "n_embd": 32, "vocab_size": 50304, "block_size": 4096}).eval()
windows = torch.randint(0, 50304, (4, 4097))
resident = lambda: int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
with torch.no_grad():
    model(windows[:1, :64], windows[:1, 1:65])  # warm-up
    before = resident()
    loss = model(windows[:, :-1], windows[:, 1:])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(loss.item(), (peak - before) / 2**20)
"""
BOUND_MB = 1024  # measured ~520 MB on the 2-core CPU machines: two 256 MB chunks (logits, log-softmax) and change


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_evaluation_at_long_sequence_and_large_vocabulary_stays_under_a_memory_bound():
    done = subprocess.run([sys.executable, "-c", PEAK], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    loss, peak_mb = map(float, done.stdout.split())
    print(f"evaluation of 4 x 4096 tokens at vocab 50304: {peak_mb:.0f} MB above the resident set before it")
    assert 10.0 < loss < 11.5  # ln 50304 = 10.83 at initialisation
    assert peak_mb < BOUND_MB  # the whole fp32 logits alone would be 3,144 MB


def test_evaluation_forwards_are_sized_in_tokens(make_cfg):
    from configs import compose

    # vam_llama_1.2b_c4: sequences of 4096, 4 per training forward: 4 per evaluation forward (it was 32)
    assert eval_sequences(compose(["experiment=vam_llama_1.2b_c4", "optim=muon"])) == 4
    assert eval_sequences(make_cfg()) == 2  # data.micro_batch=2
    assert eval_sequences(make_cfg("eval.batch_tokens=320")) == 10  # 320 tokens of 32-token sequences
    assert eval_sequences(make_cfg("eval.batch_tokens=8")) == 1  # at least one sequence
