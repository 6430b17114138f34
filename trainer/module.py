"""The LightningModule: next-token cross-entropy, the hybrid optimizer with a token schedule, and
what happens at each step boundary (metrics row, evaluation, checkpoint, and stopping when a signal
asked for it: trainer/preemption.py). Under FSDP the model is sharded in configure_model. Every
setting comes from the RunPlan (trainer/plan.py); the module never reads the config.

One gradient per step uses Lightning's automatic optimization (accumulation, the NaN check in
on_before_optimizer_step, clipping in configure_gradient_clipping). An optimizer that takes a
look-ahead gradient (exact MARS-M: `plan.lookahead`) gets two and runs the same step by hand
(manual optimization, `_two_pass_step`): first the gradient at the current weights on the next
step's batch, which the optimizer stores, then the step's own accumulated gradient."""

from __future__ import annotations

import contextlib
from typing import Callable

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from data import TokenStream, TrainBatches
from optim.distributed import gather_whole
from optim.hybrid import HybridOptimizer
from optim.qk_clip import QKClip
from trainer.checkpoint import FORMAT, align_batch_counters, last_checkpoint_path, number_by_position, save_atomic
from trainer.errors import NonFiniteLossError
from trainer.evaluation import evaluate
from trainer.optimizers import print_routing
from trainer.parallel import fsdp_mesh, is_fsdp, shard_model
from trainer.plan import RunPlan
from trainer.preemption import StopRequest
from trainer.step_metrics import StepMetrics


