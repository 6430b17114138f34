"""How often an optimizer step communicates under FSDP2, counted on 2 gloo ranks (tests/collectives.py):
the gradient norm is one all-reduce over all parameters, each stage that needs whole-matrix norms or
means one all-reduce for the whole group (not one per matrix), the owner orthogonalization one
all-to-all each way, and Dion's power iteration on row shards an all-gather, an all-to-all each way (its
QRs on their owners) and an all-reduce. A CPU timing cannot show any of this; a per-matrix collective
costs a latency each on a cluster. And every optimizer's two sharded steps give the weights one process
gets from the two ranks' batches together (the end-to-end DDP/FSDP runs of tests/test_distributed.py
take one optimizer per code path; this checks them all)."""

import contextlib
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from collectives import Counter

# optimizer -> collectives of one step of gpt2_tiny's optimizer (AdamW's part has none)
EXPECTED = {
    "adamw": {},
    "muon": {"all_to_all": 2},  # rows to their owners and back
    "muon_nsr": {"all_to_all": 2},
    "muon_vs": {"all_to_all": 2},
    "muon2": {"all_to_all": 2},
    "post_polar": {"all_to_all": 2},
    "muon_split_heads": {"all_to_all": 6},  # three groups (q/k/v heads, output heads, the rest), each its exchange
    "muon_cautious": {"all_to_all": 2},
    "mars_m": {"all_reduce": 1, "all_to_all": 2},  # + the clip's norms
    "mars_m_exact": {"all_reduce": 1, "all_to_all": 2},
    "muon2_f": {"all_reduce": 1, "all_to_all": 2},  # + the factored column means and mean(r)
    "normuon": {"all_reduce": 1, "all_to_all": 2},  # + the rescale's norms
    "adamuon": {"all_reduce": 1, "all_to_all": 2},  # + ScaleToRms's norms
    "dion": {"all_gather": 1, "all_to_all": 2, "all_reduce": 1},  # rank-r factors only: Q gathered, M Q's rows
                                                                  # to the owners and P's back, Mᵀ P summed
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def overrides(name: str) -> list[str]:
    """fp32 Newton–Schulz (dtype=auto may pick bf16, whose rounding depends on the batching); Dion at rank
    1/4 (at full rank its trailing directions are rounding's: tests/test_distributed.py)."""
    extra = {"adamw": [], "dion": ["optim.matrix.rank_fraction=0.25"]}.get(name, ["optim.matrix.orthogonalizer.dtype=float32"])
    return ["model=gpt2_tiny", f"optim={name}", "model.vocab_size=256", *extra]


def batch(rank: int) -> torch.Tensor:
    return torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(rank))


def two_steps(model, optimizer, tokens, name, counter=None):
    """Two optimizer steps on `tokens`; the collectives of the second step's gradient norm and step."""
    from optim.distributed import global_norm

    for _ in range(2):  # the second step is counted (the first also creates the state)
        model(tokens[:, :-1], tokens[:, 1:]).backward()
        if name == "mars_m_exact":
            optimizer.store_lookahead_gradients()
        with (counter or contextlib.nullcontext)() as counted:
            norm = global_norm([p.grad for p in model.parameters()])
            norm_counts = dict(counted.counts) if counted else {}
            if counted:
                counted.counts.clear()
            optimizer.step()
        optimizer.zero_grad()
    return norm_counts, dict(counted.counts) if counted else {}, norm.item()


def _worker(rank, port, results):
    import os

    from omegaconf import OmegaConf
    from torch.distributed.device_mesh import init_device_mesh

    from torch.distributed.tensor import DTensor

    from configs import compose
    from models import build_model
    from trainer.optimizers import build_optimizer
    from trainer.parallel import shard_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        mesh = init_device_mesh("cpu", (2,))
        for name in EXPECTED:
            cfg = compose(overrides(name))
            torch.manual_seed(0)
            model = build_model(OmegaConf.to_container(cfg.model, resolve=True))
            shard_model(model, mesh)
            optimizer = build_optimizer(model, cfg.optim)
            counts = two_steps(model, optimizer, batch(rank), name, Counter)
            weights = [(p.full_tensor() if isinstance(p, DTensor) else p).detach().numpy().copy() for p in model.parameters()]
            results[(rank, name)] = (*counts, weights)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def counts():
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(free_port(), results), nprocs=2)
    return dict(results)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_each_optimizer_step_communicates_once_per_stage_not_per_matrix(counts, name):
    for rank in (0, 1):
        norm_counts, step_counts, norm, _ = counts[(rank, name)]
        assert norm_counts == {"all_reduce": 1}  # the gradient norm: one all-reduce of every shard's squares
        assert step_counts == EXPECTED[name], step_counts
    assert counts[(0, name)][2] == counts[(1, name)][2]  # the same global norm on both ranks


@pytest.mark.parametrize("name", list(EXPECTED))
def test_each_optimizers_sharded_steps_equal_one_processs(counts, name):
    from omegaconf import OmegaConf

    from configs import compose
    from models import build_model
    from trainer.optimizers import build_optimizer

    cfg = compose(overrides(name))
    torch.manual_seed(0)
    model = build_model(OmegaConf.to_container(cfg.model, resolve=True))
    two_steps(model, build_optimizer(model, cfg.optim), torch.cat([batch(0), batch(1)]), name)
    # the two ranks' gradients are averaged where one process takes the mean over both batches: rounding apart,
    # ~1e-6 of the largest weight of a matrix; a wrong shard is ~1e-1. (Biases and norms, AdamW's, are left out:
    # from zero, with near-zero gradients, Adam's m/sqrt(v) turns that rounding into ~1e-3 of their size.)
    for p, sharded in zip(model.parameters(), counts[(0, name)][3], strict=True):
        if p.ndim == 2:
            assert (torch.from_numpy(sharded) - p.detach()).abs().max() <= 1e-4 * p.detach().abs().max(), p.shape
