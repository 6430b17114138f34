"""The metrics row of each optimizer step, and the clock that finds step boundaries and times them.

The module builds one row per step boundary (trainer/module.py) and publishes it to metrics.csv and
the loggers. Callbacks add columns to the current step's row with `add(columns)` from their
`on_train_batch_end` (Lightning runs callbacks' hooks before the module's), and read the last
published row from `last_row`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch

from trainer.metrics import MetricsCSV
from trainer.plan import RunPlan
from trainer.throughput import flops_per_token, peak_flops, peak_memory_gb

PEAK_SOURCES = {"config": "trainer.peak_flops", "datasheet": "the device's datasheet, dense tensor cores",
                "measured": "measured on a matmul; trainer.peak_flops=<FLOP/s> sets a datasheet's"}


class StepMetrics:
    def __init__(self, plan: RunPlan):
        self.plan = plan
        self.csv: MetricsCSV | None = None  # rank 0 only (open_csv)
        self.last_row: dict | None = None
        self.elapsed_s = 0.0  # training wall time over all sessions (restored on resume)
        self.nonpad_tokens = 0  # unpacked: the training targets that were not pads, over all sessions
        self._added: dict = {}
        self._clock = 0.0
        self._clock_step = 0
        self._flops_per_token = self._peak_flops = float("nan")
        self._peak_column: dict = {}

    def open_csv(self, rows: list[dict]) -> None:
        """metrics.csv, written anew with `rows` (a resumed run's rows up to its checkpoint)."""
        self.csv = MetricsCSV(Path(self.plan.run_dir) / "metrics.csv", rows)

    def rows(self) -> list[dict]:
        """Every row so far (rank 0; empty elsewhere): what a checkpoint keeps."""
        return list(self.csv.rows) if self.csv is not None else []

    def start(self, step: int, model: torch.nn.Module, device: torch.device, verbose: bool) -> None:
        """At train start: the FLOPs the mfu column counts, the devices' peak, and the clock."""
        self._flops_per_token = flops_per_token(model, self.plan.seq_len) * self.plan.gradient_evals_per_step
        peak, source = peak_flops(device, self.plan.precision, self.plan.peak_flops)
        if verbose:
            print(f"peak {peak / 1e12:.4g} TFLOP/s per device ({PEAK_SOURCES[source]}), for metrics.csv's mfu", flush=True)
        self._peak_column = {f"peak_tflops_{source}": peak / 1e12}
        self._peak_flops = peak * self.plan.world_size
        self.restart_clock(step)

    def is_step_boundary(self, step: int) -> bool:
        """False after an accumulation micro-batch (the optimizer step counter did not move)."""
        return step != self._clock_step

    def add(self, columns: dict) -> None:
        """Columns for the current step's row (callbacks: call from on_train_batch_end)."""
        self._added.update(columns)

    def row(self, step: int, train_loss: float, lrs: dict, grad_norm: float, device: torch.device,
            more: Callable[[], dict] | None = None, targets: float | None = None) -> dict:
        """The step's row: its measurements, the throughput since the last boundary, the columns
        `more()` returns (measured after the clock stopped), then the columns callbacks added. Unpacked
        (data.packing=false), `targets` (the step's non-pad targets) also gives nonpad_tokens (cumulative)
        and nonpad_tokens_per_s; tokens counts what the budget counts (budget.counts), tokens_per_s every
        position, as the FLOPs (mfu) do."""
        now = time.perf_counter()
        self.elapsed_s += now - self._clock
        tokens_per_s = self.plan.positions_at(step - self._clock_step) / (now - self._clock)
        row = {"tokens": self.plan.tokens_at(step), "step": step, "train_loss": train_loss, **lrs,
               "grad_norm": grad_norm, "grad_evals": step * self.plan.gradient_evals_per_step,
               "tokens_per_s": tokens_per_s, "mfu": self._flops_per_token * tokens_per_s / self._peak_flops,
               "peak_memory_gb": peak_memory_gb(device), "elapsed_s": self.elapsed_s, **self._peak_column}
        if self.plan.pad_id is not None and targets is not None:
            self.nonpad_tokens += int(targets)
            row |= {"nonpad_tokens": self.nonpad_tokens, "nonpad_tokens_per_s": targets / (now - self._clock)}
        row.update(more() if more is not None else {})
        row.update(self._added)
        self._added = {}
        return row

    def publish(self, row: dict, loggers) -> None:
        """Keep the row as `last_row`; write it to metrics.csv (rank 0) and every logger."""
        self.last_row = row
        if self.csv is not None:
            self.csv.log(row)
        for logger in loggers:
            logger.log_metrics({k: v for k, v in row.items() if k != "step"}, step=row["step"])

    def restart_clock(self, step: int) -> None:
        """Time from here (evaluation and checkpoint time are not training time)."""
        self._clock, self._clock_step = time.perf_counter(), step
