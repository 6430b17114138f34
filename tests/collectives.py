"""Counting torch.distributed collectives, for tests that assert how often a step communicates (a CPU
timing cannot show it). `CountCollectives` is a Lightning callback a training subprocess loads from
the command line (tests/ on PYTHONPATH):

    python train.py ... +callbacks.count._target_=collectives.CountCollectives

It writes <run_dir>/collectives.<global rank>.json: for each optimizer step, the number of calls of
each collective made from the start of its first micro-batch to the end of its last backward and update
(the step-boundary work that follows, evaluation and checkpoint, is not counted).
"""

from __future__ import annotations

import collections
import json
from pathlib import Path

import lightning as L
import torch.distributed as dist

NAMES = ("all_reduce", "reduce_scatter_tensor", "reduce_scatter_single", "all_gather_into_tensor", "all_gather_single",
         "all_gather", "all_to_all_single", "broadcast")


class Counter:
    """Wraps every collective of torch.distributed that exists in this torch, counting calls by name."""

    def __init__(self):
        self.counts = collections.Counter()
        self._originals = {}

    def __enter__(self) -> Counter:
        for name in NAMES:
            if hasattr(dist, name):
                original = self._originals[name] = getattr(dist, name)
                setattr(dist, name, self._counted(name, original))
        return self

    def _counted(self, name, original):
        def counted(*args, **kwargs):
            self.counts[name] += 1
            return original(*args, **kwargs)
        return counted

    def __exit__(self, *exc) -> None:
        for name, original in self._originals.items():
            setattr(dist, name, original)

    def reduce_scatters(self) -> int:
        return self.counts["reduce_scatter_tensor"] + self.counts["reduce_scatter_single"]


class CountCollectives(L.Callback):
    def __init__(self):
        self.counter = Counter()
        self.steps: list[dict] = []
        self._counting_step = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.counter.__enter__()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._counting_step != trainer.global_step:  # the first micro-batch of a step
            self.counter.counts.clear()
            self._counting_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self._counting_step:  # runs before the module's evaluation and checkpoint
            self.steps.append({"step": trainer.global_step, **self.counter.counts})
            self._counting_step = None

    def on_train_end(self, trainer, pl_module) -> None:
        self.counter.__exit__()
        path = Path(trainer.default_root_dir) / f"collectives.{trainer.global_rank}.json"
        path.write_text(json.dumps(self.steps))
