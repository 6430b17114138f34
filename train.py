"""Pretrain a GPT-2 or LLaMA with any optimizer of the Muon family.

    python train.py                                     # small GPT-2 on Shakespeare with Muon (CPU)
    python train.py optim=adamw budget.tokens=500000    # any group option, any key
    python train.py --help                              # the config groups and their options
"""

import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import configs
from trainer.errors import USER_ERRORS, ConfigError
from trainer.plan import run_dir_problem

configs.register()  # the resolvers and python_defaults nodes the YAML tree uses


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float:
    from lightning.pytorch.utilities import rank_zero_only

    from trainer.preemption import requeue_slurm_job, slurm_job_id
    from trainer.run import run

    cfg.run_dir = HydraConfig.get().runtime.output_dir  # = run_dir; in a multirun, <sweep dir>/<job number>
    try:
        result = run(cfg)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        if "SUBMITIT_FOLDER" in os.environ:
            raise  # a submitit job records the error, so the sweep reports the job as failed, with this message
        sys.exit(2)
    if result.stopped_by:  # SIGTERM/USR1/USR2: checkpointed at a step boundary; requeue under SLURM, then exit
        job = slurm_job_id()
        if job and rank_zero_only.rank == 0:
            print(requeue_slurm_job(job), flush=True)
        sys.exit(128 + result.stopped_by)  # not a return: a submitit job must not record a result
    return result.val_loss


def refuse_a_file_as_run_dir(argv: list[str]) -> None:
    """Hydra makes the run dir before main() runs, so a run_dir that is a file would fail inside Hydra."""
    for arg in argv:
        key, _, value = arg.lstrip("+").partition("=")
        if key in ("run_dir", "hydra.run.dir") and (problem := run_dir_problem(value)):
            print(f"error: {ConfigError.of([problem])}", file=sys.stderr, flush=True)
            sys.exit(2)


if __name__ == "__main__":
    refuse_a_file_as_run_dir(sys.argv[1:])
    main()
