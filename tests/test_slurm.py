"""A real one-node SLURM cluster on localhost (munge + slurmctld + slurmd, Debian's slurm-wlm):
a two-optimizer multirun through hydra/launcher=slurm_1gpu, one job requeued mid-run with
`scontrol requeue`. Skipped where slurmctld is not installed (`make test-slow` installs it with apt
where it can)."""

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, run_cli
from trainer.metrics import read_metrics

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("slurmctld") is None or shutil.which("munged") is None,
                       reason="needs slurm-wlm and munge (apt-get install slurm-wlm munge)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="the test cluster's daemons run as root"),
]

RUN = ["trainer=cpu", "model=gpt2_tiny", "data.seq_len=64", "data.micro_batch=8", "data.batch_tokens=1024",
       "budget.tokens=40960", "eval.every_tokens=8192", "eval.tokens=2048", "checkpoint.every_tokens=1000000",
       "callbacks=none"]
LAUNCHER = ["hydra/launcher=slurm_1gpu", "hydra.launcher.gpus_per_node=null", "hydra.launcher.cpus_per_task=1",
            "hydra.launcher.mem_gb=2", "hydra.launcher.timeout_min=15"]


def slurm_conf(directory: Path) -> str:
    host = socket.gethostname()
    return "\n".join([
        "ClusterName=muonlab-test", f"SlurmctldHost={host}", "SlurmUser=root", "SlurmdUser=root", "AuthType=auth/munge",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "MpiDefault=none",
        "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core_Memory", "ReturnToService=2",
        "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
        f"StateSaveLocation={directory}/state", f"SlurmdSpoolDir={directory}/spool",
        f"SlurmctldPidFile={directory}/slurmctld.pid", f"SlurmdPidFile={directory}/slurmd.pid",
        f"SlurmctldLogFile={directory}/slurmctld.log", f"SlurmdLogFile={directory}/slurmd.log",
        "SlurmctldPort=6917", "SlurmdPort=6918", "KillWait=60",
        f"NodeName={host} CPUs={os.cpu_count()} RealMemory=8000 State=UNKNOWN",
        f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP", "",
    ])


