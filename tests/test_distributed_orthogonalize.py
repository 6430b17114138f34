"""Orthogonalization divided among ranks (optim/distributed.py), in real gloo process groups of 2 and 3
ranks: FSDP2-style row shards (uneven, and a matrix with fewer rows than ranks; one rank holding every
row), HSDP (2 replicas of a 2-way sharding, 4 ranks; of a 1-way one, 2 ranks) and DDP-style replicas
(one broadcast bucket per owner, and several) give the single-process result, and each rank
orthogonalizes only the matrices it owns (under FSDP2/HSDP the exchange back reuses the way there's
buffers). Dion's power iteration on row shards, likewise."""

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode

from optim import distributed
from optim.distributed import assign_owners, newton_schulz_cost, orthogonalize_distributed, shard_rows
from optim.orthogonalize import Orthogonalizer

# uneven everywhere: 7 rows over 2 or 3 ranks, 2 rows over 3 (one rank holds none), 5 matrices for 2 or 3 ranks
SHAPES = [(7, 5), (7, 5), (12, 4), (2, 6), (9, 9)]


def matrices():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(*s, generator=g, dtype=torch.float64) for s in SHAPES]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, layout, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Replicate, Shard, distribute_tensor

        orthogonalizer = Orthogonalizer(method="newton_schulz", dtype="float64")
        seen = []
        count = lambda ms: seen.extend(tuple(m.shape) for m in ms) or orthogonalizer.apply_all(ms)  # noqa: E731
        whole = matrices()
        if layout in ("fsdp", "hsdp"):  # HSDP: 2 replicas of a 2-way row sharding
            mesh, placements = (init_device_mesh("cpu", (world,)), [Shard(0)]) if layout == "fsdp" else \
                               (init_device_mesh("cpu", (2, world // 2)), [Replicate(), Shard(0)])
            shards = world if layout == "fsdp" else world // 2
            updates = [distribute_tensor(m, mesh, placements) for m in whole]
            exchanges, all_to_all = [], dist.all_to_all_single
            dist.all_to_all_single = lambda output, input, *a, **k: exchanges.append((input.data_ptr(), output.data_ptr())) or \
                all_to_all(output, input, *a, **k)
            out = [o.full_tensor() for o in orthogonalize_distributed(count, updates)]
            dist.all_to_all_single = all_to_all
            if shards > 1:  # the way back sends from the buffer the way there received into, and receives into its send buffer
                assert len(exchanges) == 2 and exchanges[1] == exchanges[0][::-1], exchanges
            assert all(o.to_local().shape[0] == shard_rows(s[0], shards)[rank % shards] for o, s in
                       zip(orthogonalize_distributed(orthogonalizer.apply_all, updates), SHAPES))
        else:
            if layout == "ddp_buckets":  # broadcast buckets of 40 float64 numbers: several per owner, some outputs alone
                distributed.BROADCAST_BUCKET_BYTES = 40 * 8
            out = orthogonalize_distributed(count, whole, replicated_over=dist.group.WORLD)
        results[rank] = ([o.clone() for o in out], seen)
    finally:
        dist.destroy_process_group()


def run_ranks(world, layout):
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(world, free_port(), layout, results), nprocs=world)
    return dict(results)


# (1, "fsdp") and (2, "hsdp"): a shard group of one rank, which holds whole matrices and exchanges nothing
@pytest.mark.parametrize("world,layout", [(1, "fsdp"), (2, "fsdp"), (3, "fsdp"), (2, "ddp"), (3, "ddp"), (3, "ddp_buckets"),
                                          (2, "hsdp"), (4, "hsdp")])
def test_each_matrix_is_orthogonalized_once_and_every_rank_gets_the_single_process_result(world, layout):
    expected = Orthogonalizer(method="newton_schulz", dtype="float64").apply_all(matrices())
    results = run_ranks(world, layout)
    group = world // 2 if layout == "hsdp" else world  # HSDP: owners within each replica's shard group
    owners = assign_owners(SHAPES, group)
    for rank, (out, seen) in results.items():
        for o, e in zip(out, expected):
            assert torch.allclose(o, e, rtol=0, atol=1e-12)
        # the first call above is the counted one (fsdp calls twice: counted, then for the local-shape check)
        mine = [SHAPES[j] for j in range(len(SHAPES)) if owners[j] == rank % group]
        assert seen[:len(mine)] == mine
    assert sum(owners.count(r) for r in range(group)) == len(SHAPES)


def test_ddp_broadcast_buckets_hold_one_owners_outputs_in_order_up_to_the_limit():
    from optim.distributed import _buckets, owner_plan

    plan = owner_plan((tuple(SHAPES), tuple(SHAPES)), 2)
    assert plan.owned == ((4,), (0, 1, 2, 3))
    numel = [[35, 35], [35, 35], [48, 48], [12, 12], [81, 81]]  # two outputs of each matrix
    assert _buckets(plan, numel, 60, (0, 1)) == [
        (0, [(4, 0)]), (0, [(4, 1)]),  # 81 > 60: each alone
        (1, [(0, 0)]), (1, [(0, 1)]), (1, [(1, 0)]), (1, [(1, 1)]), (1, [(2, 0)]),
        (1, [(2, 1), (3, 0)]), (1, [(3, 1)])]  # 48 + 12 fit together; 35 + 35 do not
    assert len(_buckets(plan, numel, 10**6, (0, 1))) == 2  # one per owner when everything fits
    assert _buckets(plan, numel, 60, (1,))[:2] == [(0, [(4, 1)]), (1, [(0, 1)])]  # output 0 kept by its owners


def test_owners_balance_the_newton_schulz_cost():
    shapes = [(2304, 768), (768, 768), (3072, 768), (768, 3072)] * 12  # GPT-2 small's 48 hidden matrices
    for world in (2, 3, 8):
        owners = assign_owners(shapes, world)
        loads = [sum(newton_schulz_cost(s) for s, o in zip(shapes, owners) if o == r) for r in range(world)]
        assert max(loads) - min(loads) <= max(newton_schulz_cost(s) for s in shapes)
    assert newton_schulz_cost((3072, 768)) == 5 * 768**2 * (2 * 3072 + 768)
    assert shard_rows(7, 3) == (3, 3, 1) and shard_rows(2, 3) == (1, 1, 0)


class Payloads(TorchDispatchMode):
    """The dtypes and the count of numbers that the all-to-alls and broadcasts issued under it send."""

    def __init__(self):
        super().__init__()
        self.dtypes, self.numel = set(), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "c10d" and func.__name__.split(".")[0] in ("alltoall_base_", "broadcast_"):
            tensors = args[0] if isinstance(args[0], (list, tuple)) else [args[0]]
            self.dtypes.update(str(t.dtype) for t in tensors)
            self.numel += sum(t.numel() for t in tensors)
        return func(*args, **(kwargs or {}))


def _payload_worker(rank, world, port, layout, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        whole = [m.float() for m in matrices()]
        bf16 = Orthogonalizer(dtype="bfloat16").apply_all
        if layout == "fsdp":
            updates = [distribute_tensor(m, init_device_mesh("cpu", (world,)), [Shard(0)]) for m in whole]
            run = lambda **kw: [o.full_tensor() for o in orthogonalize_distributed(bf16, updates, **kw)]  # noqa: E731
        else:
            run = lambda **kw: orthogonalize_distributed(bf16, whole, replicated_over=dist.group.WORLD, **kw)  # noqa: E731
        with Payloads() as as_fp32:
            cast_after = run()
        with Payloads() as as_bf16:
            cast_before = run(payload_dtype=torch.bfloat16)
        results[rank] = (cast_after, cast_before, as_fp32.dtypes, as_bf16.dtypes)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("layout", ["fsdp", "ddp"])
def test_matrices_travel_in_the_newton_schulz_dtype_with_the_same_result(layout):
    """bf16 Newton–Schulz: sending bf16 (half the bytes) gives bit for bit what sending fp32 and casting gave."""
    results = mp.Manager().dict()
    mp.spawn(_payload_worker, args=(2, free_port(), layout, results), nprocs=2)
    for cast_after, cast_before, fp32_dtypes, bf16_dtypes in dict(results).values():
        assert all(torch.equal(a, b) and a.dtype == torch.float32 for a, b in zip(cast_after, cast_before))
        assert fp32_dtypes == {"torch.float32"} and bf16_dtypes == {"torch.bfloat16"}


def test_owner_plans_are_computed_once_per_shape_signature():
    from optim.distributed import owner_plan

    owner_plan.cache_clear()
    shapes = (tuple(SHAPES),)
    first = owner_plan(shapes, 3)
    assert owner_plan(shapes, 3) is first and owner_plan.cache_info().hits == 1
    assert first.owners == tuple(assign_owners(SHAPES, 3)) and first.rows[0][0] == (3, 3, 1)


def _dion_worker(rank, world, port, layout, results):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from optim import Dion

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mesh, placements = (init_device_mesh("cpu", (world,)), [Shard(0)]) if layout == "fsdp" else \
                           (init_device_mesh("cpu", (2, world // 2)), [Replicate(), Shard(0)])
        params, grads = dion_problem()
        sharded = [torch.nn.Parameter(distribute_tensor(p.detach(), mesh, placements)) for p in params]
        optimizer = Dion(sharded, lr=0.1, rank_fraction=0.5)
        for g in grads:  # two steps: the second starts from the first's Q and error feedback
            for p, grad in zip(sharded, g):
                p.grad = distribute_tensor(grad, mesh, placements)
            optimizer.step()
        results[rank] = ([p.full_tensor().detach() for p in sharded],
                         [optimizer.state[p][key].full_tensor() for p in sharded for key in ("dion/momentum", "dion/q")])
    finally:
        dist.destroy_process_group()


def dion_problem():
    g = torch.Generator().manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(*s, generator=g, dtype=torch.float64)) for s in SHAPES]
    return params, [[torch.randn(*s, generator=g, dtype=torch.float64) for s in SHAPES] for _ in range(2)]


def three_steps(grads) -> list[list]:
    """dion_problem's two steps, then a third without a gradient for matrix 1 (the owners change with the shapes)."""
    return [*grads, [None if j == 1 else grad for j, grad in enumerate(grads[0])]]


def take_steps(optimizer, params, steps) -> None:
    for g in steps:
        for p, grad in zip(params, g):
            p.grad = grad
        optimizer.step()


@pytest.mark.parametrize("world,layout", [(3, "fsdp"), (4, "hsdp")])
def test_dion_on_row_shards_gives_the_single_process_step(world, layout):
    """Each rank on its own rows (Q gathered, M Q's QR on its owner, Mᵀ P summed): the weights, M and Q of
    one process's two steps, in float64 to 1e-12, with uneven shards and a matrix with fewer rows than ranks."""
    from optim import Dion

    params, grads = dion_problem()
    optimizer = Dion(params, lr=0.1, rank_fraction=0.5)
    take_steps(optimizer, params, grads)
    state = [optimizer.state[p][key] for p in params for key in ("dion/momentum", "dion/q")]
    results = mp.Manager().dict()
    mp.spawn(_dion_worker, args=(world, free_port(), layout, results), nprocs=world)
    for weights, sharded_state in dict(results).values():
        for got, want in zip([*weights, *sharded_state], [*params, *state], strict=True):
            assert torch.allclose(got, want.detach(), rtol=0, atol=1e-12), got.shape


def _dion_ddp_worker(rank, world, port, results):
    from optim import Dion

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        params, grads = dion_problem()
        optimizer = Dion(params, lr=0.1, rank_fraction=0.5)
        optimizer.split_orthogonalization()
        steps = three_steps(grads)
        with Payloads() as two_steps:
            take_steps(optimizer, params, steps[:2])
        try:
            optimizer.state_dict()
            refusal = ""
        except RuntimeError as error:
            refusal = str(error)
        owners = assign_owners(SHAPES, world)
        kept = [[optimizer.state[p][key].clone() for key in ("dion/momentum", "dion/q")] if owners[j] == rank else None
                for j, p in enumerate(params)]
        with Payloads() as third:  # a consolidation first, as the owners change
            take_steps(optimizer, params, steps[2:])
        optimizer.consolidate_state_dict()
        results[rank] = ([p.detach().clone() for p in params], optimizer.state_dict()["state"], kept, refusal,
                         two_steps.numel, third.numel)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_dion_on_ddp_replicas_broadcasts_only_d_and_consolidates_m_and_q_from_their_owners(world):
    """Split among DDP replicas, each owner keeps its matrices' M and Q and broadcasts only D (a matrix's
    numbers, once a step); state_dict() refuses until consolidate_state_dict() has brought M and Q from the
    owners; a step whose set of matrices differs (new owners) consolidates first. Weights, M and Q equal one
    process's three steps to 1e-12 on every rank."""
    from optim import Dion

    params, grads = dion_problem()
    optimizer = Dion(params, lr=0.1, rank_fraction=0.5)
    steps = three_steps(grads)
    take_steps(optimizer, params, steps[:2])
    after_two = [[optimizer.state[p][key].clone() for key in ("dion/momentum", "dion/q")] for p in params]
    take_steps(optimizer, params, steps[2:])
    expected = optimizer.state_dict()["state"]
    results = mp.Manager().dict()
    mp.spawn(_dion_ddp_worker, args=(world, free_port(), results), nprocs=world)
    numel = [math.prod(s) for s in SHAPES]
    m_and_q = sum(n + s[1] * math.ceil(0.5 * min(s)) for n, s in zip(numel, SHAPES))
    for rank, (weights, state, kept, refusal, two_steps, third) in dict(results).items():
        for got, want in zip(weights, params, strict=True):
            assert torch.allclose(got, want.detach(), rtol=0, atol=1e-12)
        for j in range(len(SHAPES)):
            for key in ("dion/momentum", "dion/q", "step"):
                assert torch.allclose(state[j][key], expected[j][key], rtol=0, atol=1e-12), (rank, j, key)
            if kept[j] is not None:  # current on the owner before any consolidation
                assert all(torch.allclose(a, b, rtol=0, atol=1e-12) for a, b in zip(kept[j], after_two[j]))
        assert "dion/momentum, dion/q are current on each matrix's owner rank only" in refusal
        assert "consolidate_state_dict()" in refusal
        assert two_steps == 2 * sum(numel)  # D only, not M (whose bytes it was) nor Q
        # the third step: M and Q of all five matrices, then D of the four with gradients
        assert third == m_and_q + sum(numel) - numel[1]
