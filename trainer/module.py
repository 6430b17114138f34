"""The LightningModule: next-token cross-entropy, the hybrid optimizer with a token schedule, and
what happens at each step boundary (metrics row, evaluation, checkpoint, and stopping when a signal
asked for it: trainer/preemption.py). Under FSDP the model is sharded in configure_model. Every
setting comes from the RunPlan (trainer/plan.py); the module never reads the config.

One gradient per step uses Lightning's automatic optimization (accumulation; the NaN check and
clipping in on_before_optimizer_step). The step waits on the device once: the loss, the gradient
norm, the stop agreement and QK-clip's logit maxima travel in one tensor (one all-gather across
ranks) and are read together (trainer/step_summary.py); clipping is decided on the device. An
optimizer that takes a look-ahead gradient (exact MARS-M: `plan.lookahead`) gets two and runs the same step by hand
(manual optimization, `_two_pass_step`): first the gradient at the current weights on the next
step's batch, which the optimizer stores, then the step's own accumulated gradient."""

from __future__ import annotations

import contextlib
import math
from typing import Callable

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from data import TokenStream, TrainBatches
from models.blocks import compile_blocks
from models.loss import without_pads
from optim.distributed import global_norm, local_tensors
from optim.hybrid import HybridOptimizer
from optim.qk_clip import QKClip
from trainer.checkpoint import FORMAT, align_batch_counters, last_checkpoint_path, number_by_position, save_atomic
from trainer.errors import NonFiniteLossError
from trainer.evaluation import evaluate, validation_metrics
from trainer.optimizers import print_routing
from trainer.parallel import fsdp_mesh, is_fsdp, shard_model
from trainer.plan import RunPlan
from trainer.preemption import StopRequest
from trainer.step_metrics import StepMetrics
from trainer.step_summary import StepSummary, summarize


