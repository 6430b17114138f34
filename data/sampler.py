"""A stateless sampler: where training sequence g starts is a pure function of (seed, g).

The train split (N tokens) is cut into S = ⌊(N − 1)/T⌋ windows of T + 1 tokens (T inputs and their
shifted targets). Epoch e = g // S visits every window once, in the order of a permutation drawn
from (seed, e), after shifting all windows by an offset in [0, N − 1 − S·T] drawn from the same
generator so that successive epochs do not repeat the same cut points:

    start(g) = offset_e + T · perm_e[g mod S]

Step k of a run with a global batch of B sequences owns global indices [kB, (k + 1)B); rank r of W
owns the r-th contiguous slice of B/W of them. The set of sequences in a step therefore does not
depend on the number of ranks, and resuming at step k needs nothing but k.
"""

from __future__ import annotations

import numpy as np


class SequenceSampler:
    """Packed: the windows above. Unpacked (data.packing=false): the split is rows of T + 1 tokens, one
    document each; epoch e visits them in the order of perm_e, start(g) = (T + 1) · perm_e[g mod S]."""

    def __init__(self, n_tokens: int, seq_len: int, seed: int, packed: bool = True):
        self.seed = seed
        self.stride = seq_len if packed else seq_len + 1
        self.per_epoch = (n_tokens - 1) // seq_len if packed else n_tokens // (seq_len + 1)
        if self.per_epoch < 1:
            raise ValueError(f"a split of {n_tokens} tokens holds no sequence of {seq_len} + 1 tokens")
        self.slack = n_tokens - 1 - self.per_epoch * seq_len if packed else 0
        self._epoch: int | None = None
        self._perm: np.ndarray | None = None
        self._offset = 0

    def _load_epoch(self, epoch: int) -> None:
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm = rng.permutation(self.per_epoch)
            self._offset = int(rng.integers(0, self.slack + 1))
            self._epoch = epoch

    def starts(self, indices: np.ndarray) -> np.ndarray:
        """Token offsets of the given global sequence indices (any order, any epochs)."""
        indices = np.asarray(indices, dtype=np.int64)
        out = np.empty_like(indices)
        epochs, positions = np.divmod(indices, self.per_epoch)
        for epoch in np.unique(epochs):
            self._load_epoch(int(epoch))
            mask = epochs == epoch
            out[mask] = self._offset + self.stride * self._perm[positions[mask]]
        return out


def step_indices(step: int, seqs_per_step: int, rank: int = 0, world_size: int = 1) -> np.ndarray:
    """Global sequence indices that rank `rank` of `world_size` trains on at optimizer step `step`."""
    if seqs_per_step % world_size:
        raise ValueError(f"{seqs_per_step} sequences per step do not split over {world_size} ranks")
    local = seqs_per_step // world_size
    first = step * seqs_per_step + rank * local
    return np.arange(first, first + local, dtype=np.int64)
