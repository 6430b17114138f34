"""Per-matrix work divided among ranks: each matrix has one owner rank that runs its Newton–Schulz.

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

`on_owners` is the general form: any per-matrix work that needs whole tensors (Dion's power
iteration on DDP replicas takes M, G and Q, and returns D, the new M and the new Q; under FSDP2 only
its QRs of M Q need owners), in one exchange each way (DDP: broadcasts in buckets; outputs that only
their owner needs, as Dion's M and Q, stay there until `broadcast_from_owners`); the owner plan
(owners, rows, offsets) is computed once per shape signature. Work that splits by rows needs no owners:
`gather_row_shards` collects small per-row factors from every rank in one all-gather (Dion's Q under
FSDP2, optim/stages.py). Orthogonalization sends its matrices in the Newton–Schulz dtype (bf16 on a
GPU: half the bytes, the same bits).

Element-wise stages (momentum, second moments, NSR/VS) work on the shards as they are; whole-matrix
norms and means come from the shards' with one all-reduce for a whole group (`whole_norms`,
`sum_over_row_shards`). The result equals the single-device one (the owner runs the same computation
on the same input).
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

try:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
except ImportError:  # a torch built without distributed support
    dist, DTensor, Replicate, Shard, distribute_tensor = None, (), None, None, None

# torch >= 2.6: slice the local shard out of an identical full tensor without communication
_LOCAL_SLICE = {"src_data_rank": None} if distribute_tensor and "src_data_rank" in inspect.signature(distribute_tensor).parameters else {}

Orthogonalize = Callable[[list[torch.Tensor]], list[torch.Tensor]]


def gather_whole(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.full_tensor() if isinstance(t, DTensor) else t for t in tensors]


def local_tensors(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each DTensor's local shard (a view: in-place ops on it change the DTensor), plain tensors as they are."""
    return [t.to_local() if isinstance(t, DTensor) else t for t in tensors]


