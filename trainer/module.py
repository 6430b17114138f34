"""The LightningModule: next-token cross-entropy, the hybrid optimizer with a token schedule, and
what happens at each step boundary (metrics row, evaluation, checkpoint, and stopping when a signal
asked for it: trainer/preemption.py). Under FSDP the model is sharded in configure_model.

One gradient per step uses Lightning's automatic optimization (accumulation, the NaN check in
on_before_optimizer_step, clipping in configure_gradient_clipping). Exact MARS-M needs two
(`optim.gradient_evals_per_step: 2`) and runs the same step by hand (manual optimization): first
the gradient at the current weights on the next step's batch, which the optimizer stores, then the
step's own accumulated gradient."""

from __future__ import annotations

import math
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
from torch.utils.data import DataLoader

from data import TokenStream, TrainBatches
from models import build_model
from optim.distributed import gather_whole
from optim.qk_clip import QKClip
from optim.schedules import Schedule
from trainer.checkpoint import FORMAT, last_checkpoint_path, renumber_optimizer_state, save_atomic
from trainer.errors import ConfigError, NonFiniteLossError
from trainer.metrics import MetricsCSV
from trainer.optimizers import build_optimizer, print_routing
from trainer.parallel import shard_model
from trainer.plan import RunPlan
from trainer.preemption import StopRequest
from trainer.throughput import flops_per_token, measured_peak_flops, peak_memory_gb


