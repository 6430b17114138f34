"""Counting the places a step reads a tensor's value on the host (`.item()`, `.tolist()`, `.cpu()`,
`.numpy()`, `bool()`, `float()`, `int()`): on a GPU each one waits for all the work queued before it,
which a CPU timing cannot show. `CountHostReads` is a Lightning callback that counts, for each optimizer
step, the reads from the start of its first micro-batch to the start of the next step's (so the
step-boundary work after the update, QK-clip and the metrics row, is counted too)."""

from __future__ import annotations

import collections
import traceback

import lightning as L
import torch

READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


class HostReads:
    """While active, counts calls of each of READS on any tensor, with where they came from."""

    def __init__(self):
        self.counts = collections.Counter()
        self.places = collections.Counter()
        self._originals = {}

    def __enter__(self) -> HostReads:
        for name in READS:
            original = self._originals[name] = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, self._counted(name, original))
        return self

    def _counted(self, name, original):
        def counted(tensor, *args, **kwargs):
            self.counts[name] += 1
            caller = traceback.extract_stack(limit=3)[0]
            self.places[f"{name} at {caller.filename.rsplit('/', 1)[-1]}:{caller.lineno}"] += 1
            return original(tensor, *args, **kwargs)
        return counted

    def __exit__(self, *exc) -> None:
        for name, original in self._originals.items():
            setattr(torch.Tensor, name, original)

    def total(self) -> int:
        return sum(self.counts.values())


class CountHostReads(L.Callback):
    """steps[k]: (reads, places) of optimizer step k + 1, counted from its first micro-batch to the next's."""

    def __init__(self):
        self.reads = HostReads()
        self.steps: list[tuple[int, dict]] = []
        self._step = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._step == trainer.global_step:
            return  # a later micro-batch of the same step
        if self._step is not None:
            self.reads.__exit__()
            self.steps.append((self.reads.total(), dict(self.reads.places)))
        self.reads = HostReads().__enter__()
        self._step = trainer.global_step

    def on_train_end(self, trainer, pl_module) -> None:
        self.reads.__exit__()
