"""Tokens/s of `python train.py` against a bare PyTorch loop on the same model, batch and optimizer.

The bare loop is what the Lightning module does at its core, with nothing else: the same
`build_model`, `build_optimizer`, the same micro-batches from `TrainBatches`, cross-entropy, backward,
global-norm clipping, the LR schedule and `step()`. `train.py` is measured from its own
`metrics.csv` (tokens/s of each step, evaluation and checkpoint time excluded); both report the
median over the steps after the first `--skip`.

    python benchmarks/loop_overhead.py [--steps 60] [overrides ...]    # writes benchmarks/loop_overhead.md
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from data import TrainBatches, open_dataset
from models import build_model
from configs import compose
from trainer.host_memory import keep_freed_memory
from trainer.metrics import read_metrics
from trainer.optimizers import build_optimizer
from trainer.plan import make_plan

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def bare_loop(cfg, steps: int) -> list[float]:
    keep_freed_memory()  # as train.py
    plan = make_plan(cfg, 1)
    torch.manual_seed(int(cfg.seed))
    model = build_model(OmegaConf.to_container(cfg.model, resolve=True))
    optimizer = build_optimizer(model, cfg.optim)
    tokens = open_dataset(OmegaConf.to_container(cfg.data, resolve=True)).splits["train"]
    batches = iter(TrainBatches(tokens, plan.seq_len, plan.seqs_per_step, plan.micro_batch, seed=int(cfg.data.seed)))
    rates = []
    for _ in range(steps):
        start = time.perf_counter()
        for _ in range(plan.accumulation):
            inputs, targets = next(batches)
            loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten()) / plan.accumulation
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), float(cfg.grad_clip))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        rates.append(plan.tokens_per_step / (time.perf_counter() - start))
    return rates


def train_py(overrides: list[str], steps: int, tokens_per_step: int) -> list[float]:
    with tempfile.TemporaryDirectory() as run_dir:
        subprocess.run([sys.executable, "train.py", *overrides, f"budget.tokens={steps * tokens_per_step}",
                        f"eval.every_tokens={steps * tokens_per_step}", f"checkpoint.every_tokens={steps * tokens_per_step}",
                        "callbacks=none", f"run_dir={run_dir}"], cwd=ROOT, check=True, capture_output=True)
        return [row["tokens_per_s"] for row in read_metrics(Path(run_dir) / "metrics.csv")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--skip", type=int, default=5, help="warm-up steps left out of the median")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = compose(args.overrides)
    plan = make_plan(cfg, 1)
    ours = statistics.median(train_py(args.overrides, args.steps, plan.tokens_per_step)[args.skip:])
    bare = statistics.median(bare_loop(cfg, args.steps)[args.skip:])
    text = "\n".join([
        "# The training loop's overhead: `train.py` vs a bare PyTorch loop",
        "",
        f"Config: the default run's (`{' '.join(args.overrides) or 'no overrides'}`: model {cfg.model.name}, "
        f"optim={cfg.optim.name}, {plan.tokens_per_step:,} tokens per step in {plan.accumulation} micro-batch(es)), "
        f"{args.steps} steps each, median tokens/s after the first {args.skip}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads. Command: `python benchmarks/loop_overhead.py --steps {args.steps} "
        f"{' '.join(args.overrides)}`.",
        "",
        "| loop | tokens/s | ratio |",
        "|---|---|---|",
        f"| bare PyTorch | {bare:,.0f} | 1.00x |",
        f"| `python train.py` | {ours:,.0f} | {ours / bare:.2f}x (target ≥ 0.95x) |",
        "",
    ])
    (HERE / "loop_overhead.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
