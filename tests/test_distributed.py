"""DDP and FSDP2 on CPU (gloo, 2 processes) against one device, through the command line; stopping
on a signal at a step boundary and resuming on another strategy and world size."""

import math
import signal

import pytest

from conftest import run_cli, start_and_signal
from trainer.metrics import read_metrics

pytestmark = pytest.mark.slow

# 20 steps of 1,024 tokens: on one device 2 accumulated micro-batches of 8, on 2 ranks one each.
PARITY = ["model=gpt2_tiny", "data.seq_len=64", "data.micro_batch=8", "data.batch_tokens=1024", "budget.tokens=20480",
          "eval.every_tokens=5120", "eval.tokens=2048", "checkpoint.every_tokens=1000000", "callbacks=none"]
STRATEGIES = {"single": ["trainer.strategy=auto", "trainer.devices=1"],
              "ddp": ["trainer.strategy=ddp", "trainer.devices=2"],
              "fsdp": ["trainer.strategy=fsdp", "trainer.devices=2"]}
# fp32 Newton–Schulz wherever it runs (orthogonalizer.dtype=auto picks bf16 on CPUs with fast bf16 matmuls, whose rounding
# would depend on how the matrices are batched, not on the strategy)
CPU = ["trainer.accelerator=cpu", "trainer.precision=32-true"]
FP32_NS = "optim.matrix.orthogonalizer.dtype=float32"  # (Dion has no Newton–Schulz)


def train(run_dir, *overrides, cache_dir) -> list[dict]:
    ns = [] if "optim=dion" in overrides else [FP32_NS]
    result = run_cli("train.py", *PARITY, *CPU, *ns, f"paths.cache_dir={cache_dir}", f"run_dir={run_dir}", *overrides, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return read_metrics(run_dir / "metrics.csv")


def max_relative_difference(a: list[dict], b: list[dict], key: str) -> float:
    pairs = [(x[key], y[key]) for x, y in zip(a, b, strict=True) if key in x or key in y]
    return max(abs(x - y) / abs(y) for x, y in pairs)


@pytest.mark.parametrize("optim", ["muon", "mars_m", "mars_m_exact", "muon_nsr", "muon_vs", "muon2", "muon2_f", "pre_polar",
                                   "post_polar", "polar_only", "normuon", "adamuon", "muon_clip", "dion", "muon_cautious",
                                   "muon_split_heads"])
def test_ddp_equals_one_device_and_fsdp_equals_ddp(tmp_path, cache_dir, optim):
    # Dion at rank 1/4: at full rank its trailing power-iteration directions are those of M's near-zero singular
    # values, fixed by rounding (as an exact polar factor's would be), so any two reduction orders part at ~1e-4
    extra = ["optim.matrix.rank_fraction=0.25"] if optim == "dion" else []
    runs = {name: train(tmp_path / name, f"optim={optim}", *extra, *overrides, cache_dir=cache_dir)
            for name, overrides in STRATEGIES.items()}
    assert [r["step"] for r in runs["fsdp"]] == list(range(1, 21))
    for key in ("train_loss", "val_loss", "grad_norm"):
        ddp, fsdp = max_relative_difference(runs["ddp"], runs["single"], key), max_relative_difference(runs["fsdp"], runs["ddp"], key)
        print(f"parity {optim} {key}: ddp vs one device {ddp:.1e}, fsdp vs ddp {fsdp:.1e}")
        assert ddp <= 1e-5 and fsdp <= 1e-5, key
    assert runs["single"][-1]["train_loss"] < runs["single"][0]["train_loss"] - 2  # and it trained


@pytest.fixture(scope="module")
def straight(tmp_path_factory, cache_dir) -> list[dict]:
    """Muon on one device, never interrupted."""
    return train(tmp_path_factory.mktemp("straight"), cache_dir=cache_dir)


@pytest.mark.parametrize("first, then", [("ddp", "single"), ("single", "fsdp"), ("fsdp", "ddp")])
def test_a_signal_stops_at_a_step_boundary_and_the_run_resumes_under_another_strategy(tmp_path, cache_dir, straight,
                                                                                         first, then):
    run_dir = tmp_path / "run"
    args = [*PARITY, *CPU, FP32_NS, f"paths.cache_dir={cache_dir}", f"run_dir={run_dir}"]
    # to rank 0 only; stopping after an odd step checks that Lightning's micro-batch count is re-aligned when one
    # device takes 2 micro-batches per step where 2 ranks took 1
    code, out = start_and_signal([*args, *STRATEGIES[first]], run_dir, rows=6, sig=signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, out[-3000:]
    stopped = read_metrics(run_dir / "metrics.csv")
    assert 6 <= len(stopped) < 20
    assert f"stopped by SIGTERM after step {len(stopped)} ({len(stopped) * 1024:,} tokens); checkpoint written" in out

    resumed = run_cli("train.py", *args, *STRATEGIES[then], timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert f"resuming {run_dir} from step {len(stopped)}" in resumed.stdout
    rows = read_metrics(run_dir / "metrics.csv")
    assert [r["step"] for r in rows] == list(range(1, 21))
    assert max_relative_difference(rows, straight, "train_loss") <= 1e-5
    assert math.isclose(rows[-1]["val_loss"], straight[-1]["val_loss"], rel_tol=1e-5)
