"""End-to-end runs through the command line (`make test-slow`; CI runs them too)."""


import pytest

from conftest import ROOT, TINY, run_cli, start_and_signal
from trainer.metrics import read_metrics

pytestmark = pytest.mark.slow


def test_default_run(tmp_path):
    """`python train.py` as the README's first command runs it: Muon, gpt2_mini, Shakespeare."""
    result = run_cli("train.py", f"run_dir={tmp_path / 'run'}", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_metrics(tmp_path / "run" / "metrics.csv")
    assert len(rows) == 292 and rows[-1]["tokens"] == 299_008
    # the README's default-run numbers: 4.6135 with fp32 Newton–Schulz, 4.6259 with bf16 (orthogonalizer.dtype=auto's choice on
    # CPUs with fast bf16 matmuls; AdamW: 5.435); rounding differs between CPUs, so a neighbourhood, not the digits
    assert rows[-1]["val_loss"] == pytest.approx(4.62, abs=0.03)
    assert f"run dir: {tmp_path / 'run'}" in result.stdout and "final val loss" in result.stdout
    assert (tmp_path / "run" / ".hydra" / "config.yaml").is_file()
    assert "optim: muon" in (tmp_path / "run" / ".hydra" / "hydra.yaml").read_text()


def test_killed_run_resumes_with_the_same_metrics(tmp_path, cache_dir):
    """SIGKILL mid-run, rerun the same command: the same rows as an unbroken run."""
    args = [*TINY, "budget.tokens=6400", "checkpoint.every_tokens=1280", "eval.every_tokens=1280",
            f"paths.cache_dir={cache_dir}"]
    straight = run_cli("train.py", *args, f"run_dir={tmp_path / 'straight'}")
    assert straight.returncode == 0, straight.stderr[-2000:]

    run_dir = tmp_path / "killed"
    start_and_signal([*args, f"run_dir={run_dir}"], run_dir, rows=27)  # past the checkpoint at step 20
    assert 27 <= len(read_metrics(run_dir / "metrics.csv")) < 50
    resumed = run_cli("train.py", *args, f"run_dir={run_dir}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming" in resumed.stdout
    a, b = read_metrics(tmp_path / "straight" / "metrics.csv"), read_metrics(run_dir / "metrics.csv")
    assert [r["step"] for r in b] == list(range(1, 51))
    for ra, rb in zip(a, b):
        for key in ("train_loss", "val_loss", "lr_matrix", "grad_norm"):
            assert abs(ra.get(key, 0.0) - rb.get(key, 0.0)) <= 1e-6, (ra["step"], key)


def test_wandb_offline_and_tensorboard_mirrors_continue_after_resume(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    args = [*TINY, "logger=[wandb,tensorboard]", "budget.tokens=3840", f"paths.cache_dir={cache_dir}", f"run_dir={run_dir}"]
    offline = {"WANDB_MODE": "offline"}
    start_and_signal(args, run_dir, rows=12, env=offline)
    run_id = (run_dir / "wandb_id.txt").read_text().strip()
    resumed = run_cli("train.py", *args, env=offline)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (run_dir / "wandb_id.txt").read_text().strip() == run_id
    sessions = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(sessions) == 2 and all(s.name.endswith(run_id) for s in sessions)  # one wandb run, two sessions
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 2
    assert not (ROOT / "wandb").exists()  # nothing written outside the run dir


def test_multirun_sweep_gives_one_run_dir_per_job(tmp_path, cache_dir):
    result = run_cli("train.py", "-m", *TINY, "budget.tokens=640", "optim=adamw,muon", f"paths.cache_dir={cache_dir}",
                     f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert result.returncode == 0, result.stderr[-2000:]
    for job, optim in (("0", "adamw"), ("1", "muon")):
        assert len(read_metrics(tmp_path / "sweep" / job / "metrics.csv")) == 5
        assert f"optim: {optim}" in (tmp_path / "sweep" / job / ".hydra" / "hydra.yaml").read_text()


def test_a_multirun_of_lightning_launched_ranks_runs_each_job_once(tmp_path, cache_dir):
    """`python train.py -m trainer=ddp trainer.devices=2 seed=1,2` without SLURM: Lightning starts each job's second
    rank, and that rank runs its job, in its job's dir (before: it ran the whole sweep again, in a sweep dir of its own)."""
    ddp = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.precision=32-true", "trainer.devices=2"]
    result = run_cli("train.py", "-m", *TINY, *ddp, "data.seq_len=64", "data.micro_batch=8", "data.batch_tokens=1024",
                     "budget.tokens=2048", "seed=1,2", f"paths.cache_dir={cache_dir}", f"paths.log_dir={tmp_path}", timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert (result.stdout + result.stderr).count("Launching 2 jobs locally") == 1
    sweeps = list((tmp_path / "multiruns").glob("*/*"))
    assert len(sweeps) == 1, sweeps
    losses = []
    for job in ("0", "1"):
        assert [r["step"] for r in read_metrics(sweeps[0] / job / "metrics.csv")] == [1, 2]
        assert (sweeps[0] / job / "train_ddp_process_1.log").is_file()  # the job's own rank 1 logged here
        losses.append(read_metrics(sweeps[0] / job / "metrics.csv")[-1]["val_loss"])
    assert losses[0] != losses[1]  # two seeds
