"""The matrix-optimizer step on GPT-2 small's 48 hidden matrices (12 x qkv 2304x768, proj 768x768,
fc 3072x768, proj 768x3072), as ratios measured side by side in one run:

  1. one process: our Muon vs torch.optim.Muon with the same fp32 Newton–Schulz (torch's bf16 cast
     made a copy, as tests/test_muon.py does), and both in bf16; Muon² (3 steps), Muon-NSR, Muon-VS
     and Dion (rank 1/4) vs our Muon;
  2. two processes (gloo, one thread each) vs one, for Muon and Dion: each rank computing every
     matrix (replicated, what DDP did before), each computing its share (``split_orthogonalization()``,
     DDP), and FSDP2-style row shards (DTensors: Muon's rows go to their owners by all-to-all, Dion
     works on each rank's own rows).

Gradients are fixed random matrices; each setup takes one warm-up step, then the median of
`--repeats` timed steps: in one process the setups alternate step by step, each round starting one
setup later (the round's first step pays for the pages the last setup gave back: going first every
time had cost our Muon ~2 s, 0.79x torch's where 0.61-0.66x was measured before; so it goes first at
most once and the median drops it); across processes, the slowest rank's time with a barrier around
each step. Measured as a user of `optim` alone would run
it: without train.py's allocator setting (trainer/host_memory.py), which the training loop adds.

    python benchmarks/matrix_step.py [--repeats 3]        # writes benchmarks/matrix_step.md
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from optim import Dion, Muon, Muon2, MuonNSR, MuonVS
from optim.orthogonalize import cpu_prefers_bfloat16

HERE = Path(__file__).resolve().parent
LAYER_SHAPES = [(2304, 768), (768, 768), (3072, 768), (768, 3072)]
SHAPES = LAYER_SHAPES * 12


def matrices(seed: int = 0) -> tuple[list[torch.nn.Parameter], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(*s, generator=g) * 0.02) for s in SHAPES]
    grads = [torch.randn(*s, generator=g) * 1e-3 for s in SHAPES]
    return params, grads


def median_step(optimizer, params, grads, repeats: int, barrier=lambda: None) -> float:
    for p, grad in zip(params, grads):
        p.grad = grad
    optimizer.step()  # warm-up (and state allocation)
    times = []
    for _ in range(repeats):
        barrier()
        start = time.perf_counter()
        optimizer.step()
        barrier()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def one_process(repeats: int, bf16: bool) -> dict[str, float]:
    from torch.optim import Muon as TorchMuon

    common = dict(lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True, adjust_lr_fn="match_rms_adamw")
    setups = {
        "ours fp32": lambda ps: Muon(ps, orthogonalizer={"dtype": "float32"}, **common),
        "torch fp32": lambda ps: TorchMuon(ps, **common),
        **({"ours bf16": lambda ps: Muon(ps, orthogonalizer={"dtype": "bfloat16"}, **common),
            "torch bf16": lambda ps: TorchMuon(ps, **common)} if bf16 else {}),
        "muon2 fp32 (3 steps)": lambda ps: Muon2(ps, orthogonalizer={"dtype": "float32"}),
        "muon_nsr fp32": lambda ps: MuonNSR(ps, orthogonalizer={"dtype": "float32"}),
        "muon_vs fp32": lambda ps: MuonVS(ps, orthogonalizer={"dtype": "float32"}),
        "dion rank 1/4": lambda ps: Dion(ps, rank_fraction=0.25),
    }
    real_cast = torch.Tensor.bfloat16
    runs, work = {}, {}
    for name, make in setups.items():
        params, grads = matrices()
        for p, grad in zip(params, grads):
            p.grad = grad
        runs[name] = make(params)
    times, names = {name: [] for name in setups}, list(setups)
    # alternating, so that drifts of the machine hit every setup alike; each round one setup later; the first
    # round warms up (and allocates the state); a last one counts each step's multiply-adds
    for round_ in range(repeats + 2):
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            if name == "torch fp32":  # torch.optim.Muon's Newton–Schulz in fp32: its bf16 cast made a copy
                torch.Tensor.bfloat16 = lambda self: self.clone()
            try:
                if round_ <= repeats:
                    start = time.perf_counter()
                    runs[name].step()
                    if round_:
                        times[name].append(time.perf_counter() - start)
                else:
                    work[name] = multiply_adds(runs[name])
            finally:
                torch.Tensor.bfloat16 = real_cast
    results = {name: statistics.median(ts) for name, ts in times.items()}
    for name, seconds in results.items():
        print(f"{name}: {seconds:.2f} s, {work[name] / 768**3:.2f} x 768³ multiply-adds", flush=True)
    return results, work


def multiply_adds(optimizer) -> float:
    """The multiply-adds of the matrix products in one step, as torch's FlopCounterMode counts them on the code's
    own path (each product's FLOPs are twice its multiply-adds): what the step's time cannot fall below."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        optimizer.step()
    return counter.get_total_flops() / 2


def _rank(rank: int, world: int, port: int, repeats: int, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        def slowest(seconds: float) -> float:
            t = torch.tensor(seconds)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            return t.item()

        mesh = init_device_mesh("cpu", (world,))
        results = {}
        for optimizer, make in (("muon", lambda ps: Muon(ps, orthogonalizer={"dtype": "float32"})),
                                ("dion", lambda ps: Dion(ps, rank_fraction=0.25))):
            params, grads = matrices()
            results[optimizer, "replicated"] = slowest(median_step(make(params), params, grads, repeats, dist.barrier))
            params, grads = matrices()
            split = make(params)
            split.split_orthogonalization()
            results[optimizer, "split (DDP)"] = slowest(median_step(split, params, grads, repeats, dist.barrier))
            params, grads = matrices()
            sharded = [torch.nn.Parameter(distribute_tensor(p.detach(), mesh, [Shard(0)])) for p in params]
            grads = [distribute_tensor(g, mesh, [Shard(0)]) for g in grads]
            results[optimizer, "sharded (FSDP2)"] = slowest(median_step(make(sharded), sharded, grads, repeats, dist.barrier))
        if rank == 0:
            out.update(results)
    finally:
        dist.destroy_process_group()


def processes(world: int, repeats: int) -> dict[str, float]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_rank, args=(world, port, repeats, out), nprocs=world)
    print(f"world size {world}: {dict(out)}", flush=True)
    return dict(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    # bf16 rows only where this CPU computes bf16 fast (without AVX-512 BF16 or AMX a bf16 matmul is
    # 20-400x slower than fp32: a step would take minutes, and no one would run it so)
    bf16 = cpu_prefers_bfloat16()
    single, work = one_process(args.repeats, bf16)

    def row(label: str, name: str, baseline: str, baseline_label: str, target: str = "") -> str:
        return (f"| {label} | {single[name]:.2f} | {single[name] / single[baseline]:.2f}x {baseline_label} | "
                f"{work[name] / 768**3:.2f} x 768³, {work[name] / work[baseline]:.3f}x | {target} |")

    ws1, ws2 = processes(1, args.repeats), processes(2, args.repeats)

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU") if Path("/proc/cpuinfo").exists() else "unknown CPU"
    avx512_bf16 = "avx512_bf16" in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else False
    lines = [
        "# The matrix-optimizer step on GPT-2 small's hidden matrices",
        "",
        f"48 matrices (12 x 2304x768, 768x768, 3072x768, 768x3072), fp32 parameters; {cpu} "
        f"({'with' if avx512_bf16 else 'without'} AVX-512 BF16), torch {torch.__version__}. Median of {args.repeats} steps after "
        f"one warm-up step; the matrix products' multiply-adds of one more step, counted by torch's FlopCounterMode "
        f"(the floor of a time ratio). Command: `python benchmarks/matrix_step.py --repeats {args.repeats}`.",
        "",
        f"## One process ({torch.get_num_threads()} threads)",
        "",
        "| optimizer | step (s) | ratio | its matmul multiply-adds, ratio | |",
        "|---|---|---|---|---|",
        row("ours, Muon fp32 NS", "ours fp32", "torch fp32", "torch fp32", "target ≤ 0.7x"),
        row("torch.optim.Muon, fp32 NS", "torch fp32", "torch fp32", "torch fp32"),
        *([row("ours, Muon bf16 NS", "ours bf16", "torch bf16", "torch bf16"),
           row("torch.optim.Muon (its bf16 NS)", "torch bf16", "torch bf16", "torch bf16")] if bf16 else []),
        row("Muon² (3 NS steps)", "muon2 fp32 (3 steps)", "ours fp32", "our Muon", "target ≤ 0.55x"),
        row("Muon-NSR", "muon_nsr fp32", "ours fp32", "our Muon", "target ≤ 1.0x"),
        row("Muon-VS", "muon_vs fp32", "ours fp32", "our Muon", "target ≤ 1.0x"),
        row("Dion, rank 1/4", "dion rank 1/4", "ours fp32", "our Muon"),
        "",
        "## Two processes vs one (gloo, one thread per process; Muon fp32 NS, Dion rank 1/4)",
        "",
        "| optimizer | layout | world size 1 (s) | world size 2 (s) | vs replicated at world size 2 |",
        "|---|---|---|---|---|",
    ]
    for optimizer in ("muon", "dion"):
        for name in ("replicated", "split (DDP)", "sharded (FSDP2)"):
            key = (optimizer, name)
            lines.append(f"| {optimizer} | {name} | {ws1[key]:.2f} | {ws2[key]:.2f} | {ws2[key] / ws2[optimizer, 'replicated']:.2f}x |")
    lines += ["", "Target for the divided layouts at world size 2: ≤ 0.6x the replicated step.", ""]
    if not bf16:
        lines += ["No bf16 rows: this CPU's bf16 matmul is slower than its fp32 one (orthogonalizer dtype=auto picks fp32 "
                  "here), so a bf16 Newton–Schulz step measures nothing anyone would run.", ""]
    text = "\n".join(lines)
    (HERE / "matrix_step.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
