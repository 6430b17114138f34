"""One training run, from a composed config to a finished run dir."""

from __future__ import annotations

import functools
import logging
import math
import signal
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.errors import InstantiationException
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from data import open_dataset, validation_windows
from models import build_model
from trainer.checkpoint import last_checkpoint_path, rows_to_resume, verify_checkpoint
from trainer.errors import ConfigError
from trainer.evaluation import target_bytes
from trainer.host_memory import keep_freed_memory
from trainer.loggers import build_loggers
from trainer.metrics import MetricsCSV, write_budget
from trainer.module import LanguageModel
from trainer.optimizers import build_optimizer
from trainer.parallel import build_strategy, check_layout, cluster_plugins, ranks_run_this_job_only, world_size_of
from trainer.plan import make_plan, tokenizer_of
from trainer.setting import setting_warnings


@dataclass
class RunResult:
    run_dir: Path
    val_loss: float
    tokens: int
    steps: int
    wall_s: float
    resumed_from_step: int | None
    stopped_by: int | None = None  # the signal that stopped the run before its budget (it resumes on rerun)


def quiet_lightning() -> None:
    """Lightning messages go through the root logger only (Hydra's console + train.log), without
    its cloud-logging tip and the warnings that do not apply to this loop."""
    lightning_logger = logging.getLogger("lightning")
    for handler in list(lightning_logger.handlers):
        if isinstance(handler, logging.StreamHandler):
            lightning_logger.removeHandler(handler)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(lambda record: "litlogger" not in record.getMessage())
    for message in (r".*does not have many workers.*", r".*LeafSpec.*is deprecated.*"):
        warnings.filterwarnings("ignore", message=message)


say = rank_zero_only(functools.partial(print, flush=True))  # once per run, not once per rank


def run(cfg: DictConfig, callbacks: list[L.Callback] = ()) -> RunResult:
    started = time.perf_counter()
    keep_freed_memory()
    check_layout(cfg.trainer)
    if torch.cuda.is_available() and cfg.trainer.accelerator != "cpu":
        torch.set_float32_matmul_precision("high")  # fp32 matmuls on TF32 tensor cores (as Lightning advises)
    for warning in setting_warnings(cfg):
        say(f"warning: {warning}")
    plan = make_plan(cfg, world_size_of(cfg.trainer))
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)

    tokens = open_dataset(cfg.data)
    plan = plan.on_data(tokens.splits["train"])
    if plan.nonpad_budget is not None:
        say(f"budget: {plan.budget_tokens:,} non-pad tokens in {plan.total_steps:,} steps of {plan.tokens_per_step:,} "
            f"positions ({plan.budget_tokens / plan.positions_at(plan.total_steps):.0%} of them non-pad)")
    if rank_zero_only.rank == 0:
        write_budget(run_dir, plan.budget_counts, plan.budget_tokens, plan.total_steps)
    val = validation_windows(tokens.splits["val"], plan.seq_len, plan.eval_tokens, plan.packed)
    val_bytes = target_bytes(val, tokenizer_of(cfg).piece_bytes())
    if len(tokens.splits["val"]) < plan.eval_tokens:
        say(f"note: eval.tokens={plan.eval_tokens:,} but the validation split holds {len(tokens.splits['val']):,} "
            f"tokens; evaluating on all of them")

    checkpoint = last_checkpoint_path(run_dir)
    resume = verify_checkpoint(checkpoint, plan.config) if cfg.resume and checkpoint.is_file() else None
    rows, note = rows_to_resume(run_dir / "metrics.csv", resume, checkpoint) if resume else ([], None)
    if note:
        say(f"note: {note}")
    if resume and resume["step"] >= plan.total_steps:
        if note and rank_zero_only.rank == 0:
            MetricsCSV(run_dir / "metrics.csv", rows)
        say(f"{run_dir} already finished ({resume['tokens']:,} tokens); nothing to train")
        return report(rows[-1], run_dir, started, resume)
    if resume:
        say(f"resuming {run_dir} from step {resume['step']} ({resume['tokens']:,} tokens)")

    L.seed_everything(int(cfg.seed), verbose=False)
    model = build_model(OmegaConf.to_container(cfg.model, resolve=True))
    model.activation_checkpointing = bool(cfg.activation_checkpointing)
    module = LanguageModel(plan, model, functools.partial(build_optimizer, optim_cfg=cfg.optim), tokens.splits["train"], val,
                           resume_rows=rows, val_bytes=val_bytes)
    chosen = build_callbacks(cfg.callbacks) + list(callbacks)
    quiet_lightning()
    trainer = L.Trainer(
        accelerator=cfg.trainer.accelerator,
        devices=cfg.trainer.devices,
        num_nodes=cfg.trainer.num_nodes,
        strategy=build_strategy(cfg.trainer),
        plugins=cluster_plugins(),
        precision=cfg.trainer.precision,
        max_steps=plan.total_steps,
        max_epochs=-1,
        accumulate_grad_batches=1 if plan.lookahead else plan.accumulation,  # two-pass steps accumulate by hand
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=any(isinstance(c, ProgressBar) for c in chosen),
        use_distributed_sampler=False,
        logger=build_loggers(cfg, run_dir) or False,
        callbacks=chosen,
        default_root_dir=str(run_dir),
    )
    with ranks_run_this_job_only(cfg.trainer, cfg.run_dir):
        trainer.fit(module, ckpt_path=str(checkpoint) if resume else None)
    return report(module.step_metrics.last_row, run_dir, started, resume, stopped_by=module.stopped_by)


def build_callbacks(callbacks_cfg: DictConfig | None) -> list[L.Callback]:
    """The callbacks of the `callbacks` group; a bad setting is a ConfigError naming it."""
    chosen = []
    for name, node in (callbacks_cfg or {}).items():
        try:
            chosen.append(hydra.utils.instantiate(node))
        except InstantiationException as e:
            raise ConfigError(f"callbacks.{name}: {e.__cause__ or e}") from None
    return chosen


def report(final_row: dict, run_dir: Path, started: float, resume: dict | None, stopped_by: int | None = None) -> RunResult:
    """The run's result, said once. A run stopped by a signal has no final evaluation (val_loss is
    NaN unless its last step evaluated)."""
    val_loss = final_row.get("val_loss", math.nan) if stopped_by else final_row["val_loss"]
    result = RunResult(run_dir=run_dir, val_loss=val_loss, tokens=final_row["tokens"], steps=final_row["step"],
                       wall_s=time.perf_counter() - started, resumed_from_step=resume["step"] if resume else None,
                       stopped_by=stopped_by)
    if stopped_by:
        say(f"stopped by {signal.Signals(stopped_by).name} after step {result.steps} ({result.tokens:,} tokens); "
            f"checkpoint written to {last_checkpoint_path(run_dir)}; the same command resumes it")
    else:
        say(f"final val loss {result.val_loss:.4f} after {result.tokens:,} tokens ({result.steps} steps) "
            f"in {result.wall_s:.0f} s\nrun dir: {run_dir}")
    return result