def slurm(*args: str, timeout: float = 60) -> str:
    return subprocess.run(list(args), check=True, capture_output=True, text=True, timeout=timeout, cwd=ROOT).stdout


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Start munged (if not running), slurmctld and slurmd on a private config; stop them after."""
    directory = tmp_path_factory.mktemp("slurm")
    (directory / "state").mkdir()
    (directory / "spool").mkdir()
    conf = directory / "slurm.conf"
    conf.write_text(slurm_conf(directory))
    os.environ["SLURM_CONF"] = str(conf)  # the clients (sbatch, squeue, scontrol) and train.py's children read it
    if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode:
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        subprocess.run(["munged", "--force"], check=True, capture_output=True)
    subprocess.run(["slurmctld", "-f", str(conf)], check=True)
    subprocess.run(["slurmd", "-f", str(conf)], check=True)
    deadline = time.time() + 60
    while "idle" not in subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True).stdout:
        if time.time() > deadline:  # a wait limit, not a timing check
            pytest.fail("the test cluster never came up: " + (directory / "slurmctld.log").read_text()[-2000:])
        time.sleep(0.5)
    yield directory
    for daemon in ("slurmd.pid", "slurmctld.pid"):
        pid = directory / daemon
        if pid.is_file():
            subprocess.run(["kill", pid.read_text().strip()])
    os.environ.pop("SLURM_CONF", None)


def wait_for_rows(csv: Path, rows: int, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while not (csv.is_file() and len(csv.read_text().splitlines()) > rows):
        if time.time() > deadline:
            pytest.fail(f"{csv} never reached {rows} rows")
        time.sleep(0.2)


def test_a_requeued_job_resumes_and_ends_like_an_uninterrupted_run(tmp_path, cache_dir, cluster):
    started = time.time()
    sweep = tmp_path / "sweep"
    multirun = subprocess.Popen(
        [sys.executable, "train.py", "-m", *LAUNCHER, *RUN, "optim=muon,adamw", f"paths.cache_dir={cache_dir}",
         f"hydra.sweep.dir={sweep}"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    wait_for_rows(sweep / "0" / "metrics.csv", rows=10)
    job = next(line.split()[0] for line in slurm("squeue", "-h", "-o", "%i %K").splitlines() if line.split()[1] == "0")
    slurm("scontrol", "requeue", job)
    deadline = time.time() + 120
    while "PENDING" not in slurm("scontrol", "show", "job", job):  # SIGTERM -> checkpoint at the next step -> exit
        if time.time() > deadline:
            pytest.fail(f"job {job} was not requeued")
        time.sleep(0.5)
    slurm("scontrol", "update", f"jobid={job}", "StartTime=now")  # skip SLURM's requeue hold-off
    out, _ = multirun.communicate(timeout=900)
    assert multirun.returncode == 0, out[-4000:]

    log = next((sweep / ".submitit").glob("*_0/*_0_0_log.out")).read_text()
    assert "stopped by SIGTERM after step" in log, log[-3000:]
    stopped_at = int(log.split("stopped by SIGTERM after step ")[1].split()[0])
    assert 10 <= stopped_at < 40
    assert f"resuming {sweep / '0'} from step {stopped_at}" in log  # resumed, not restarted
    assert "Restarts=1" in slurm("scontrol", "show", "job", job)

    straight = run_cli("train.py", *RUN, "optim=muon", f"paths.cache_dir={cache_dir}", f"run_dir={tmp_path / 'straight'}")
    assert straight.returncode == 0, straight.stderr[-2000:]
    expected = read_metrics(tmp_path / "straight" / "metrics.csv")
    for job_dir, optim in (("0", "muon"), ("1", "adamw")):
        rows = read_metrics(sweep / job_dir / "metrics.csv")
        assert [r["step"] for r in rows] == list(range(1, 41)) and f"optim: {optim}" in (sweep / job_dir / ".hydra" / "hydra.yaml").read_text()
    requeued = read_metrics(sweep / "0" / "metrics.csv")
    for a, b in zip(requeued, expected, strict=True):
        assert abs(a["train_loss"] - b["train_loss"]) <= 1e-5 * b["train_loss"], a["step"]
    assert abs(requeued[-1]["val_loss"] - expected[-1]["val_loss"]) <= 1e-5 * expected[-1]["val_loss"]
    print(f"SLURM requeue test: {time.time() - started:.0f} s wall")


def test_a_task_layout_that_does_not_match_the_trainer_is_refused(tmp_path, cache_dir, cluster):
    """Two SLURM tasks for a one-device trainer: a clear error before any training."""
    result = run_cli("train.py", "-m", *LAUNCHER, "hydra.launcher.tasks_per_node=2", *RUN, "budget.tokens=1024",
                     f"paths.cache_dir={cache_dir}", f"hydra.sweep.dir={tmp_path / 'sweep'}", timeout=600)
    assert result.returncode != 0
    log = next((tmp_path / "sweep" / ".submitit").glob("*/*_0_log.err")).read_text()
    assert "SLURM started 2 task(s) on 1 node(s), but trainer.devices=1 x trainer.num_nodes=1 asks for 1" in log, log[-2000:]


def test_the_sbatch_template_runs_train_py_in_its_job_run_dir(tmp_path, cache_dir, cluster):
    run_dir = tmp_path / "run"
    submitted = slurm("sbatch", "--parsable", "--wait", "--ntasks-per-node=1", "--cpus-per-task=1", "--mem=2G",
                      "--gpus-per-node=0", f"--output={tmp_path / 'job.out'}", f"--export=ALL,MUONLAB_RUN_DIR={run_dir}",
                      "scripts/sbatch_train.sh", *RUN, "budget.tokens=4096", f"paths.cache_dir={cache_dir}", timeout=600)
    assert submitted.strip().isdigit()
    out = (tmp_path / "job.out").read_text()
    assert "final val loss" in out, out[-3000:]
    assert [r["step"] for r in read_metrics(run_dir / "metrics.csv")] == [1, 2, 3, 4]


def test_python_inside_an_sbatch_of_two_tasks_without_srun_stops_at_once(tmp_path, cache_dir, cluster):
    """sbatch --ntasks=2 running `python train.py` directly: one process, the batch script, which would wait for
    a second rank forever; it stops with what to do instead."""
    script = tmp_path / "job.sh"
    script.write_text(f"#!/bin/bash\ncd {ROOT}\n{sys.executable} train.py {' '.join(RUN)} trainer.strategy=ddp trainer.devices=2 "
                      f"paths.cache_dir={cache_dir} run_dir={tmp_path / 'run'}\n")
    out = tmp_path / "job.out"
    done = subprocess.run(["sbatch", "--wait", "--ntasks=2", "--cpus-per-task=1", "--mem=2G", f"--output={out}", str(script)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode != 0
    log = out.read_text()
    assert ("error: SLURM allocated 2 tasks but started 1 process(es) here: `python train.py` inside an sbatch script runs "
            "once") in log, log[-2000:]
    assert "Traceback" not in log and not (tmp_path / "run" / "metrics.csv").exists()
