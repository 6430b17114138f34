"""How often an optimizer step communicates under FSDP2, counted on 2 gloo ranks (tests/collectives.py):
the gradient norm is one all-reduce over all parameters, each stage that needs whole-matrix norms or
means one all-reduce for the whole group (not one per matrix), and the owner orthogonalization one
all-to-all each way. A CPU timing cannot show any of this; a per-matrix collective costs a latency each
on a cluster."""

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
    "dion": {"all_to_all": 2},  # momentum rows to their owners, new momentum and update rows back
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, port, results):
    import os

    from omegaconf import OmegaConf
    from torch.distributed.device_mesh import init_device_mesh

    from configs import compose
    from models import build_model
    from optim.distributed import global_norm
    from trainer.optimizers import build_optimizer
    from trainer.parallel import shard_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        mesh = init_device_mesh("cpu", (2,))
        tokens = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(rank))
        for name in EXPECTED:
            cfg = compose(["model=gpt2_tiny", f"optim={name}", "model.vocab_size=256"])
            torch.manual_seed(0)
            model = build_model(OmegaConf.to_container(cfg.model, resolve=True))
            shard_model(model, mesh)
            optimizer = build_optimizer(model, cfg.optim)
            for step in range(2):  # the second step is counted (the first also creates the state)
                model(tokens[:, :-1], tokens[:, 1:]).backward()
                if name == "mars_m_exact":
                    optimizer.store_lookahead_gradients()
                with Counter() as counted:
                    norm = global_norm([p.grad for p in model.parameters()])
                    norm_counts = dict(counted.counts)
                    counted.counts.clear()
                    optimizer.step()
                optimizer.zero_grad()
            results[(rank, name)] = (norm_counts, dict(counted.counts), norm.item())
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
        norm_counts, step_counts, norm = counts[(rank, name)]
        assert norm_counts == {"all_reduce": 1}  # the gradient norm: one all-reduce of every shard's squares
        assert step_counts == EXPECTED[name], step_counts
    assert counts[(0, name)][2] == counts[(1, name)][2]  # the same global norm on both ranks