class LanguageModel(L.LightningModule):
    def __init__(self, plan: RunPlan, model: torch.nn.Module, build_optimizer: Callable[[torch.nn.Module], HybridOptimizer],
                 train_tokens: TokenStream, val_windows: torch.Tensor, resume_rows: list[dict] = (), val_bytes: int | None = None):
        super().__init__()
        self.plan, self.model, self.build_optimizer = plan, model, build_optimizer
        self.automatic_optimization = not plan.lookahead
        self.train_tokens, self.val_windows = train_tokens, val_windows
        self.val_bytes = val_bytes  # the UTF-8 bytes the validation targets stand for (val_bpb)
        self.resume_rows = resume_rows  # metrics.csv's rows up to the checkpoint resumed from
        self.step_metrics = StepMetrics(plan)  # the rows of metrics.csv; callbacks add columns through it
        self.checkpoint_path = last_checkpoint_path(plan.run_dir)
        self.qk_clip: QKClip | None = None  # MuonClip: built with the optimizer
        self.last_checkpoint_step = 0
        self.stop_request = StopRequest()
        self.stopped_by: int | None = None  # the signal that stopped training early, if any
        self._step_losses: list[torch.Tensor] = []
        self._step_targets: list[torch.Tensor] = []  # unpacked: each micro-batch's targets that are not pads
        self._summary: StepSummary | None = None  # the step's loss, grad norm, stop signal, QK maxima
        self._step_lrs: dict[str, float] = {}
        self.train_batches: TrainBatches | None = None

    # ---- model, data, optimizer --------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if self.trainer.is_global_zero:
            self.step_metrics.open_csv(self.resume_rows)

    def configure_model(self) -> None:
        """Compile each block, then shard (torchtitan's order: FSDP2's per-block hooks stay outside the graphs)."""
        if self.plan.compile:
            compile_blocks(self.model)
        if self._trainer is not None and isinstance(self.trainer.strategy, ModelParallelStrategy):
            mesh = fsdp_mesh(self.device_mesh["data_parallel"], self.plan.fsdp_replicas)
            shard_model(self.model, mesh, mixed_precision=self.plan.bf16)

    def train_dataloader(self) -> DataLoader:
        plan = self.plan
        batches = TrainBatches(self.train_tokens, plan.seq_len, plan.seqs_per_step, plan.micro_batch,
                               seed=plan.data_seed, rank=self.global_rank, world_size=plan.world_size, packed=plan.packed)
        batches.start_step = self.trainer.global_step  # already restored when resuming
        self.train_batches = batches
        return DataLoader(batches, batch_size=None, num_workers=plan.num_workers, persistent_workers=plan.num_workers > 0,
                          pin_memory=self.device.type == "cuda")  # page-locked batches: the copy to the GPU overlaps

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
        return self.model(inputs, without_pads(targets, self.plan.pad_id))  # fp32 cross-entropy over chunks of the logits (models/loss.py)

    def _count_targets(self, targets: torch.Tensor) -> None:
        """The micro-batch's targets that count (unpacked: not pads), on the device, read with the step's summary."""
        self._step_targets.append((targets != self.plan.pad_id).sum() if self.plan.pad_id is not None
                                  else torch.tensor(targets.numel(), device=targets.device))

    def training_step(self, batch, batch_idx):
        if self.plan.lookahead:
            return self._two_pass_step(batch)
        self._reduce_gradients(last=len(self._step_losses) + 1 == self.plan.accumulation)  # at its backward
        loss = self.loss(*batch)
        self._step_losses.append(loss.detach())
        self._count_targets(batch[1])
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
            self.clip_gradients_()
            optimizer.optimizer.store_lookahead_gradients()
            optimizer.zero_grad()
        with self._reduce_gradients(last=len(self._step_losses) + 1 == accumulation):
            loss = self.loss(*batch)
            self.manual_backward(loss / accumulation)
        self._step_losses.append(loss.detach())
        self._count_targets(batch[1])
        if len(self._step_losses) == accumulation:
            optimizer.step()  # runs on_before_optimizer_step: the NaN check and clipping, before the update
            optimizer.zero_grad()
            self.lr_schedulers().step()

    def on_before_optimizer_step(self, optimizer) -> None:
        """Runs once per optimizer step, after the last backward and before the update: the step's one
        read from the device (the summary), the NaN check, then clipping."""
        grad_norm = self.clip_gradients_()
        loss, targets = torch.stack(self._step_losses).mean(), torch.stack(self._step_targets).sum()
        self._step_losses.clear()
        self._step_targets.clear()
        maxima = self.qk_clip.take_maxima() if self.qk_clip is not None else None
        self._summary = summary = summarize(loss, grad_norm, targets, self.stop_request.signum or 0, maxima,
                                            self.trainer.world_size)
        step = self.trainer.global_step + 1
        if not math.isfinite(summary.loss):
            saved = (f"The last good checkpoint is {self.checkpoint_path} (step {self.last_checkpoint_step})."
                     if self.last_checkpoint_step else
                     f"No checkpoint exists yet (the first was due after step {self.plan.first_checkpoint_step()}): "
                     f"rerunning starts over.")
            raise NonFiniteLossError(
                f"train loss is {summary.loss} at step {step} ({self.plan.tokens_at(step):,} tokens); stopped before the "
                f"update. {saved} Lower optim.lr, tighten grad_clip, or check the data."
            )
        self._step_lrs = {f"lr_{g.get('name', i)}": g["lr"] for i, g in enumerate(optimizer.param_groups)}

    def clip_gradients_(self) -> torch.Tensor:
        """Global-norm clipping at `grad_clip` (none if null), decided on the device: gradients are
        multiplied by grad_clip / (‖g‖ + 1e-6) where ‖g‖ > grad_clip. Returns ‖g‖ before clipping
        (0-dim, on the device): the norm of the whole gradients, the same number on one device, under
        DDP and under FSDP (local shard norms, one all-reduce)."""
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        norm = global_norm(grads)
        clip = self.plan.grad_clip
        if clip is not None:
            factor = torch.where(norm > clip, clip / (norm + 1e-6), torch.ones_like(norm))
            torch._foreach_mul_(local_tensors(grads), factor)
        return norm

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
        summary = self._summary
        if self.qk_clip is not None and summary.qk_maxima is not None:
            self.qk_clip.clip(summary.qk_maxima)  # MuonClip's scaling: after the update, before any checkpoint of it
        row = self.step_metrics.row(step, summary.loss, self._step_lrs, summary.grad_norm, self.device,
                                    more=summary.qk_columns, targets=summary.targets)
        if self.plan.eval_due(step):
            row.update(validation_metrics(self.evaluate(), self.val_windows, self.val_bytes, self.plan.pad_id))
        self.step_metrics.publish(row, self.trainer.loggers)
        self.stopped_by = summary.stop_signal
        if self.plan.checkpoint_due(step) or self.stopped_by:
            self.last_checkpoint_step = step
            save_atomic(self.trainer, self.checkpoint_path)
        if self.stopped_by:
            self.trainer.should_stop = True
        self.step_metrics.restart_clock(step)  # eval and checkpoint time excluded

    def evaluate(self) -> float:
        return evaluate(self.model, self.loss, self.val_windows, self.plan.eval_micro_batch, self.trainer, self.plan.pad_id)

    # ---- checkpoint --------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if not isinstance(self.trainer.strategy, ModelParallelStrategy):  # FSDP2 already numbers by module position
            number_by_position(checkpoint, self, self.trainer.optimizers)
        step = self.trainer.global_step
        checkpoint["muonlab"] = {"format": FORMAT, "config": self.plan.config, "step": step,
                                 "tokens": self.plan.tokens_at(step), "elapsed_s": self.step_metrics.elapsed_s,
                                 "nonpad_tokens": self.step_metrics.nonpad_tokens,
                                 "metrics": self.step_metrics.rows()}  # rank 0's, the one written

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        meta = checkpoint["muonlab"]
        self.step_metrics.elapsed_s, self.last_checkpoint_step = meta["elapsed_s"], meta["step"]
        self.step_metrics.nonpad_tokens = meta.get("nonpad_tokens", self.plan.tokens_at(meta["step"]))
        align_batch_counters(checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"], meta["step"], self.plan.accumulation)
