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
from torch.utils._python_dispatch import TorchDispatchMode

# the collectives as the dispatcher sees them: torch.distributed's (c10d) and the functional ones
# DTensor uses (_c10d_functional), under one name each
NAMES = {
    "allreduce_": "all_reduce", "allreduce_coalesced_": "all_reduce", "all_reduce": "all_reduce",
    "all_reduce_coalesced": "all_reduce",
    "_reduce_scatter_base_": "reduce_scatter", "reduce_scatter_": "reduce_scatter",
    "reduce_scatter_tensor_coalesced_": "reduce_scatter", "reduce_scatter_tensor": "reduce_scatter",
    "reduce_scatter_tensor_coalesced": "reduce_scatter",
    "_allgather_base_": "all_gather", "allgather_": "all_gather", "allgather_coalesced_": "all_gather",
    "allgather_into_tensor_coalesced_": "all_gather", "all_gather_into_tensor": "all_gather",
    "all_gather_into_tensor_coalesced": "all_gather",
    "alltoall_": "all_to_all", "alltoall_base_": "all_to_all", "all_to_all_single": "all_to_all",
    "broadcast_": "broadcast", "broadcast": "broadcast",
}


class Counter(TorchDispatchMode):
    """Counts every collective by name while active (`with Counter() as counter:`), whether called
    through torch.distributed (FSDP2's reduce-scatters, our all-to-alls) or as a functional collective
    (a DTensor's redistribution, e.g. the norm of a sharded matrix), from any thread autograd runs on."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace in ("c10d", "_c10d_functional"):
            name = func.__name__.split(".")[0]
            if name in NAMES:
                self.counts[NAMES[name]] += 1
        return func(*args, **(kwargs or {}))

    def reduce_scatters(self) -> int:
        return self.counts["reduce_scatter"]


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
        self.counter.__exit__(None, None, None)
        path = Path(trainer.default_root_dir) / f"collectives.{trainer.global_rank}.json"
        path.write_text(json.dumps(self.steps))
