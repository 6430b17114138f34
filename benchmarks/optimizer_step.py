"""Time of one optimizer step for every `optim` config on the default run's model, relative to Muon.

Gradients are fixed random tensors; each optimizer takes 3 warm-up steps, then the median of 30
timed steps is reported for the whole hybrid step (matrix optimizer + AdamW on embeddings, head,
norms) and for the matrix optimizer alone. All optimizers are measured in one process, alternating.

    python benchmarks/optimizer_step.py [model=gpt2_mini ...]    # writes benchmarks/optimizer_step.md
"""

from __future__ import annotations

import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from models import build_model
from configs import CONFIG_DIR, compose
from trainer.optimizers import build_optimizer

HERE = Path(__file__).resolve().parent
REPEATS, WARMUP = 60, 3


def cpu_name() -> str:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"model name\s*:\s*(.*)", text)
    flags = "avx512_bf16" if "avx512_bf16" in text else "no avx512_bf16"
    return f"{model.group(1) if model else platform.processor()} ({flags}), {torch.get_num_threads()} threads"


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def step(optimizer, part: str | None = None) -> None:
    """One step of the hybrid optimizer (or of one part); exact MARS-M first stores its look-ahead
    gradient (here the same tensors), as the training loop does."""
    if optimizer.needs_lookahead:
        optimizer.store_lookahead_gradients()
    (optimizer.parts[part] if part else optimizer).step()


def main(overrides: list[str]) -> None:
    names = sorted(p.stem for p in (CONFIG_DIR / "optim").glob("*.yaml") if p.stem != "adamw")
    setups = {}
    for name in names:
        cfg = compose([f"optim={name}", *overrides])
        torch.manual_seed(0)
        model = build_model(OmegaConf.to_container(cfg.model))
        optimizer = build_optimizer(model, cfg.optim)
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-2
        setups[name] = optimizer
        for _ in range(WARMUP):
            step(optimizer)
    times = {name: {"hybrid": [], "matrix": []} for name in names}
    for _ in range(REPEATS):
        for name, optimizer in setups.items():
            times[name]["hybrid"].append(timed(lambda: step(optimizer)))
            times[name]["matrix"].append(timed(lambda: step(optimizer, "matrix")))
    median = {name: {part: statistics.median(ts) for part, ts in parts.items()} for name, parts in times.items()}
    base = median["muon"]
    cfg = compose(overrides)
    lines = [
        "# Optimizer step time relative to Muon",
        "",
        f"Model `{OmegaConf.to_container(cfg.model)}` (the default run's unless overridden), fp32 on CPU.",
        f"Machine: {cpu_name()}, torch {torch.__version__}.",
        f"Median of {REPEATS} steps after {WARMUP} warm-up steps, all optimizers alternating in one process.",
        "Command: `" + " ".join(["python benchmarks/optimizer_step.py", *overrides]) + "`",
        "",
        "| optim | matrix optimizer | matrix step (ms) | vs Muon | hybrid step (ms) | vs Muon |",
        "|---|---|---|---|---|---|",
    ]
    for name in names:
        m = median[name]
        lines.append(f"| {name} | {type(setups[name].parts['matrix']).__module__}.{type(setups[name].parts['matrix']).__qualname__} | {m['matrix'] * 1e3:.1f} | "
                     f"{m['matrix'] / base['matrix']:.2f}x | {m['hybrid'] * 1e3:.1f} | {m['hybrid'] / base['hybrid']:.2f}x |")
    lines.append("")
    text = "\n".join(lines)
    (HERE / "optimizer_step.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main(sys.argv[1:])
