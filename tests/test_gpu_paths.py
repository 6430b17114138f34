"""The code paths a GPU run takes, exercised on the CPU wherever torch allows, each against the same run
in fp32 under a stated tolerance: bf16 autocast (trainer.precision=bf16-mixed, CPU autocast), exact
MARS-M's two-pass step under bf16, FSDP2's MixedPrecisionPolicy on 2 gloo ranks, and compile=true with
QK-clip tracking. (bf16 matmuls are ~20-400x slower than fp32 on CPUs without AVX-512 BF16, so the runs
are short.)"""

import pytest

from conftest import TINY, run_cli
from trainer.metrics import read_metrics
from trainer.run import run

# bf16 keeps 8 significant bits (a relative rounding of up to 2^-9 per operation); over 4 steps the losses of a
# bf16-mixed run stay within ~3e-4 of the fp32 run's here, so 2e-3 is a tolerance, not a coin flip
BF16_RTOL = 2e-3
SHORT = ["budget.tokens=512", "eval.every_tokens=512", "eval.tokens=256"]  # 4 steps of 128 tokens (2 x 2 x 32)


def largest_relative_difference(a: list[dict], b: list[dict], key: str) -> float:
    pairs = [(x[key], y[key]) for x, y in zip(a, b, strict=True) if key in x]
    assert pairs, key
    return max(abs(x - y) / abs(y) for x, y in pairs)


def compare_to_fp32(make_cfg, tmp_path, *overrides) -> dict[str, float]:
    run(make_cfg(*SHORT, *overrides, run_dir=tmp_path / "fp32"))
    run(make_cfg(*SHORT, *overrides, "trainer.precision=bf16-mixed", run_dir=tmp_path / "bf16"))
    fp32, bf16 = read_metrics(tmp_path / "fp32" / "metrics.csv"), read_metrics(tmp_path / "bf16" / "metrics.csv")
    return {key: largest_relative_difference(bf16, fp32, key) for key in ("train_loss", "val_loss")}


@pytest.mark.slow
@pytest.mark.parametrize("optim", ["muon", "mars_m_exact"])
def test_bf16_mixed_precision_stays_within_bf16_rounding_of_fp32(make_cfg, tmp_path, optim):
    """CPU autocast runs the forward's matmuls in bf16 (the losses differ from fp32's, so it is on) and the
    weights, gradients and optimizer in fp32; exact MARS-M takes its look-ahead gradient under autocast too."""
    differences = compare_to_fp32(make_cfg, tmp_path, f"optim={optim}", "optim.matrix.orthogonalizer.dtype=float32")
    print(f"bf16-mixed vs fp32, {optim}: {differences}")
    assert 0 < differences["train_loss"] <= BF16_RTOL and differences["val_loss"] <= BF16_RTOL


@pytest.mark.slow
def test_fsdp_mixed_precision_on_two_ranks_stays_within_bf16_rounding_of_fp32(make_cfg, tmp_path, cache_dir):
    """FSDP2 with trainer.precision=bf16-mixed: bf16 all-gathered weights under autocast, fp32 gradient
    reduction and sharded fp32 master weights (trainer/parallel.py), against one fp32 device."""
    run(make_cfg(*SHORT, "optim.matrix.orthogonalizer.dtype=float32", run_dir=tmp_path / "fp32"))
    fsdp = run_cli("train.py", *TINY, *SHORT, "optim.matrix.orthogonalizer.dtype=float32", "trainer=fsdp",
                   "trainer.accelerator=cpu", "trainer.devices=2", "data.micro_batch=1", "trainer.precision=bf16-mixed",
                   f"paths.cache_dir={cache_dir}", f"run_dir={tmp_path / 'fsdp'}", timeout=600)
    assert fsdp.returncode == 0, fsdp.stdout[-2000:] + fsdp.stderr[-3000:]
    fp32, bf16 = read_metrics(tmp_path / "fp32" / "metrics.csv"), read_metrics(tmp_path / "fsdp" / "metrics.csv")
    for key in ("train_loss", "val_loss"):
        difference = largest_relative_difference(bf16, fp32, key)
        print(f"fsdp bf16-mixed (2 ranks) vs fp32 (one device), {key}: {difference:.1e}")
        assert difference <= BF16_RTOL, key
    assert largest_relative_difference(bf16, fp32, "train_loss") > 0


@pytest.mark.slow
def test_compile_with_qk_clip_tracking_equals_the_eager_run(make_cfg, tmp_path):
    """compile=true (inductor's C++ on CPU) with MuonClip, whose attention modules record their largest logits
    inside the compiled forward: the losses and the logged logit maxima of the eager run, to fp32 rounding."""
    overrides = [*SHORT, "optim=muon_clip", "optim.matrix.orthogonalizer.dtype=float32"]
    run(make_cfg(*overrides, run_dir=tmp_path / "eager"))
    run(make_cfg(*overrides, "compile=true", run_dir=tmp_path / "compiled"))
    eager, compiled = read_metrics(tmp_path / "eager" / "metrics.csv"), read_metrics(tmp_path / "compiled" / "metrics.csv")
    # inductor fuses and reorders fp32 arithmetic: losses ~1e-7 apart; the logit maxima (~0.1, each the largest of a
    # sum of products) up to ~3e-5
    for key, tolerance in (("train_loss", 1e-5), ("val_loss", 1e-5), ("qk_max_logit", 1e-3), ("qk_logit/l1h0", 1e-3)):
        difference = largest_relative_difference(compiled, eager, key)
        print(f"compiled vs eager, {key}: {difference:.1e}")
        assert difference <= tolerance, key