class LanguageModel(L.LightningModule):
    def __init__(self, plan: RunPlan, model: torch.nn.Module, build_optimizer: Callable[[torch.nn.Module], HybridOptimizer],
                 train_tokens: TokenStream, val_windows: torch.Tensor, resume_rows: list[dict] = ()):
        super().__init__()
        self.plan, self.model, self.build_optimizer = plan, model, build_optimizer
        self.automatic_optimization = not plan.lookahead
        self.train_tokens, self.val_windows = train_tokens, val_windows
        self.resume_rows = resume_rows  # metrics.csv's rows up to the checkpoint resumed from
        self.step_metrics = StepMetrics(plan)  # the rows of metrics.csv; callbacks add columns through it
        self.checkpoint_path = last_checkpoint_path(plan.run_dir)
        self.qk_clip: QKClip | None = None  # MuonClip: built with the optimizer
        self.last_checkpoint_step = 0
        self.stop_request = StopRequest()
        self.stopped_by: int | None = None  # the signal that stopped training early, if any
        self._step_losses: list[torch.Tensor] = []
        self._step_loss = float("nan")
        self._step_lrs: dict[str, float] = {}
        self._grad_norm = float("nan")
        self.train_batches: TrainBatches | None = None

    # ---- model, data, optimizer --------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if self.trainer.is_global_zero:
            self.step_metrics.open_csv(self.resume_rows)

    def configure_model(self) -> None:
        if self._trainer is not None and isinstance(self.trainer.strategy, ModelParallelStrategy):
            mesh = fsdp_mesh(self.device_mesh["data_parallel"], self.plan.fsdp_replicas)
            shard_model(self.model, mesh, mixed_precision=self.plan.bf16)
        if self.plan.compile:
            self.model.compile()

    def train_dataloader(self) -> DataLoader:
        plan = self.plan
        batches = TrainBatches(self.train_tokens, plan.seq_len, plan.seqs_per_step, plan.micro_batch,
                               seed=plan.data_seed, rank=self.global_rank, world_size=plan.world_size)
        batches.start_step = self.trainer.global_step  # already restored when resuming
        self.train_batches = batches
        return DataLoader(batches, batch_size=None, num_workers=plan.num_workers, persistent_workers=plan.num_workers > 0)

    def configure_optimizers(self):
        optimizer = self.build_optimizer(self.model)
        if isinstance(self.trainer.strategy, DDPStrategy) and self.trainer.world_size > 1:
            optimizer.split_orthogonalization()  # replicas: each rank orthogonalizes its share of the matrices
        threshold = self.plan.qk_clip_threshold
        self.qk_clip = QKClip(self.model, threshold) if threshold is not None else None  # MuonClip
        if self.global_rank == 0:
            print_routing(self.model, optimizer, self.plan.optim_name)
        plan = self.plan  # a plain function: LambdaLR checkpoints the state of any other callable
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: plan.lr_factor(step))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- the step ----------------------------------------------------------------------------
    def loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.model(inputs, targets)  # fp32 cross-entropy over chunks of the logits (models/loss.py)

    def training_step(self, batch, batch_idx):
        if self.plan.lookahead:
            return self._two_pass_step(batch)
        self._reduce_gradients(last=len(self._step_losses) + 1 == self.plan.accumulation)  # at its backward
        loss = self.loss(*batch)
        self._step_losses.append(loss.detach())
        return loss

    def _reduce_gradients(self, last: bool) -> contextlib.AbstractContextManager:
        """Gradients cross ranks once per accumulated gradient (exact MARS-M takes two a step), in the
        backward of its last micro-batch. FSDP2 is told here: Lightning's accumulation would let it
        reduce-scatter every micro-batch. Under DDP Lightning's automatic optimization skips the other
        micro-batches' all-reduce itself; the two-pass step runs them in the returned no_sync context."""
        if is_fsdp(self.model):
            self.model.set_requires_gradient_sync(last)
        elif not last and self.plan.lookahead and isinstance(self.trainer.model, DistributedDataParallel):
            return self.trainer.model.no_sync()
        return contextlib.nullcontext()

    def _two_pass_step(self, batch) -> None:
        """One micro-batch of a step with a look-ahead gradient (manual optimization)."""
        optimizer, accumulation = self.optimizers(), self.plan.accumulation
        if not self._step_losses:  # the step's first micro-batch: the look-ahead pass, at the current weights
            for i, (inputs, targets) in enumerate(self.train_batches.step_batches(self.trainer.global_step + 1)):
                with self._reduce_gradients(last=i + 1 == accumulation):
                    self.manual_backward(self.loss(inputs.to(self.device), targets.to(self.device)) / accumulation)
            self.clip_and_measure_gradients()
            optimizer.optimizer.store_lookahead_gradients()
            optimizer.zero_grad()
        with self._reduce_gradients(last=len(self._step_losses) + 1 == accumulation):
            loss = self.loss(*batch)
            self.manual_backward(loss / accumulation)
        self._step_losses.append(loss.detach())
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
            saved = (f"The last good checkpoint is {self.checkpoint_path} (step {self.last_checkpoint_step})."
                     if self.last_checkpoint_step else
                     f"No checkpoint exists yet (the first was due after step {self.plan.first_checkpoint_step()}): "
                     f"rerunning starts over.")
            raise NonFiniteLossError(
                f"train loss is {loss.item()} at step {step} ({self.plan.tokens_at(step):,} tokens); stopped before the "
                f"update. {saved} Lower optim.lr, tighten grad_clip, or check the data."
            )
        self._step_loss = loss.item()
        self._step_lrs = {f"lr_{g.get('name', i)}": g["lr"] for i, g in enumerate(optimizer.param_groups)}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        self.clip_and_measure_gradients()

    def clip_and_measure_gradients(self) -> None:
        """Global-norm clipping at `grad_clip` (none if null); the norm before clipping is logged. The
        norm is summed in float64 over whole gradients (FSDP: shard norms reduced across ranks), so
        it is the same number on one device, under DDP and under FSDP."""
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        squares = gather_whole([g.double().square().sum() for g in grads])
        self._grad_norm = torch.stack(squares).sum().sqrt().item()  # one host sync, not one per parameter
        clip = self.plan.grad_clip
        if clip is not None and self._grad_norm > clip:
            torch._foreach_mul_(grads, clip / (self._grad_norm + 1e-6))

    # ---- step boundaries ---------------------------------------------------------------------
    def on_train_start(self) -> None:
        self.stop_request.install()  # after Lightning's own handlers, which it installs in fit()
        self.step_metrics.start(self.trainer.global_step, self.model, self.device, verbose=self.trainer.is_global_zero)

    def on_train_end(self) -> None:
        self.stop_request.uninstall()

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.step_metrics.is_step_boundary(self.trainer.global_step):
            self.end_step(self.trainer.global_step)

    def end_step(self, step: int) -> None:
        """After optimizer step `step`: its metrics row (with val_loss when an evaluation is due),
        then the checkpoint when one is due or a signal asked to stop."""
        # MuonClip's scaling: after the update, before any checkpoint of it
        row = self.step_metrics.row(step, self._step_loss, self._step_lrs, self._grad_norm, self.device, more=self.qk_clip)
        if self.plan.eval_due(step):
            row["val_loss"] = self.evaluate()
        self.step_metrics.publish(row, self.trainer.loggers)
        self.stopped_by = self.stop_request.agreed(self.trainer.strategy)
        if self.plan.checkpoint_due(step) or self.stopped_by:
            self.last_checkpoint_step = step
            save_atomic(self.trainer, self.checkpoint_path)
        if self.stopped_by:
            self.trainer.should_stop = True
        self.step_metrics.restart_clock(step)  # eval and checkpoint time excluded

    def evaluate(self) -> float:
        return evaluate(self.model, self.loss, self.val_windows, self.plan.eval_micro_batch, self.trainer)

    # ---- checkpoint --------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if not isinstance(self.trainer.strategy, ModelParallelStrategy):  # FSDP2 already numbers by module position
            number_by_position(checkpoint, self, self.trainer.optimizers)
        step = self.trainer.global_step
        checkpoint["muonlab"] = {"format": FORMAT, "config": self.plan.config, "step": step,
                                 "tokens": self.plan.tokens_at(step), "elapsed_s": self.step_metrics.elapsed_s,
                                 "metrics": self.step_metrics.rows()}  # rank 0's, the one written

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        meta = checkpoint["muonlab"]
        self.step_metrics.elapsed_s, self.last_checkpoint_step = meta["elapsed_s"], meta["step"]
        align_batch_counters(checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"], meta["step"], self.plan.accumulation)
