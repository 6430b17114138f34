"""DDP and FSDP2 on CPU (gloo, 2 processes) against one device, through the command line; stopping
on a signal at a step boundary and resuming on another strategy and world size."""

import json
import math
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, run_cli, start_and_signal
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


def train(run_dir, *overrides, cache_dir, env: dict | None = None) -> list[dict]:
    ns = [] if "optim=dion" in overrides else [FP32_NS]
    result = run_cli("train.py", *PARITY, *CPU, *ns, f"paths.cache_dir={cache_dir}", f"run_dir={run_dir}", *overrides,
                     env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return read_metrics(run_dir / "metrics.csv")


# the collective-counting callback (tests/collectives.py), loaded by the training processes
COUNT = ["+callbacks.count._target_=collectives.CountCollectives"]
COUNTING = {"PYTHONPATH": str(ROOT / "tests")}
TEN_STEPS = ["budget.tokens=10240", "eval.every_tokens=10240"]


def per_step_counts(run_dir, ranks: int) -> list[list[dict]]:
    return [json.loads((run_dir / f"collectives.{rank}.json").read_text()) for rank in range(ranks)]


@pytest.mark.parametrize("optim, gradients", [("muon", 1), ("mars_m_exact", 2)])
def test_gradients_are_reduced_once_per_step_under_accumulation_and_equal_one_device(tmp_path, cache_dir, optim, gradients):
    """2 micro-batches per rank per step: FSDP2 reduce-scatters each block's and the root's gradients once per
    accumulated gradient (gpt2_tiny: 2 blocks + root = 3; exact MARS-M's look-ahead gradient is a second one), not
    once per micro-batch, and DDP (whose two-pass step accumulates under no_sync) and FSDP equal one device."""
    accumulated = [f"optim={optim}", "data.micro_batch=4", *TEN_STEPS, *COUNT]  # 16 sequences a step = 2 ranks x 2 x 4
    runs = {name: train(tmp_path / name, *accumulated, *STRATEGIES[name], cache_dir=cache_dir, env=COUNTING)
            for name in ("single", "ddp", "fsdp")}
    for key in ("train_loss", "val_loss", "grad_norm"):
        assert max_relative_difference(runs["ddp"], runs["single"], key) <= 1e-5, key
        assert max_relative_difference(runs["fsdp"], runs["ddp"], key) <= 1e-5, key
    for steps in per_step_counts(tmp_path / "fsdp", ranks=2):
        assert [s["step"] for s in steps] == list(range(1, 11))
        assert all(reduce_scatters(s) == 3 * gradients for s in steps), steps  # was twice that: once per micro-batch
        # and the step's own: one all-reduce per gradient norm (+ exact MARS-M's clip), the owners' two all-to-alls
        assert all(s.get("all_reduce", 0) == (1 if optim == "muon" else 3) and s.get("all_to_all", 0) == 2 for s in steps), steps


def reduce_scatters(counts: dict) -> int:
    return counts.get("reduce_scatter", 0)


def test_hsdp_over_two_nodes_shards_within_a_node_and_equals_one_device(tmp_path, cache_dir):
    """trainer.fsdp_replicate=nodes on 2 "nodes" of 2 CPU processes each (two train.py launched by hand, as a
    cluster's launcher would: NODE_RANK, MASTER_ADDR/PORT): the one-device run to 1e-5, each rank reduce-scatters
    each unit's gradients once per step within its node and all-reduces them once across nodes."""
    args = [*PARITY, *CPU, FP32_NS, *TEN_STEPS, f"paths.cache_dir={cache_dir}"]
    single = run_cli("train.py", *args, f"run_dir={tmp_path / 'single'}")
    assert single.returncode == 0, single.stderr[-2000:]
    run_dir, port = tmp_path / "hsdp", free_port()
    hsdp = [*args, "data.micro_batch=2", "trainer=fsdp", *CPU, "trainer.devices=2", "trainer.num_nodes=2",
            "trainer.fsdp_replicate=nodes", f"run_dir={run_dir}", *COUNT]
    env = {**os.environ, **COUNTING, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PYTHONUNBUFFERED": "1"}
    nodes = [subprocess.Popen([sys.executable, "train.py", *hsdp], cwd=ROOT, env={**env, "NODE_RANK": str(node)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for node in (1, 0)]
    outs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outs[1][-3000:] + outs[0][-3000:]
    rows, expected = read_metrics(run_dir / "metrics.csv"), read_metrics(tmp_path / "single" / "metrics.csv")
    for key in ("train_loss", "val_loss", "grad_norm"):
        assert max_relative_difference(rows, expected, key) <= 1e-5, key
    for steps in per_step_counts(run_dir, ranks=4):
        assert [s["step"] for s in steps] == list(range(1, 11))
        assert all(reduce_scatters(s) == 3 and s["all_reduce"] >= 3 for s in steps), steps  # + the gradient norm's


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def max_relative_difference(a: list[dict], b: list[dict], key: str) -> float:
    pairs = [(x[key], y[key]) for x, y in zip(a, b, strict=True) if key in x or key in y]
    return max(abs(x - y) / abs(y) for x, y in pairs)


# the training loop's distributed paths, end to end (~150 s each on 2 cores), beyond the accumulation test's (Muon, exact
# MARS-M's two-pass step, each against one device): Dion's owner power iteration and MuonClip's QK-clip on shards.
# Every optimizer's sharded step against one process's: tests/test_step_collectives.py (fast, all 14)
@pytest.mark.parametrize("optim", ["dion", "muon_clip"])
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
    if optim == "dion":  # DDP ranks keep M and Q on each matrix's owner; the checkpoint has every matrix's, from its owner
        ddp, single = (matrix_states(tmp_path / name) for name in ("ddp", "single"))
        assert ddp.keys() == single.keys() and len(single) == 8  # gpt2_tiny: 2 blocks x 4 matrices
        for j in single:
            for key in ("dion/momentum", "dion/q"):
                assert (ddp[j][key] - single[j][key]).norm() <= 1e-3 * single[j][key].norm(), (j, key)  # stale: ~1


def matrix_states(run_dir) -> dict:
    """The checkpoint's optimizer state of the matrices Dion updates, by parameter position."""
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["optimizer_states"][0]["state"]
    return {j: s for j, s in state.items() if "dion/momentum" in s}


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