class LanguageModel(L.LightningModule):
    def __init__(self, cfg: DictConfig, plan: RunPlan, train_tokens: TokenStream, val_windows: torch.Tensor,
                 resume_step: int | None = None):
        super().__init__()
        self.cfg, self.plan = cfg, plan
        self.automatic_optimization = not plan.two_pass
        self.model = build_model(OmegaConf.to_container(cfg.model, resolve=True))
        self.model.activation_checkpointing = bool(cfg.activation_checkpointing)
        self.schedule = Schedule(**OmegaConf.to_container(cfg.schedule, resolve=True))
        self.train_tokens, self.val_windows = train_tokens, val_windows
        self.resume_step = resume_step
        self.metrics: MetricsCSV | None = None  # written by rank 0 only (setup)
        self.checkpoint_path = last_checkpoint_path(cfg.run_dir)
        self.pending_metrics: dict = {}  # columns callbacks add to the current step's row
        self.last_row: dict | None = None
        self.qk_clip: QKClip | None = None  # MuonClip: built with the optimizer
        self.last_checkpoint_step = 0
        self.stop_request = StopRequest()
        self.stopped_by: int | None = None  # the signal that stopped training early, if any
        self.elapsed_s = 0.0  # training wall time over all sessions (restored on resume)
        self._step_losses: list[torch.Tensor] = []
        self._step_loss = float("nan")
        self._step_lrs: dict[str, float] = {}
        self._grad_norm = float("nan")
        self._clock: float | None = None
        self._clock_step = 0
        self.train_batches: TrainBatches | None = None

    # ---- model, data, optimizer --------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if self.trainer.is_global_zero:
            self.metrics = MetricsCSV(Path(self.cfg.run_dir) / "metrics.csv", resume_step=self.resume_step)

    def configure_model(self) -> None:
        if self._trainer is not None and isinstance(self.trainer.strategy, ModelParallelStrategy):
            shard_model(self.model, self.device_mesh["data_parallel"],
                        mixed_precision=str(self.cfg.trainer.precision).startswith("bf16"))
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
        if isinstance(self.trainer.strategy, DDPStrategy) and self.trainer.world_size > 1:
            optimizer.split_orthogonalization()  # replicas: each rank orthogonalizes its share of the matrices
        if optimizer.needs_lookahead != self.plan.two_pass:
            raise ConfigError(
                f"optim={self.cfg.optim.name}: optim.gradient_evals_per_step={self.plan.gradient_evals_per_step} but the "
                f"matrix optimizer {'needs' if optimizer.needs_lookahead else 'has no use for'} a look-ahead gradient; "
                f"set optim.gradient_evals_per_step={2 if optimizer.needs_lookahead else 1}"
            )
        threshold = self.cfg.optim.qk_clip_threshold
        self.qk_clip = QKClip(self.model, threshold) if threshold is not None else None  # MuonClip
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
        """Global-norm clipping at `grad_clip` (none if null); the norm before clipping is logged. The
        norm is summed in float64 over whole gradients (FSDP: shard norms reduced across ranks), so
        it is the same number on one device, under DDP and under FSDP."""
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        squares = gather_whole([g.double().square().sum() for g in grads])
        self._grad_norm = torch.stack(squares).sum().sqrt().item()  # one host sync, not one per parameter
        clip = self.cfg.grad_clip
        if clip is not None and self._grad_norm > clip:
            torch._foreach_mul_(grads, clip / (self._grad_norm + 1e-6))

    def on_train_start(self) -> None:
        self.stop_request.install()  # after Lightning's own handlers, which it installs in fit()
        self._flops_per_token = flops_per_token(self.model) * self.plan.gradient_evals_per_step
        peak = self.cfg.trainer.peak_flops
        if peak is None:
            dtype = torch.bfloat16 if str(self.cfg.trainer.precision).startswith("bf16") else torch.float32
            peak = measured_peak_flops(self.device, dtype)
            if self.trainer.is_global_zero:
                print(f"peak {peak / 1e12:.3g} TFLOP/s per device, measured ({str(dtype).removeprefix('torch.')} matmul; "
                      f"trainer.peak_flops=<FLOP/s> sets a datasheet's), for metrics.csv's mfu", flush=True)
        self._peak_flops = float(peak) * self.plan.world_size
        self._clock, self._clock_step = time.perf_counter(), self.trainer.global_step

    def on_train_end(self) -> None:
        self.stop_request.uninstall()

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        step = self.trainer.global_step
        if step == self._clock_step:  # an accumulation micro-batch, not a step boundary
            return
        now = time.perf_counter()
        self.elapsed_s += now - self._clock
        tokens = self.plan.tokens_at(step)
        tokens_per_s = self.plan.tokens_at(step - self._clock_step) / (now - self._clock)
        row = {"tokens": tokens, "step": step, "train_loss": self._step_loss, **self._step_lrs,
               "grad_norm": self._grad_norm, "grad_evals": step * self.plan.gradient_evals_per_step,
               "tokens_per_s": tokens_per_s, "mfu": self._flops_per_token * tokens_per_s / self._peak_flops,
               "peak_memory_gb": peak_memory_gb(self.device), "elapsed_s": self.elapsed_s}
        if self.qk_clip is not None:  # after the optimizer step, before any checkpoint of it
            row.update(self.qk_clip())
        row.update(self.pending_metrics)
        self.pending_metrics = {}
        if self.plan.eval_due(step):
            row["val_loss"] = self.evaluate()
        self.last_row = row
        if self.metrics is not None:
            self.metrics.log(row)
        for logger in self.trainer.loggers:
            logger.log_metrics({k: v for k, v in row.items() if k != "step"}, step=step)
        self.stopped_by = self.stop_request.agreed(self.trainer.strategy)
        if self.plan.checkpoint_due(step) or self.stopped_by:
            self.last_checkpoint_step = step
            save_atomic(self.trainer, self.checkpoint_path)
        if self.stopped_by:
            self.trainer.should_stop = True
        self._clock, self._clock_step = time.perf_counter(), step  # eval and checkpoint time excluded

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean next-token loss over the fixed validation windows (split across ranks). Every rank
        runs the same number of forward passes (FSDP gathers weights in each), the short ones on an
        empty remainder that counts zero."""
        was_training = self.model.training
        self.model.eval()
        world, size = self.plan.world_size, int(self.cfg.eval.micro_batch)
        windows = self.val_windows[self.global_rank :: world]
        total = torch.zeros((), device=self.device, dtype=torch.float64)
        count = torch.zeros((), device=self.device, dtype=torch.float64)
        passes = math.ceil(math.ceil(len(self.val_windows) / world) / size)
        with self.trainer.precision_plugin.forward_context():
            for i in range(passes):
                chunk = windows[i * size : (i + 1) * size]
                weight = len(chunk)
                chunk = (chunk if weight else self.val_windows[:1]).to(self.device)
                total += self.loss(chunk[:, :-1], chunk[:, 1:]).double() * weight
                count += weight
        total = self.trainer.strategy.reduce(total, reduce_op="sum")
        count = self.trainer.strategy.reduce(count, reduce_op="sum")
        self.model.train(was_training)
        return (total / count).item()

    # ---- checkpoint --------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if not isinstance(self.trainer.strategy, ModelParallelStrategy):  # FSDP2 already numbers by module position
            position = {id(p): i for i, p in enumerate(self.parameters())}
            checkpoint["optimizer_states"] = [
                renumber_optimizer_state(state, {i: position[id(p)] for i, p in enumerate(p for g in opt.param_groups for p in g["params"])})
                for state, opt in zip(checkpoint["optimizer_states"], self.trainer.optimizers)
            ]
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
        align_batch_counters(checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"], meta["step"], self.plan.accumulation)


def align_batch_counters(progress: dict, step: int, batches_per_step: int) -> None:
    """Lightning counts micro-batches and decides where a step ends from that count. A run resumed
    on another world size has another number of micro-batches per step: shift the counters by
    what the steps done would have taken here, so the next step again starts at a step boundary."""
    if step == 0:
        return
    saved_per_step = progress["total"]["processed"] // step
    for counters in (progress["total"], progress["current"]):
        for key in counters:
            counters[key] += step * (batches_per_step - saved_per_step)
