"""Optional Lightning callbacks, selected by the `callbacks` config group."""

from __future__ import annotations

import sys
import time

from lightning.pytorch.callbacks import ProgressBar
from tqdm import tqdm


def _short(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.0f}"


class TokenProgressBar(ProgressBar):
    """Progress in tokens with loss, last val loss and tokens/s. On a terminal a tqdm bar; in a log
    file (SLURM, CI) one line every `log_every_s` seconds instead of carriage returns."""

    def __init__(self, log_every_s: float = 30.0):
        super().__init__()
        self.log_every_s = log_every_s
        self._enabled = True
        self._bar: tqdm | None = None
        self._shown: dict | None = None
        self._last_line = 0.0
        self._val = None

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer, pl_module) -> None:
        if not (self._enabled and trainer.is_global_zero):
            return
        plan = pl_module.plan
        if sys.stderr.isatty():
            self._bar = tqdm(total=plan.budget_tokens, initial=plan.tokens_at(trainer.global_step), unit="tok",
                             unit_scale=True, dynamic_ncols=True, desc="train",
                             bar_format="{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} tokens [{elapsed}<{remaining}] {postfix}")

    def _show(self, pl_module, final: bool = False) -> None:
        row = pl_module.step_metrics.last_row
        if row is None or row is self._shown:
            return
        if "val_loss" in row:
            self._val = row["val_loss"]
        text = f"loss {row['train_loss']:.3f}" + (f" | val {self._val:.3f}" if self._val is not None else "") + \
               f" | {_short(row['tokens_per_s'])} tok/s"
        if self._bar is not None:
            self._bar.update(row["tokens"] - self._bar.n)
            self._bar.set_postfix_str(text, refresh=False)
        elif final or time.monotonic() - self._last_line >= self.log_every_s:
            total = pl_module.plan.budget_tokens
            print(f"[{_short(row['tokens'])}/{_short(total)} tokens, step {row['step']}] {text}", flush=True)
            self._last_line = time.monotonic()
        self._shown = row

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._enabled and trainer.is_global_zero:
            self._show(pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self._enabled and trainer.is_global_zero:
            self._show(pl_module, final=True)
            if self._bar is not None:
                self._bar.close()

    def on_exception(self, trainer, pl_module, exception) -> None:
        if self._bar is not None:
            self._bar.close()
