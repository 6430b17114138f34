"""Optional mirrors of metrics.csv (the `logger` config group): Weights & Biases and TensorBoard.

The wandb run id is generated once and kept in `<run_dir>/wandb_id.txt`, so a resumed or requeued
run continues the same wandb run. Files go to the run dir, never to ./wandb.
"""

from __future__ import annotations

import secrets
import string
from pathlib import Path

from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from data.files import atomic_file


def wandb_run_id(run_dir: Path) -> str:
    path = Path(run_dir) / "wandb_id.txt"
    if path.is_file():
        return path.read_text().strip()
    run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    with atomic_file(path) as tmp:  # a run killed here leaves no empty id for its resume to read
        tmp.write_text(run_id + "\n")
    return run_id


def build_loggers(cfg: DictConfig, run_dir: Path) -> list[Logger]:
    if rank_zero_only.rank != 0:  # Lightning's loggers write from rank 0 only; so does the wandb id file
        return []
    chosen = cfg.logger or {}
    loggers: list[Logger] = []
    if "wandb" in chosen:
        w = chosen.wandb
        loggers.append(WandbLogger(
            project=w.project, entity=w.entity, group=w.group, tags=list(w.tags or []), name=w.name or Path(run_dir).name,
            id=wandb_run_id(run_dir), resume="allow", save_dir=str(run_dir), offline=w.mode == "offline",
            config=OmegaConf.to_container(cfg, resolve=True),
        ))
    if "tensorboard" in chosen:
        loggers.append(TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version="", default_hp_metric=False))
    return loggers
