"""Torch datasets over a TokenStream: the training micro-batches of one rank, and the fixed
validation set."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from data.sampler import SequenceSampler, step_indices
from data.shards import TokenStream


class TrainBatches(IterableDataset):
    """(inputs, targets) micro-batches of shape (micro_batch, seq_len) for one rank, from optimizer
    step `start_step` on, forever. Set `start_step` before iterating to resume. With several
    DataLoader workers, worker w produces micro-batches w, w + n, ..., which the DataLoader's
    round-robin turns back into the original order."""

    def __init__(self, stream: TokenStream, seq_len: int, seqs_per_step: int, micro_batch: int, seed: int,
                 rank: int = 0, world_size: int = 1, packed: bool = True):
        if (seqs_per_step // world_size) % micro_batch:
            raise ValueError(f"{seqs_per_step // world_size} sequences per rank do not split into micro-batches of {micro_batch}")
        self.stream, self.seq_len, self.seqs_per_step, self.micro_batch = stream, seq_len, seqs_per_step, micro_batch
        self.seed, self.rank, self.world_size, self.packed = seed, rank, world_size, packed
        self.start_step = 0
        self._sampler: SequenceSampler | None = None

    def micro_batch_indices(self, step: int) -> list[np.ndarray]:
        indices = step_indices(step, self.seqs_per_step, self.rank, self.world_size)
        return np.split(indices, len(indices) // self.micro_batch)

    def load(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        if self._sampler is None:  # built lazily, so that DataLoader workers each build their own
            self._sampler = SequenceSampler(len(self.stream), self.seq_len, self.seed, self.packed)
        windows = np.stack([self.stream.window(int(s), self.seq_len + 1) for s in self._sampler.starts(indices)])
        tokens = torch.from_numpy(windows)
        return tokens[:, :-1], tokens[:, 1:]

    def step_batches(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """All micro-batches of optimizer step `step` for this rank."""
        return [self.load(indices) for indices in self.micro_batch_indices(step)]

    def __iter__(self):
        worker = get_worker_info()
        n_workers, worker_id = (worker.num_workers, worker.id) if worker else (1, 0)
        count, step = 0, self.start_step
        while True:
            for indices in self.micro_batch_indices(step):
                if count % n_workers == worker_id:
                    yield self.load(indices)
                count += 1
            step += 1


def validation_windows(stream: TokenStream, seq_len: int, max_tokens: int, packed: bool = True) -> torch.Tensor:
    """The fixed validation set: consecutive, non-overlapping windows of seq_len + 1 tokens over the
    first `max_tokens` tokens of the split (shape (n, seq_len + 1)); unpacked, its first rows (documents)."""
    n_tokens = min(len(stream), max_tokens)
    if not packed:
        n = n_tokens // (seq_len + 1)
        if n < 1:
            raise ValueError(f"the validation split ({len(stream)} tokens, eval.tokens={max_tokens}) holds no row of {seq_len} + 1 tokens")
        return torch.from_numpy(stream.window(0, n * (seq_len + 1)).reshape(n, seq_len + 1))
    n = (n_tokens - 1) // seq_len
    if n < 1:
        raise ValueError(f"the validation split ({len(stream)} tokens, eval.tokens={max_tokens}) holds no sequence of {seq_len} + 1 tokens")
    return torch.from_numpy(np.stack([stream.window(i * seq_len, seq_len + 1) for i in range(n)]))


def row_targets(stream: TokenStream, seq_len: int, pad_id: int, chunk_tokens: int = 1 << 24) -> np.ndarray:
    """Non-pad targets of each unpacked row (seq_len + 1 tokens; targets are its last seq_len), read a
    chunk of whole rows at a time."""
    row_len = seq_len + 1
    n_rows, rows_per_chunk = len(stream) // row_len, max(1, chunk_tokens // row_len)
    counts = np.empty(n_rows, dtype=np.int64)
    for first in range(0, n_rows, rows_per_chunk):
        rows = stream.window(first * row_len, min(rows_per_chunk, n_rows - first) * row_len).reshape(-1, row_len)
        counts[first:first + len(rows)] = (rows[:, 1:] != pad_id).sum(1)
    return counts


def targets_after_steps(per_row: np.ndarray, seq_len: int, seed: int, seqs_per_step: int, budget: int) -> np.ndarray:
    """Non-pad targets trained after optimizer steps 0, 1, ..., S of an unpacked run: the rows the sampler
    visits, step after step, up to the last step S that keeps within `budget` (S >= 1)."""
    if per_row.sum() == 0:
        raise ValueError("the train split holds no non-pad target")
    sampler = SequenceSampler(len(per_row) * (seq_len + 1), seq_len, seed, packed=False)
    chunk = max(1, (1 << 20) // seqs_per_step)  # steps counted at a time
    done, total, pieces = 0, 0, [np.zeros(1, dtype=np.int64)]
    while True:
        rows = sampler.starts(np.arange(done * seqs_per_step, (done + chunk) * seqs_per_step)) // sampler.stride
        after = total + np.cumsum(per_row[rows].reshape(chunk, seqs_per_step).sum(1))
        within = int(np.searchsorted(after, budget, side="right"))
        pieces.append(after[:within])
        if within < chunk:
            break
        done, total = done + chunk, int(after[-1])
    if done + within == 0:
        raise ValueError(f"budget.tokens={budget:,} non-pad tokens is smaller than the first optimizer step's "
                         f"{int(after[0]):,}")
    return np.concatenate(pieces)
