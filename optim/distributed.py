"""Orthogonalization divided among ranks: each matrix has one owner rank that runs its Newton–Schulz.

Orthogonalization needs whole matrices, so without coordination every rank would orthogonalize every
matrix (8 GPUs, 8 times the work). Here each matrix gets one owner, chosen to balance the
Newton–Schulz cost ≈ steps · s² · (2l + s) (s = min(m, n), l = max(m, n): per step one s×s Gram, its
square and one s×s by s×l product), by the longest-first greedy rule; every rank computes the same
assignment from the shapes alone. An owner orthogonalizes its matrices in same-shape stacks.

    FSDP2 (DTensors sharded along dim 0)   all-to-all: every rank sends its rows of matrix j to
                                           owner(j); the owner orthogonalizes the whole matrix and
                                           sends each rank its rows back (Dion's and torchtitan's
                                           DistMuon pattern). No rank ever holds all the matrices.
                                           HSDP (sharded within a node, replicated across nodes): the
                                           same within each node's shard group.
    DDP (replicated tensors, opted in with ``MatrixOptimizer.split_orthogonalization()``)
                                           each rank orthogonalizes the matrices it owns, then each
                                           owner broadcasts its results to every rank.
    one process, or nothing opted in       every matrix here, as before.

Element-wise stages (momentum, second moments, NSR/VS) and norms work on the shards as they are, and
the result equals the single-device one (the owner runs the same computation on the same input).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import torch

try:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor
except ImportError:  # a torch built without distributed support
    dist, DTensor, Shard, distribute_tensor = None, (), None, None

# torch >= 2.6: slice the local shard out of an identical full tensor without communication
_LOCAL_SLICE = {"src_data_rank": None} if distribute_tensor and "src_data_rank" in inspect.signature(distribute_tensor).parameters else {}

Orthogonalize = Callable[[list[torch.Tensor]], list[torch.Tensor]]


def gather_whole(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.full_tensor() if isinstance(t, DTensor) else t for t in tensors]


def shard_like(wholes: list[torch.Tensor], like: list[torch.Tensor]) -> list[torch.Tensor]:
    return [distribute_tensor(w, ref.device_mesh, ref.placements, **_LOCAL_SLICE) if isinstance(ref, DTensor) else w
            for w, ref in zip(wholes, like)]


def newton_schulz_cost(shape: Sequence[int], steps: int = 5) -> int:
    s, l = sorted(shape[-2:])
    return steps * s * s * (2 * l + s)


def assign_owners(shapes: Sequence[Sequence[int]], world_size: int) -> list[int]:
    """The owner rank of each matrix: the most expensive first, each to the least-loaded rank (ties: the
    lowest rank), so that the busiest rank's Newton–Schulz cost is within one matrix of the mean."""
    load, owners = [0] * world_size, [0] * len(shapes)
    for i in sorted(range(len(shapes)), key=lambda i: -newton_schulz_cost(shapes[i])):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owners[i] = rank
        load[rank] += newton_schulz_cost(shapes[i])
    return owners


