"""Model FLOPs utilisation and peak memory, for metrics.csv's `mfu` and `peak_memory_gb` columns.

    mfu = flops_per_token · tokens/s / (peak FLOP/s per device · devices)
    flops_per_token = (6 N + 12 L T d) · gradient evaluations per step

N = hidden matrices + LM head, L layers, T = seq_len, d = width. 6N is the forward (2N) and backward
(4N) matmul work per token (Kaplan et al. 2020; embedding lookups do no matmul); 12 L T d is the
attention scores and their weighted sum (q·kᵀ and A·v: 2 · 2 T d per layer forward, twice that
backward), counted over the whole T × T square as nanoGPT's `estimate_mfu` and torchtitan's
`get_num_flop_per_token` do (a causal kernel does about half of it).

The peak per device, in this order: `trainer.peak_flops` when set; the datasheet's dense tensor-core
figure for a known CUDA device (bf16/fp16 for mixed precision, TF32 for fp32, which
`torch.set_float32_matmul_precision("high")` lets matmuls use); else measured once, the best of a few
large matmuls in the run's compute dtype on the run's device. metrics.csv names the source in the
column holding the figure: peak_tflops_config, peak_tflops_datasheet or peak_tflops_measured.
"""

from __future__ import annotations

import resource
import sys
import time

import torch
import torch.nn as nn

from models import count_parameters

# dense tensor-core TFLOP/s per device from NVIDIA's datasheets: (name contains, bf16/fp16, tf32); the
# first match wins, so the specific names (PCIe, NVL, GH200, L40S) come before the families
DATASHEET_TFLOPS = (
    ("H100 PCIe", 756.0, 378.0),
    ("H100 NVL", 835.0, 418.0),
    ("H200 NVL", 835.0, 418.0),
    ("GH200", 989.0, 494.0),
    ("H100", 989.0, 494.0),  # SXM5 ("NVIDIA H100 80GB HBM3")
    ("H200", 989.0, 494.0),  # SXM
    ("B200", 2250.0, 1100.0),
    ("A100", 312.0, 156.0),
    ("L40S", 362.0, 183.0),
    ("L4", 121.0, 60.0),
)


def flops_per_token(model: nn.Module, seq_len: int) -> int:
    """6 N + 12 L T d: the matmul FLOPs of one token's forward and backward (module docstring)."""
    head = model.lm_head.weight
    attention = 12 * len(model.blocks) * seq_len * model.config.n_embd
    return 6 * (count_parameters(model).hidden_matrices + head.shape[0] * head.shape[1]) + attention


def datasheet_peak_flops(device_name: str, mixed_precision: bool) -> float | None:
    """The datasheet's dense peak FLOP/s of a CUDA device by its name, or None for one not listed."""
    for part, half, tf32 in DATASHEET_TFLOPS:
        if part in device_name:
            return (half if mixed_precision else tf32) * 1e12
    return None


def peak_flops(device: torch.device, precision: str, configured: float | None) -> tuple[float, str]:
    """(peak FLOP/s per device, where it came from: "config", "datasheet" or "measured")."""
    if configured is not None:
        return float(configured), "config"
    mixed = precision.startswith(("bf16", "16"))
    if device.type == "cuda":
        known = datasheet_peak_flops(torch.cuda.get_device_name(device), mixed)
        if known is not None:
            return known, "datasheet"
    dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float16 if precision.startswith("16") else torch.float32
    return measured_peak_flops(device, dtype), "measured"


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
