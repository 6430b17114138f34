"""Whole matrices out of FSDP2-sharded ones, and back.

Under FSDP2 a parameter, its gradient and its optimizer state are DTensors sharded along dim 0.
Element-wise stages (momentum, second moments, NSR/VS) and norms work on them as they are (DTensor
reduces across shards where an op needs it); orthogonalization does not commute with sharding, so
the Orthogonalize stage gathers each matrix whole, orthogonalizes it on every rank (the same input
gives the same output), and keeps the rank's own rows: the result equals the single-device one.
On plain tensors both functions return their input.
"""

from __future__ import annotations

import inspect

import torch

try:
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # a torch built without distributed support
    DTensor, distribute_tensor = (), None

# torch >= 2.6: slice the local shard out of an identical full tensor without communication
_LOCAL_SLICE = {"src_data_rank": None} if distribute_tensor and "src_data_rank" in inspect.signature(distribute_tensor).parameters else {}


def gather_whole(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.full_tensor() if isinstance(t, DTensor) else t for t in tensors]


def shard_like(wholes: list[torch.Tensor], like: list[torch.Tensor]) -> list[torch.Tensor]:
    return [distribute_tensor(w, ref.device_mesh, ref.placements, **_LOCAL_SLICE) if isinstance(ref, DTensor) else w
            for w, ref in zip(wholes, like)]