def shard_rows(n_rows: int, world_size: int) -> list[int]:
    """Rows of each rank's Shard(0) piece of an n_rows-row tensor (torch.chunk's rule, as DTensor's)."""
    chunk = -(-n_rows // world_size)
    return [max(0, min(n_rows, (r + 1) * chunk) - r * chunk) for r in range(world_size)]


def orthogonalize_distributed(orthogonalize: Orthogonalize, updates: list[torch.Tensor],
                              replicated_over=None) -> list[torch.Tensor]:
    """`orthogonalize` (a list-in, list-out batched orthogonalizer) applied to `updates`, each matrix on
    its owner rank; results in the updates' dtypes and layouts. ``replicated_over``: the process group
    (or ``dist.group.WORLD``) over which plain tensors are identical replicas (DDP), else None."""
    if updates and all(isinstance(u, DTensor) for u in updates) and _sharded_on_rows(updates):
        return _orthogonalize_fsdp(orthogonalize, updates)
    if updates and any(isinstance(u, DTensor) for u in updates):  # other layouts: gather, orthogonalize here
        return shard_like(_in_dtypes(orthogonalize(gather_whole(updates)), updates), updates)
    if replicated_over is not None and dist.is_initialized() and dist.get_world_size(replicated_over) > 1:
        return _orthogonalize_replicated(orthogonalize, updates, replicated_over)
    return _in_dtypes(orthogonalize(updates), updates)


def _in_dtypes(outputs: list[torch.Tensor], like: list[torch.Tensor]) -> list[torch.Tensor]:
    return [o.to(u.dtype) for o, u in zip(outputs, like)]


def row_shard_dim(t: torch.Tensor) -> int | None:
    """The mesh dimension a DTensor's rows are sharded over, when they are sharded over exactly one and
    replicated over any others: FSDP2's (Shard(0),), HSDP's (Replicate(), Shard(0)); else None."""
    placements = tuple(t.placements)
    shards = [i for i, p in enumerate(placements) if p == Shard(0)]
    if len(shards) == 1 and all(p.is_replicate() for i, p in enumerate(placements) if i != shards[0]):
        return shards[0]
    return None


def _sharded_on_rows(updates: list[torch.Tensor]) -> bool:
    dim = row_shard_dim(updates[0])
    return dim is not None and all(u.device_mesh == updates[0].device_mesh and row_shard_dim(u) == dim for u in updates)


def _owned(orthogonalize: Orthogonalize, wholes: dict[int, torch.Tensor], like: list[torch.Tensor]) -> dict[int, torch.Tensor]:
    out = orthogonalize(list(wholes.values()))
    return {j: o.to(like[j].dtype) for j, o in zip(wholes, out)}


def _orthogonalize_fsdp(orthogonalize: Orthogonalize, updates: list[torch.Tensor]) -> list[torch.Tensor]:
    """Row shards to their owners and back, within the mesh dimension the rows are sharded over (under
    HSDP each replica group does the same work on the same values)."""
    mesh, dim = updates[0].device_mesh, row_shard_dim(updates[0])
    group, world, rank = mesh.get_group(dim), mesh.size(dim), mesh.get_local_rank(dim)
    shapes = [tuple(u.shape) for u in updates]
    owners = assign_owners(shapes, world)
    rows = [shard_rows(m, world) for m, _ in shapes]
    locals_ = [u.to_local().contiguous() for u in updates]
    device, dtype = locals_[0].device, locals_[0].dtype
    mine = [j for j in range(len(updates)) if owners[j] == rank]

    # 1. to the owners: rank r's rows of every matrix owned by o, in matrix order
    send = [torch.cat([locals_[j].reshape(-1).to(dtype) for j in range(len(updates)) if owners[j] == o] or
                      [torch.empty(0, device=device, dtype=dtype)]) for o in range(world)]
    receive_sizes = [sum(rows[j][r] * shapes[j][1] for j in mine) for r in range(world)]
    received = _all_to_all(send, receive_sizes, group, device, dtype)
    wholes = {}
    offsets = [0] * world
    for j in mine:
        pieces = []
        for r in range(world):
            size = rows[j][r] * shapes[j][1]
            pieces.append(received[r][offsets[r]:offsets[r] + size].view(rows[j][r], shapes[j][1]))
            offsets[r] += size
        wholes[j] = torch.cat(pieces).to(updates[j].dtype)

    # 2. the owner orthogonalizes its matrices; 3. back to every rank, its own rows
    results = _owned(orthogonalize, wholes, updates)
    starts = [[sum(rows[j][:r]) for r in range(world)] for j in range(len(updates))]
    send = [torch.cat([results[j][starts[j][r]:starts[j][r] + rows[j][r]].reshape(-1).to(dtype) for j in mine] or
                      [torch.empty(0, device=device, dtype=dtype)]) for r in range(world)]
    receive_sizes = [sum(rows[j][rank] * shapes[j][1] for j in range(len(updates)) if owners[j] == o) for o in range(world)]
    received = _all_to_all(send, receive_sizes, group, device, dtype)
    out, offsets = [], [0] * world
    for j, u in enumerate(updates):
        o, size = owners[j], rows[j][rank] * shapes[j][1]
        local = received[o][offsets[o]:offsets[o] + size].view(rows[j][rank], shapes[j][1]).to(u.dtype)
        offsets[o] += size
        out.append(DTensor.from_local(local, mesh, u.placements, run_check=False, shape=u.shape, stride=u.stride()))
    return out


def _all_to_all(send: list[torch.Tensor], receive_sizes: list[int], group, device, dtype) -> list[torch.Tensor]:
    """One all_to_all_single of uneven flat pieces: send[r] goes to rank r; returns what each rank sent here."""
    output = torch.empty(sum(receive_sizes), device=device, dtype=dtype)
    dist.all_to_all_single(output, torch.cat(send), receive_sizes, [t.numel() for t in send], group=group)
    return list(output.split(receive_sizes))


def _orthogonalize_replicated(orthogonalize: Orthogonalize, updates: list[torch.Tensor], group) -> list[torch.Tensor]:
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    owners = assign_owners([tuple(u.shape) for u in updates], world)
    results = _owned(orthogonalize, {j: u for j, u in enumerate(updates) if owners[j] == rank}, updates)
    dtype, device = updates[0].dtype, updates[0].device
    sizes = [sum(updates[j].numel() for j in range(len(updates)) if owners[j] == r) for r in range(world)]
    # each owner broadcasts its results as one flat buffer (gloo's all_gather was 6x slower than
    # broadcasts of the same bytes on CPU; on NCCL the two move the same volume)
    flat = [torch.empty(sizes[r], device=device, dtype=dtype) for r in range(world)]
    if results:
        torch.cat([o.reshape(-1).to(dtype) for o in results.values()], out=flat[rank])
    for r in range(world):
        if sizes[r]:
            dist.broadcast(flat[r], src=dist.get_global_rank(group, r), group=group)
    out, offsets = [], [0] * world
    for j, u in enumerate(updates):
        o = owners[j]
        out.append(results[j] if o == rank else flat[o][offsets[o]:offsets[o] + u.numel()].view_as(u).to(u.dtype))
        offsets[o] += u.numel()
    return out
