"""Stopping cleanly when the scheduler (or a user) asks: SIGTERM, SIGUSR1 or SIGUSR2.

SLURM sends SIGTERM before it kills a job (scancel, `scontrol requeue`, preemption) and, with
`--signal=USR2@120` (the submitit presets), USR2 two minutes before the time limit. The signal
handler only records the signal; nothing is written inside it. At the next optimizer-step boundary
all ranks agree to stop (the signal travels in the step's one all-gather, trainer/step_summary.py,
so a signal that reached one rank stops them all), write the checkpoint and leave the loop. train.py then requeues the SLURM job
(muonlab, not Lightning or submitit, owns requeue: `scontrol requeue <job id>` from rank 0) and
exits with 128 + signal number; the requeued job resumes from its own run dir.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading


SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class StopRequest:
    """Records the first stop signal while installed (replacing Lightning's and submitit's handlers)."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in SIGNALS:
            self._previous[signum] = signal.signal(signum, self._record)

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _record(self, signum, frame) -> None:
        self.signum = self.signum or signum


def slurm_job_id(environ=os.environ) -> str | None:
    if "SLURM_ARRAY_JOB_ID" in environ and "SLURM_ARRAY_TASK_ID" in environ:
        return f"{environ['SLURM_ARRAY_JOB_ID']}_{environ['SLURM_ARRAY_TASK_ID']}"
    return environ.get("SLURM_JOB_ID")


def requeue_slurm_job(job_id: str) -> str:
    """`scontrol requeue job_id`; returns what happened, in words (never raises)."""
    try:
        done = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"could not requeue SLURM job {job_id} ({e})"
    if done.returncode:
        return f"scontrol requeue {job_id} failed: {(done.stderr or done.stdout).strip()} (already requeued by SLURM?)"
    return f"requeued SLURM job {job_id}"
