"""Pretrain a GPT-2 or LLaMA with any optimizer of the Muon family.

    python train.py                                     # small GPT-2 on Shakespeare with Muon (CPU)
    python train.py optim=adamw budget.tokens=500000    # any group option, any key
    python train.py --help                              # the config groups and their options
"""

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import trainer.config  # noqa: F401  (registers the ${muonlab_root:} and ${asset:} resolvers)
from trainer.errors import USER_ERRORS


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float:
    from trainer.run import run

    cfg.run_dir = HydraConfig.get().runtime.output_dir  # = run_dir; in a multirun, <sweep dir>/<job number>
    try:
        return run(cfg).val_loss
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
