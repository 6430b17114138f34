"""The LightningModule: next-token cross-entropy, the hybrid optimizer with a token schedule, and
what happens at each step boundary (metrics row, evaluation, checkpoint).

One gradient per step uses Lightning's automatic optimization (accumulation, the NaN check in
on_before_optimizer_step, clipping in configure_gradient_clipping). Exact MARS-M needs two
(`optim.gradient_evals_per_step: 2`) and runs the same step by hand (manual optimization): first
the gradient at the current weights on the next step's batch, which the optimizer stores, then the
step's own accumulated gradient."""

from __future__ import annotations

import math
import time

import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from data import TokenStream, TrainBatches
from models import build_model
from optim.schedules import Schedule
from trainer.checkpoint import FORMAT, last_checkpoint_path, save_atomic
from trainer.errors import ConfigError, NonFiniteLossError
from trainer.metrics import MetricsCSV
from trainer.optimizers import build_optimizer, print_routing
from trainer.plan import RunPlan


class LanguageModel(L.LightningModule):
    def __init__(self, cfg: DictConfig, plan: RunPlan, train_tokens: TokenStream, val_windows: torch.Tensor,
                 metrics: MetricsCSV | None):
        super().__init__()
        self.cfg, self.plan = cfg, plan
        self.automatic_optimization = not plan.two_pass
        self.model = build_model(OmegaConf.to_container(cfg.model, resolve=True))
        self.schedule = Schedule(**OmegaConf.to_container(cfg.schedule, resolve=True))
        self.train_tokens, self.val_windows = train_tokens, val_windows
        self.metrics = metrics  # None on ranks other than 0
        self.checkpoint_path = last_checkpoint_path(cfg.run_dir)
        self.pending_metrics: dict = {}  # columns callbacks add to the current step's row
        self.last_row: dict | None = None
        self.last_checkpoint_step = 0
        self.elapsed_s = 0.0  # training wall time over all sessions (restored on resume)
        self._step_losses: list[torch.Tensor] = []
        self._step_loss = float("nan")
        self._step_lrs: dict[str, float] = {}
        self._grad_norm = float("nan")
        self._clock: float | None = None
        self._clock_step = 0
        self.train_batches: TrainBatches | None = None

    # ---- model, data, optimizer --------------------------------------------------------------
    def configure_model(self) -> None:
        if self.cfg.compile:
            self.model.compile()

    def train_dataloader(self) -> DataLoader:
        batches = TrainBatches(
            self.train_tokens, self.plan.seq_len, self.plan.seqs_per_step, self.plan.micro_batch,
            seed=int(self.cfg.data.seed), rank=self.global_rank, world_size=self.plan.world_size,
        )
        batches.start_step = self.trainer.global_step  # already restored when resuming
        self.train_batches = batches
        workers = int(self.cfg.data.num_workers)
        return DataLoader(batches, batch_size=None, num_workers=workers, persistent_workers=workers > 0)

    def configure_optimizers(self):
        optimizer = build_optimizer(self.model, self.cfg.optim)
        if optimizer.needs_lookahead != self.plan.two_pass:
            raise ConfigError(
                f"optim={self.cfg.optim.name}: optim.gradient_evals_per_step={self.plan.gradient_evals_per_step} but the "
                f"matrix optimizer {'needs' if optimizer.needs_lookahead else 'has no use for'} a look-ahead gradient; "
                f"set optim.gradient_evals_per_step={2 if optimizer.needs_lookahead else 1}"
            )
        if self.global_rank == 0:
            print_routing(self.model, optimizer, self.cfg.optim.name)
        plan, schedule = self.plan, self.schedule
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: schedule.factor(plan.tokens_at(step + 1), plan.budget_tokens)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- the step ----------------------------------------------------------------------------
    def loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.model(inputs)
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    def training_step(self, batch, batch_idx):
        if self.plan.two_pass:
            return self._two_pass_step(batch)
        loss = self.loss(*batch)
        self._step_losses.append(loss.detach())
        return loss

    def _two_pass_step(self, batch) -> None:
        """One micro-batch of a step with a look-ahead gradient (manual optimization)."""
        optimizer, accumulation = self.optimizers(), self.plan.accumulation
        if not self._step_losses:  # the step's first micro-batch: the look-ahead pass, at the current weights
            for inputs, targets in self.train_batches.step_batches(self.trainer.global_step + 1):
                self.manual_backward(self.loss(inputs.to(self.device), targets.to(self.device)) / accumulation)
            self.clip_and_measure_gradients()
            optimizer.optimizer.store_lookahead_gradients()
            optimizer.zero_grad()
        loss = self.loss(*batch)
        self._step_losses.append(loss.detach())
        self.manual_backward(loss / accumulation)
        if len(self._step_losses) == accumulation:
            self.clip_and_measure_gradients()
            optimizer.step()  # runs on_before_optimizer_step: the NaN check, before the update
            optimizer.zero_grad()
            self.lr_schedulers().step()

    def on_before_optimizer_step(self, optimizer) -> None:
        """Runs once per optimizer step, after the last backward and before clipping and the update."""
        loss = self.trainer.strategy.reduce(torch.stack(self._step_losses).mean(), reduce_op="mean")
        self._step_losses.clear()
        step = self.trainer.global_step + 1
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"train loss is {loss.item()} at step {step} ({self.plan.tokens_at(step):,} tokens); stopped before the "
                f"update. The last good checkpoint is {self.checkpoint_path} (step {self.last_checkpoint_step}). "
                "Lower optim.lr, tighten grad_clip, or check the data."
            )
        self._step_loss = loss.item()
        self._step_lrs = {f"lr_{g.get('name', i)}": g["lr"] for i, g in enumerate(optimizer.param_groups)}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        self.clip_and_measure_gradients()

    def clip_and_measure_gradients(self) -> None:
        """Global-norm clipping at `grad_clip` (none if null); the norm before clipping is logged."""
        clip = self.cfg.grad_clip
        self._grad_norm = torch.nn.utils.clip_grad_norm_(self.parameters(), max_norm=clip or math.inf).item()

    def on_train_start(self) -> None:
        self._clock, self._clock_step = time.perf_counter(), self.trainer.global_step

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        step = self.trainer.global_step
        if step == self._clock_step:  # an accumulation micro-batch, not a step boundary
            return
        now = time.perf_counter()
        self.elapsed_s += now - self._clock
        tokens = self.plan.tokens_at(step)
        row = {"tokens": tokens, "step": step, "train_loss": self._step_loss, **self._step_lrs,
               "grad_norm": self._grad_norm, "grad_evals": step * self.plan.gradient_evals_per_step,
               "tokens_per_s": self.plan.tokens_at(step - self._clock_step) / (now - self._clock),
               "elapsed_s": self.elapsed_s}
        row.update(self.pending_metrics)
        self.pending_metrics = {}
        if self.plan.eval_due(step):
            row["val_loss"] = self.evaluate()
        self.last_row = row
        if self.metrics is not None:
            self.metrics.log(row)
        for logger in self.trainer.loggers:
            logger.log_metrics({k: v for k, v in row.items() if k != "step"}, step=step)
        if self.plan.checkpoint_due(step):
            self.last_checkpoint_step = step
            save_atomic(self.trainer, self.checkpoint_path)
        self._clock, self._clock_step = time.perf_counter(), step  # eval and checkpoint time excluded

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean next-token loss over the fixed validation windows (split across ranks)."""
        was_training = self.model.training
        self.model.eval()
        windows = self.val_windows[self.global_rank :: self.plan.world_size]
        total = torch.zeros((), device=self.device, dtype=torch.float64)
        count = torch.zeros((), device=self.device, dtype=torch.float64)
        size = int(self.cfg.eval.micro_batch)
        with self.trainer.precision_plugin.forward_context():
            for i in range(0, len(windows), size):
                chunk = windows[i : i + size].to(self.device)
                total += self.loss(chunk[:, :-1], chunk[:, 1:]).double() * len(chunk)
                count += len(chunk)
        total = self.trainer.strategy.reduce(total, reduce_op="sum")
        count = self.trainer.strategy.reduce(count, reduce_op="sum")
        self.model.train(was_training)
        return (total / count).item()

    # ---- checkpoint --------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["muonlab"] = {
            "format": FORMAT,
            "config": OmegaConf.to_container(self.cfg, resolve=True),
            "step": self.trainer.global_step,
            "tokens": self.plan.tokens_at(self.trainer.global_step),
            "elapsed_s": self.elapsed_s,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        meta = checkpoint["muonlab"]
        self.elapsed_s = meta["elapsed_s"]
        self.last_checkpoint_step = meta["step"]