def like_dtensors(locals_: list[torch.Tensor], like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Local results wrapped as DTensors of the same global shape and layout as `like`'s (plain ones as they are)."""
    return [DTensor.from_local(t, ref.device_mesh, ref.placements, run_check=False, shape=ref.shape, stride=ref.stride())
            if isinstance(ref, DTensor) else t for t, ref in zip(locals_, like)]


def rows_like(pieces: list[torch.Tensor], like: list[torch.Tensor]) -> list[torch.Tensor]:
    """This rank's row pieces (plain tensors of any columns) as DTensors sharded by rows as the row-sharded
    `like[j]` is: (rows of like[j], the piece's columns) in all."""
    return [DTensor.from_local(t, ref.device_mesh, ref.placements, run_check=False, shape=(ref.shape[0], *t.shape[1:]),
                               stride=(math.prod(t.shape[1:]), *t.stride()[1:])) for t, ref in zip(pieces, like)]


def sum_over_row_shards(values: torch.Tensor, like: list[torch.Tensor]) -> torch.Tensor:
    """`values` (computed from local row shards of the matrices `like`) summed over the ranks those rows are
    sharded across: one all-reduce under FSDP2/HSDP, nothing for plain tensors."""
    sharded = [t for t in like if isinstance(t, DTensor)]
    if sharded:
        if not _sharded_on_rows(sharded) or len(sharded) < len(like):
            raise NotImplementedError("a mix of plain tensors and DTensors, or DTensors not sharded on rows over one "
                                      f"mesh dimension (placements {sharded[0].placements})")
        dist.all_reduce(values, group=shard_group(sharded[0])[0])
    return values


def row_sharded(tensors: list[torch.Tensor]) -> bool:
    """Whether `tensors` are all DTensors sharded on rows over one mesh dimension of one mesh (FSDP2, HSDP)."""
    return bool(tensors) and all(isinstance(t, DTensor) for t in tensors) and _sharded_on_rows(tensors)


def gather_row_shards(pieces: list[torch.Tensor], like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Whole tensors on every rank from this rank's row shards `pieces` (plain tensors), each split by rows
    as the row-sharded DTensor `like[j]` is (same number of rows; any columns): one all-gather for all of
    them, each rank's rows as one flat piece (padded to the longest), where DTensor.full_tensor() would
    make one per tensor."""
    group, world, rank = shard_group(like[0])
    rows = [shard_rows(ref.shape[0], world) for ref in like]
    row_numel = [math.prod(piece.shape[1:]) for piece in pieces]
    sizes = [[r[k] * n for r, n in zip(rows, row_numel)] for k in range(world)]  # sizes[k][j]: rank k's numbers of tensor j
    longest = max(sum(s) for s in sizes)
    send = torch.empty(longest, device=pieces[0].device, dtype=pieces[0].dtype)  # the padding is never read
    torch.cat([piece.reshape(-1) for piece in pieces], out=send[:sum(sizes[rank])])
    received = torch.empty(world * longest, device=send.device, dtype=send.dtype)
    _all_gather(received, send, group)
    received = received.view(world, longest)
    from_rank = [received[k, :sum(sizes[k])].split(sizes[k]) for k in range(world)]
    return [torch.cat([from_rank[k][j].view(rows[j][k], *piece.shape[1:]) for k in range(world)])
            for j, piece in enumerate(pieces)]


def own_rows(wholes: list[torch.Tensor], like: list[torch.Tensor]) -> list[torch.Tensor]:
    """This rank's rows of each whole tensor (views), split by rows as the row-sharded DTensor `like[j]` is."""
    _, world, rank = shard_group(like[0])
    return [whole[sum(rows[:rank]):sum(rows[:rank + 1])]
            for whole, rows in zip(wholes, (shard_rows(ref.shape[0], world) for ref in like))]


def shard_group(t: torch.Tensor):
    """(process group, its size, this rank's index in it) of the mesh dimension a row-sharded DTensor's rows
    are sharded over."""
    mesh, dim = t.device_mesh, row_shard_dim(t)
    return mesh.get_group(dim), mesh.size(dim), mesh.get_local_rank(dim)


def _all_gather(output: torch.Tensor, input_: torch.Tensor, group) -> None:
    # torch >= 2.13 names it all_gather_single (all_gather_into_tensor, the older name, warns there)
    (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(output, input_, group=group)


def whole_norms(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The Frobenius norm of each whole tensor, as 0-dim tensors on the device (no host sync). Row-sharded
    DTensors (FSDP2, HSDP) take the norms of their local shards and one all-reduce of all the squares
    over the shard group, not one collective per tensor; plain tensors need none."""
    if not tensors:
        return []
    return list(_whole_squares(tensors).sqrt().to(tensors[0].dtype).unbind())


def _whole_squares(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Each whole tensor's squared norm, accumulated in float64 (fp32 sums over millions of numbers
    differ between a shard and the whole by ~1e-5), summed over row shards."""
    squares = torch.stack(torch._foreach_norm(local_tensors(tensors), 2, dtype=torch.float64)).square()
    return sum_over_row_shards(squares, tensors)


def global_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """‖(t_1, …, t_k)‖, the norm of all the whole tensors together (0-dim float64, on the device; one
    all-reduce under FSDP2, none otherwise)."""
    return _whole_squares(tensors).sum().sqrt()


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


@functools.lru_cache(maxsize=1024)
def shard_rows(n_rows: int, world_size: int) -> tuple[int, ...]:
    """Rows of each rank's Shard(0) piece of an n_rows-row tensor (torch.chunk's rule, as DTensor's); cached,
    as every step asks again for the same shapes."""
    chunk = -(-n_rows // world_size)
    return tuple(max(0, min(n_rows, (r + 1) * chunk) - r * chunk) for r in range(world_size))


Compute = Callable[..., Sequence[list[torch.Tensor]]]


def orthogonalize_distributed(orthogonalize: Orthogonalize, updates: list[torch.Tensor], replicated_over=None,
                              payload_dtype: torch.dtype | None = None, cast_back: bool = True) -> list[torch.Tensor]:
    """`orthogonalize` (a list-in, list-out batched orthogonalizer) applied to `updates`, each matrix on
    its owner rank; results in the updates' layouts, and dtypes unless not `cast_back`. ``replicated_over``:
    the process group (or ``dist.group.WORLD``) over which plain tensors are identical replicas (DDP), else
    None. ``payload_dtype``: the dtype matrices travel in, both ways: the orthogonalizer's compute dtype
    (bf16 Newton–Schulz: half the bytes of fp32, and the same bits, as it casts its input first and
    its output is in that dtype)."""
    return on_owners(lambda wholes: (orthogonalize(wholes),), [updates], outputs_like=(0,), replicated_over=replicated_over,
                     payload_dtype=payload_dtype, cast_back=cast_back)[0]


def on_owners(compute: Compute, inputs: list[list[torch.Tensor]], outputs_like: Sequence[int], replicated_over=None,
              payload_dtype: torch.dtype | None = None, cast_back: bool = True,
              kept_by_owners: Sequence[int] = ()) -> list[list[torch.Tensor]]:
    """Per-matrix work that needs whole matrices, each matrix on one owner rank.

    `inputs` are fields, each a list with one tensor per matrix (e.g. [momenta, Qs]); `compute` gets,
    for each field, the whole tensors of the matrices this rank owns, and returns output fields, lists
    aligned with them. Output field k has the shapes and layout of input field `outputs_like[k]` and
    comes back in its dtypes (with ``cast_back=False``: in the dtype it was computed in, or travelled in).
    FSDP2/HSDP row shards go to their owners in one all-to-all and the outputs' rows come back in another;
    DDP replicas (``replicated_over``) are computed by their owners and broadcast, except the output fields
    in `kept_by_owners`: a rank gets back its own outputs of those for the matrices it owns and its inputs
    (as they were) for the others, which the caller brings up to date with `broadcast_from_owners` when it
    needs them; otherwise everything is computed here. Tensors travel in `payload_dtype` (default: the
    first input's)."""
    everything = [t for field in inputs for t in field]
    if row_sharded(everything):
        return _on_owners_sharded(compute, inputs, outputs_like, payload_dtype, cast_back)
    if any(isinstance(t, DTensor) for t in everything):  # other layouts: gather, compute here
        outputs = _in_dtypes(compute(*[gather_whole(field) for field in inputs]), inputs, outputs_like, cast_back)
        return [shard_like(out, inputs[like]) for out, like in zip(outputs, outputs_like)]
    if divides_replicas(everything, replicated_over):
        return _on_owners_replicated(compute, inputs, outputs_like, replicated_over, payload_dtype, cast_back, kept_by_owners)
    return _in_dtypes(compute(*inputs), inputs, outputs_like, cast_back)


def divides_replicas(tensors: list[torch.Tensor], replicated_over) -> bool:
    """Whether `on_owners` divides these tensors' matrices among the ranks of ``replicated_over`` (DDP replicas:
    plain tensors, a group of more than one rank)."""
    return bool(tensors) and replicated_over is not None and dist.is_initialized() and \
        dist.get_world_size(replicated_over) > 1 and not any(isinstance(t, DTensor) for t in tensors)


def broadcast_from_owners(fields: list[list[torch.Tensor]], replicated_over) -> None:
    """fields[f][j], in place on every rank of ``replicated_over``, from the rank that owns matrix j in
    `on_owners`' assignment (by the shapes of field 0, as on_owners assigns by its first input field): what
    its `kept_by_owners` outputs left current on the owners only. Every rank calls it."""
    world = dist.get_world_size(replicated_over)
    owners = owner_plan((tuple(tuple(t.shape) for t in fields[0]),), world).owners
    pending = [dist.broadcast(t, src=dist.get_global_rank(replicated_over, owners[j]), group=replicated_over, async_op=True)
               for field in fields for j, t in enumerate(field)]
    for work in pending:
        work.wait()


def _in_dtypes(outputs, inputs, outputs_like, cast_back: bool) -> list[list[torch.Tensor]]:
    return [[_cast(o, t.dtype, cast_back) for o, t in zip(out, inputs[like])] for out, like in zip(outputs, outputs_like)]


def _cast(t: torch.Tensor, dtype: torch.dtype, cast_back: bool) -> torch.Tensor:
    return t.to(dtype) if cast_back else t


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


@dataclass(frozen=True)
class OwnerPlan:
    """Who owns which matrix and how many numbers of each field each rank holds: computed once per shape
    signature (every step of a run has the same) and world size."""

    owners: tuple[int, ...]
    owned: tuple[tuple[int, ...], ...]  # owned[o]: the matrices rank o owns, in matrix order
    rows: tuple[tuple[tuple[int, ...], ...], ...]  # rows[f][j][r]: rank r's rows of field f's tensor j
    starts: tuple[tuple[tuple[int, ...], ...], ...]  # starts[f][j][r]: the first of them
    row_numel: tuple[tuple[int, ...], ...]  # row_numel[f][j]: numbers in one row of field f's tensor j

    def numel(self, fields: Sequence[int], matrices: Sequence[int], rank: int) -> int:
        """Numbers rank `rank` holds of `fields` of `matrices`."""
        return sum(self.rows[f][j][rank] * self.row_numel[f][j] for j in matrices for f in fields)


@functools.lru_cache(maxsize=64)
def owner_plan(shapes: tuple[tuple[tuple[int, ...], ...], ...], world: int) -> OwnerPlan:
    """shapes[f][j]: the shape of field f's tensor of matrix j; owners by field 0's Newton–Schulz cost."""
    owners = tuple(assign_owners(shapes[0], world))
    rows = tuple(tuple(shard_rows(shape[0], world) for shape in field) for field in shapes)
    starts = tuple(tuple(tuple(sum(r[:k]) for k in range(world)) for r in field) for field in rows)
    return OwnerPlan(owners=owners, owned=tuple(tuple(j for j, o in enumerate(owners) if o == r) for r in range(world)),
                     rows=rows, starts=starts, row_numel=tuple(tuple(math.prod(s[1:]) for s in field) for field in shapes))


def _on_owners_sharded(compute: Compute, inputs, outputs_like, payload_dtype, cast_back) -> list[list[torch.Tensor]]:
    """Row shards to their owners and back, within the mesh dimension the rows are sharded over (under
    HSDP each replica group does the same work on the same values)."""
    first = inputs[0][0]
    mesh, (group, world, rank) = first.device_mesh, shard_group(first)
    locals_ = [[t.to_local() for t in field] for field in inputs]
    if world == 1:  # one rank holds every row: the local tensors are the whole ones
        outputs = _in_dtypes(compute(*locals_), locals_, outputs_like, cast_back)
        return [like_dtensors(out, inputs[like]) for out, like in zip(outputs, outputs_like)]
    plan = owner_plan(tuple(tuple(tuple(t.shape) for t in field) for field in inputs), world)
    device, dtype = locals_[0][0].device, payload_dtype or first.dtype
    fields, mine = range(len(inputs)), plan.owned[rank]

    # 1. to the owners: this rank's rows of every field of every matrix owned by o, in matrix order
    send = [[locals_[f][j] for j in plan.owned[o] for f in fields] for o in range(world)]
    received, buffers = _all_to_all(send, [plan.numel(fields, mine, r) for r in range(world)], group, device, dtype)
    wholes, offsets = [[] for _ in fields], [0] * world
    for j in mine:
        for f in fields:
            shape, pieces = inputs[f][j].shape, []
            for r in range(world):
                size = plan.rows[f][j][r] * plan.row_numel[f][j]
                pieces.append(received[r][offsets[r]:offsets[r] + size].view(plan.rows[f][j][r], *shape[1:]))
                offsets[r] += size
            wholes[f].append(torch.cat(pieces))

    # 2. the owner computes; 3. back to every rank, its own rows of each output
    outputs = compute(*wholes)
    out_fields = range(len(outputs_like))
    send = [[outputs[k][i][plan.starts[outputs_like[k]][j][r]:][:plan.rows[outputs_like[k]][j][r]]
             for i, j in enumerate(mine) for k in out_fields] for r in range(world)]
    sizes = [sum(plan.numel([outputs_like[k]], [j], rank) for j in plan.owned[o] for k in out_fields) for o in range(world)]
    # the wholes are copies, so both buffers are free: the receive buffer had lived through compute already, the
    # send buffer now does too (on a GPU, one more rank's share of the matrices at the peak)
    received, _ = _all_to_all(send, sizes, group, device, dtype, spare=buffers)
    results, offsets = [[None] * len(inputs[0]) for _ in out_fields], [0] * world
    for j, o in enumerate(plan.owners):
        for k in out_fields:
            ref = inputs[outputs_like[k]][j]
            size = plan.rows[outputs_like[k]][j][rank] * plan.row_numel[outputs_like[k]][j]
            local = received[o][offsets[o]:offsets[o] + size].view(plan.rows[outputs_like[k]][j][rank], *ref.shape[1:])
            offsets[o] += size
            results[k][j] = DTensor.from_local(_cast(local, ref.dtype, cast_back), mesh, ref.placements, run_check=False, shape=ref.shape,
                                               stride=ref.stride())
    return results


def _all_to_all(send: list[list[torch.Tensor]], receive_sizes: list[int], group, device, dtype,
                spare: Sequence[torch.Tensor] = ()) -> tuple[list[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """One all_to_all_single of uneven flat pieces: the tensors send[r] go to rank r, each copied once, cast to
    `dtype`, into one flat buffer (the copy takes any strides: row slices of a transposed Newton–Schulz
    result). Returns what each rank sent here, and the send and receive buffers, which the next exchange
    of a step may take as its `spare` ones, so that its buffers are memory already in use (on a CPU, a
    fresh buffer over glibc's 32 MB mmap limit is faulted in page by page while the collective writes it:
    the way back took 0.9-1.1 s where the same bytes, in pages already mapped, took 0.1 s)."""
    spare = list(spare)

    def buffer(numel: int) -> torch.Tensor:
        fits = [i for i, b in enumerate(spare) if b.numel() >= numel and b.dtype == dtype and b.device == device]
        return spare.pop(min(fits, key=lambda i: spare[i].numel()))[:numel] if fits else \
            torch.empty(numel, device=device, dtype=dtype)

    send_sizes = [sum(t.numel() for t in tensors) for tensors in send]
    flat, offset = buffer(sum(send_sizes)), 0
    for t in (t for tensors in send for t in tensors):
        flat[offset:offset + t.numel()].view(t.shape).copy_(t)
        offset += t.numel()
    output = buffer(sum(receive_sizes))
    dist.all_to_all_single(output, flat, receive_sizes, send_sizes, group=group)
    return list(output.split(receive_sizes)), (flat, output)


BROADCAST_BUCKET_BYTES = 25 * 2**20  # DDP's bucket_cap_mb; on a CPU also below glibc's 32 MB mmap limit


def _on_owners_replicated(compute: Compute, inputs, outputs_like, group, payload_dtype, cast_back,
                          kept_by_owners: Sequence[int]) -> list[list[torch.Tensor]]:
    """Replicas (DDP): each owner computes its matrices, then broadcasts their outputs in flat buckets of
    up to BROADCAST_BUCKET_BYTES (a larger tensor alone), every broadcast in flight at once; the results
    are views of the buckets. One flat buffer per owner took fresh pages every step on a CPU (past 32 MB
    glibc maps each allocation anew): receiving Dion's outputs so took 0.7 s where the bytes take 0.25 s.
    (gloo's all_gather was 6x slower than broadcasts of the same bytes on CPU.) Fields `kept_by_owners` are
    not sent: each rank's own outputs where it owns the matrix, its inputs elsewhere."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    plan = owner_plan(tuple(tuple(tuple(t.shape) for t in field) for field in inputs), world)
    first = inputs[0][0]
    device, dtype = first.device, payload_dtype or first.dtype
    mine = {j: i for i, j in enumerate(plan.owned[rank])}
    outputs = compute(*[[field[j] for j in mine] for field in inputs])
    shapes = [[inputs[like][j].shape for like in outputs_like] for j in range(len(inputs[0]))]  # shapes[j][k]
    numel = [[math.prod(shape) for shape in of_j] for of_j in shapes]
    payloads, pending = [[None] * len(inputs[0]) for _ in outputs_like], []
    for k in kept_by_owners:
        payloads[k] = [outputs[k][mine[j]] if j in mine else field_j for j, field_j in enumerate(inputs[outputs_like[k]])]
    sent = [k for k in range(len(outputs_like)) if k not in kept_by_owners]
    for owner, bucket in _buckets(plan, numel, BROADCAST_BUCKET_BYTES // dtype.itemsize, sent):
        flat = torch.empty(sum(numel[j][k] for j, k in bucket), device=device, dtype=dtype)
        if owner == rank:
            torch.cat([outputs[k][mine[j]].reshape(-1).to(dtype) for j, k in bucket], out=flat)
        pending.append(dist.broadcast(flat, src=dist.get_global_rank(group, owner), group=group, async_op=True))
        for (j, k), piece in zip(bucket, flat.split([numel[j][k] for j, k in bucket])):
            payloads[k][j] = piece.view(shapes[j][k])  # every rank goes on with these: the same bits everywhere
    for work in pending:
        work.wait()
    return _in_dtypes(payloads, inputs, outputs_like, cast_back)


def _buckets(plan: OwnerPlan, numel: list[list[int]], limit: int, outputs: Sequence[int]) -> list[tuple[int, list[tuple[int, int]]]]:
    """(owner, [(matrix j, output k), ...]) buckets of each owner's outputs k in `outputs`, in order,
    each of at most `limit` numbers unless one output alone is larger: the same list on every rank (it
    depends on shapes only)."""
    buckets = []
    for owner, owned in enumerate(plan.owned):
        current, size = [], 0
        for j in owned:
            for k in outputs:
                n = numel[j][k]
                if current and size + n > limit:
                    buckets.append((owner, current))
                    current, size = [], 0
                current.append((j, k))
                size += n
        if current:
            buckets.append((owner, current))
    return buckets
