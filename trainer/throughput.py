"""Model FLOPs utilisation and peak memory, for metrics.csv's `mfu` and `peak_memory_gb` columns.

    mfu = flops_per_token · tokens/s / (peak FLOP/s per device · devices)
    flops_per_token = 6 N · gradient evaluations per step,   N = hidden matrices + LM head

6N is the forward (2N) and backward (4N) matmul work per token (Kaplan et al. 2020); embedding
lookups do no matmul and the attention scores (12 · layers · seq_len · width per token) are left out,
as in nanoGPT's and torchtitan's MFU. The peak is `trainer.peak_flops` when set (the datasheet's:
an H100 SXM's dense bf16 is 989e12), else measured once: the best of a few large matmuls in the
run's compute dtype on the run's device.
"""

from __future__ import annotations

import resource
import sys
import time

import torch
import torch.nn as nn

from models import count_parameters


def flops_per_token(model: nn.Module) -> int:
    head = model.lm_head.weight
    return 6 * (count_parameters(model).hidden_matrices + head.shape[0] * head.shape[1])


def measured_peak_flops(device: torch.device, dtype: torch.dtype, size: int | None = None, repeats: int = 5) -> float:
    """FLOP/s of the best of `repeats` (size x size) @ (size x size) matmuls (8192 on CUDA, 1024 elsewhere)."""
    size = size or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 1):  # the first is a warm-up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def peak_memory_gb(device: torch.device) -> float:
    """The most memory this process has held: CUDA's peak allocation on a GPU, else the peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / 1e9 if sys.platform == "darwin" else rss * 1024 / 1e9
