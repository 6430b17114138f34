"""The first thing to run on a GPU: one command, one device, under 8 minutes on an H100/H200, writing
benchmarks/gpu.md.

    python benchmarks/gpu.py                        # the first CUDA device
    python benchmarks/gpu.py --device cpu --tiny    # every section at toy sizes on a CPU (< 2 min; a test runs it)
    bash benchmarks/gpu_device.sh                   # on a lent machine whose python3 lacks Hydra (see that file)

Sections, each on its own (one that fails is reported with its error; the others still run):
  1. throughput  gpt2_125m and llama_130m training steps (bf16 autocast, torch.compile, Muon): tokens/s,
                 and MFU against the device's datasheet peak (measured only for a device not in the table)
  2. optimizer   the optimizer step as a fraction of forward+backward, on those models' gradients, for
                 Muon, Muon², Muon-NSR and MARS-M (Moonlight reports 1-3 % at scale)
  3. muon        our Muon step against torch.optim.Muon on GPT-2 small's 48 hidden matrices, both with
                 bf16 Newton–Schulz
  4. loop        the training loop (`python train.py`, Shakespeare): 200 steps of gpt2_mini in bf16-mixed
                 against fp32 (the largest loss difference)
  5. fsdp        the same 200 steps under trainer=fsdp on one rank (NCCL): FSDP2 with its bf16 policy and
                 the owner orthogonalization's all-to-all, against the single-device bf16 run
  6. memory      peak memory of an evaluation at seq 4096 (llama_marin_1.2b, 4 sequences per forward as
                 vam_llama_1.2b_c4 evaluates) and of a llama_1b step (muon2_llama_1b_c4's 64 x 256 tokens)
                 with and without activation checkpointing

Timings are medians of synchronised repeats after warm-up steps; MFU counts 6N + 12 L T d FLOPs per
token (trainer/throughput.py). gpu.md is rewritten after every section, so a run cut short keeps
what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from configs import compose  # noqa: E402
from data.files import atomic_file  # noqa: E402
from models import build_model, count_parameters  # noqa: E402
from trainer.metrics import read_metrics  # noqa: E402
from trainer.optimizers import build_optimizer  # noqa: E402
from trainer.throughput import flops_per_token, measured_peak_flops, peak_flops  # noqa: E402

OPTIMIZERS = ("muon", "muon2", "muon_nsr", "mars_m")
GPT2_SMALL_MATRICES = [(2304, 768), (768, 768), (3072, 768), (768, 3072)] * 12


@dataclass(frozen=True)
class Sizes:
    throughput: tuple[tuple[str, int, int], ...]  # (model, seq_len, micro-batch)
    warmup: int  # untimed steps (compilation happens here)
    repeats: int  # timed steps
    matrices: list[tuple[int, int]]
    loop: tuple[str, ...]  # train.py overrides of sections 4 and 5
    loop_timeout_s: int
    evaluation: tuple[str, int, int]  # (model, seq_len, sequences per forward)
    step: tuple[str, int, int]  # (model, seq_len, micro-batch)


FULL = Sizes(
    throughput=(("gpt2_125m", 1024, 16), ("llama_130m", 1024, 16)), warmup=3, repeats=10,
    matrices=GPT2_SMALL_MATRICES,
    loop=("model=gpt2_mini", "budget.tokens=204800", "eval.every_tokens=51200"), loop_timeout_s=180,  # 200 steps of 1,024
    evaluation=("llama_marin_1.2b", 4096, 4), step=("llama_1b", 256, 64),
)
TINY = Sizes(  # bf16 matmuls are ~20-400x slower than fp32 on CPUs without AVX-512 BF16: a few tokens each
    throughput=(("gpt2_tiny", 16, 1), ("llama_tiny", 16, 1)), warmup=1, repeats=1,
    matrices=[(96, 32), (32, 32), (128, 32), (32, 128)] * 2,
    loop=("model=gpt2_tiny", "data.seq_len=16", "data.micro_batch=1", "data.batch_tokens=16", "budget.tokens=64",
          "eval.every_tokens=64", "eval.tokens=34", "trainer.peak_flops=1e12"), loop_timeout_s=240,  # 4 steps; no peak measured
    evaluation=("llama_tiny", 32, 1), step=("llama_tiny", 32, 1),
)


class Bench:
    """The device, the sizes, and how to time and measure memory on it."""

    def __init__(self, device: torch.device, sizes: Sizes, compile_models: bool):
        self.device, self.sizes, self.compile = device, sizes, compile_models
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def seconds(self, fn, repeats: int | None = None, warmup: int | None = None) -> float:
        """Median wall time of `repeats` synchronised calls of fn, after `warmup` untimed ones."""
        for _ in range(self.sizes.warmup if warmup is None else warmup):
            fn()
        times = []
        for _ in range(self.sizes.repeats if repeats is None else repeats):
            self.sync()
            start = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    @contextlib.contextmanager
    def peak_memory(self):
        """Yields a dict whose 'gb' is, after the block, the peak memory it took: CUDA's peak allocation (all
        tensors), or on a CPU the growth of the process's peak resident set (only a first measurement says much)."""
        result = {}
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        resident = _resident_bytes()
        yield result
        self.sync()
        result["gb"] = (torch.cuda.max_memory_allocated(self.device) if self.cuda else
                        max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - resident)) / 1e9

    def model(self, name: str) -> torch.nn.Module:
        spec = OmegaConf.to_container(compose([f"model={name}"]).model, resolve=True)
        with torch.device(self.device):
            return build_model(spec)

    def optimizer(self, model: torch.nn.Module, optim: str):
        return build_optimizer(model, compose([f"optim={optim}"]).optim)

    def tokens(self, vocab: int, batch: int, seq_len: int) -> torch.Tensor:
        return torch.randint(0, vocab, (batch, seq_len + 1), device=self.device)

    def free(self) -> None:
        if self.cuda:
            torch.cuda.empty_cache()


def _resident_bytes() -> int:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()
    except OSError:
        return 0


def train_step(bench: Bench, model, optimizer, batch):
    """forward+backward (bf16 autocast) and, if an optimizer is given, its step."""
    def forward_backward():
        with bench.autocast():
            loss = model(batch[:, :-1], batch[:, 1:])
        loss.backward()

    def step():
        forward_backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return forward_backward, step


# ---- sections ----------------------------------------------------------------------------------------------
def throughput_and_optimizer_steps(bench: Bench) -> list[str]:
    """Sections 1 and 2: both on the same models and gradients."""
    # the datasheet's peak on a known GPU (else a large measured matmul); on a CPU a small bf16 matmul, measured
    peak, source = peak_flops(bench.device, "bf16-mixed", None) if bench.cuda else \
        (measured_peak_flops(bench.device, torch.bfloat16, size=256), "measured")
    lines = [f"## 1. Training steps, bf16 autocast{', torch.compile' if bench.compile else ''}, Muon",
             "", f"Peak {peak / 1e12:.4g} TFLOP/s ({source}). A step is forward + backward + optimizer step on random tokens.", "",
             "| model | params | tokens/step | step (ms) | forward+backward (ms) | tokens/s | MFU |", "|---|---|---|---|---|---|---|"]
    fractions = ["## 2. Optimizer step / forward+backward", "",
                 "The optimizer step (matrix optimizer + AdamW, Newton–Schulz in the device's auto dtype) on the "
                 "gradients of section 1's models, over their forward+backward time.", "",
                 "| model | " + " | ".join(OPTIMIZERS) + " |", "|---|" + "---|" * len(OPTIMIZERS)]
    for name, seq_len, micro in bench.sizes.throughput:
        torch.manual_seed(0)
        model = bench.model(name)
        if bench.compile:
            model.compile()
        batch = bench.tokens(model.config.vocab_size, micro, seq_len)
        forward_backward, step = train_step(bench, model, bench.optimizer(model, "muon"), batch)
        step_s = bench.seconds(step)
        forward_backward_s = bench.seconds(lambda: (forward_backward(), model.zero_grad(set_to_none=True)), warmup=1)
        tokens_per_s = micro * seq_len / step_s
        mfu = flops_per_token(model, seq_len) * tokens_per_s / peak
        lines.append(f"| {name} | {count_parameters(model).total / 1e6:.1f}M | {micro} x {seq_len} | {step_s * 1e3:.1f} | "
                     f"{forward_backward_s * 1e3:.1f} | {tokens_per_s:,.0f} | {mfu:.1%} |")
        forward_backward()  # gradients for the optimizer steps
        cells = []
        for optim in OPTIMIZERS:
            optimizer = bench.optimizer(model, optim)
            seconds = bench.seconds(optimizer.step)
            cells.append(f"{seconds * 1e3:.1f} ms = {seconds / forward_backward_s:.1%}")
            del optimizer
        fractions.append(f"| {name} | " + " | ".join(cells) + " |")
        del model
        bench.free()
    return lines + [""] + fractions


def muon_against_torch(bench: Bench) -> list[str]:
    """Section 3."""
    from optim import Muon

    lines = ["## 3. Our Muon against torch.optim.Muon, bf16 Newton–Schulz", "",
             f"{len(bench.sizes.matrices)} matrices of shapes {sorted(set(bench.sizes.matrices))}; median step time.", ""]
    try:
        from torch.optim import Muon as TorchMuon
    except ImportError:
        return lines + [f"torch {torch.__version__} has no torch.optim.Muon (torch >= 2.9)."]
    common = dict(lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True, adjust_lr_fn="match_rms_adamw")
    makers = {"ours": lambda ps: Muon(ps, orthogonalizer={"dtype": "bfloat16"}, **common),
              "torch.optim.Muon": lambda ps: TorchMuon(ps, **common)}
    generator = torch.Generator(device=bench.device).manual_seed(0)
    times = {}
    for name, make in makers.items():
        params = [torch.nn.Parameter(torch.randn(*s, device=bench.device, generator=generator) * 0.02) for s in bench.sizes.matrices]
        for p in params:
            p.grad = torch.randn(p.shape, device=bench.device, generator=generator) * 1e-3
        times[name] = bench.seconds(make(params).step)
    lines += ["| optimizer | step (ms) | vs torch.optim.Muon |", "|---|---|---|"]
    lines += [f"| {name} | {s * 1e3:.2f} | {s / times['torch.optim.Muon']:.2f}x |" for name, s in times.items()]
    return lines


def train_py(bench: Bench, run_dir: Path, cache: Path, *overrides: str) -> tuple[list[dict], str]:
    """`python train.py` with the sections' loop settings; its metrics rows and its output's tail."""
    args = [sys.executable, str(ROOT / "train.py"), *bench.sizes.loop, "callbacks=none", "checkpoint.every_tokens=1000000000",
            f"paths.cache_dir={cache}", f"run_dir={run_dir}", *overrides]
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=bench.sizes.loop_timeout_s,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if done.returncode:
        raise RuntimeError(f"train.py exited with {done.returncode}:\n{(done.stdout + done.stderr)[-1500:]}")
    return read_metrics(run_dir / "metrics.csv"), done.stdout


def trainer_overrides(bench: Bench, strategy: str) -> list[str]:
    if bench.cuda:
        return ["trainer=gpu"] if strategy == "single" else ["trainer=fsdp", "trainer.devices=1"]
    return ["trainer=cpu"] if strategy == "single" else ["trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=1"]


def loop_summary(rows: list[dict]) -> str:
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    speed = statistics.median(r["tokens_per_s"] for r in rows[len(rows) // 2:])
    return f"{len(rows)} steps, final val loss {val[-1]:.4f}, {speed:,.0f} tokens/s (median, second half)"


def largest_difference(a: list[dict], b: list[dict], key: str = "train_loss") -> float:
    return max(abs(x[key] - y[key]) for x, y in zip(a, b, strict=True))


def training_loop(bench: Bench, work: Path, runs: dict) -> list[str]:
    """Section 4 (fills runs['bf16'] for section 5)."""
    cache = work / "cache"
    runs["bf16"], _ = train_py(bench, work / "bf16", cache, *trainer_overrides(bench, "single"), "trainer.precision=bf16-mixed")
    fp32, _ = train_py(bench, work / "fp32", cache, *trainer_overrides(bench, "single"), "trainer.precision=32-true",
                       "optim.matrix.orthogonalizer.dtype=float32")
    return ["## 4. The training loop: bf16-mixed against fp32", "",
            f"`python train.py {' '.join(bench.sizes.loop)}` with {' '.join(trainer_overrides(bench, 'single'))}.", "",
            "| run | result |", "|---|---|",
            f"| bf16-mixed (Newton–Schulz dtype auto) | {loop_summary(runs['bf16'])} |",
            f"| fp32 (32-true, fp32 Newton–Schulz) | {loop_summary(fp32)} |",
            f"| largest train-loss difference | {largest_difference(runs['bf16'], fp32):.4f} "
            f"(final val {abs(runs['bf16'][-1]['val_loss'] - fp32[-1]['val_loss']):.4f}) |"]


def fsdp_one_rank(bench: Bench, work: Path, runs: dict) -> list[str]:
    """Section 5."""
    rows, out = train_py(bench, work / "fsdp", work / "cache", *trainer_overrides(bench, "fsdp"), "trainer.precision=bf16-mixed")
    lines = ["## 5. FSDP2 on one rank", "",
             f"The same run with {' '.join(trainer_overrides(bench, 'fsdp'))} (bf16 MixedPrecisionPolicy; Muon's owner "
             f"orthogonalization all-to-all over {'NCCL' if bench.cuda else 'gloo'}).", "",
             "| run | result |", "|---|---|", f"| fsdp, 1 rank | {loop_summary(rows)} |"]
    if "bf16" in runs:
        lines.append(f"| largest train-loss difference to the single-device bf16 run | {largest_difference(rows, runs['bf16']):.4f} |")
    return lines


def memory(bench: Bench) -> list[str]:
    """Section 6."""
    lines = ["## 6. Peak memory", "", "CUDA's peak allocation (weights included)." if bench.cuda else
             "CPU: growth of the process's peak resident set (meaningful for the first measurement only).", "",
             "| what | peak (GB) | time (s) |", "|---|---|---|"]
    name, seq_len, sequences = bench.sizes.evaluation
    model = bench.model(name)
    batch = bench.tokens(model.config.vocab_size, sequences, seq_len)
    with torch.no_grad(), bench.peak_memory() as peak:
        start = time.perf_counter()
        with bench.autocast():
            model(batch[:, :-1], batch[:, 1:]).item()  # .item(): waits for the device
        seconds = time.perf_counter() - start
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
    lines.append(f"| evaluation forward, {name} ({weights:.1f} GB of fp32 weights), {sequences} x {seq_len} tokens, "
                 f"chunked cross-entropy | {peak['gb']:.2f} | {seconds:.2f} |")
    del model, batch
    bench.free()
    name, seq_len, micro = bench.sizes.step
    for checkpointing in (False, True):
        what = f"{name} training step (Muon, bf16 autocast), {micro} x {seq_len} tokens, activation checkpointing " + \
               ("on" if checkpointing else "off")
        try:
            model = bench.model(name)
            model.activation_checkpointing = checkpointing
            _, step = train_step(bench, model, bench.optimizer(model, "muon"), bench.tokens(model.config.vocab_size, micro, seq_len))
            step()  # allocates the optimizer state
            with bench.peak_memory() as peak:
                seconds = bench.seconds(step, repeats=2, warmup=0)
            lines.append(f"| {what} | {peak['gb']:.2f} | {seconds:.2f} |")
        except torch.cuda.OutOfMemoryError as e:
            lines.append(f"| {what} | out of memory ({str(e).splitlines()[0][:120]}) | |")
        finally:
            model = step = None
            bench.free()
    return lines


# ---- the report ---------------------------------------------------------------------------------------------
def environment(bench: Bench, argv: list[str]) -> list[str]:
    if bench.cuda:
        props = torch.cuda.get_device_properties(bench.device)
        device = f"{props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs, CUDA {torch.version.cuda}"
    else:
        device = f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return ["# muonlab on a GPU: the first measurements", "",
            f"Device: {device}. torch {torch.__version__}, Python {platform.python_version()}, muonlab {commit or 'unknown'}.",
            f"Command: `python benchmarks/gpu.py {' '.join(argv)}`. Written {time.strftime('%Y-%m-%d %H:%M')}.", ""]


SECTIONS = {
    "throughput": throughput_and_optimizer_steps,
    "muon": muon_against_torch,
    "loop": training_loop,
    "fsdp": fsdp_one_rank,
    "memory": memory,
}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (the first GPU) or cpu")
    parser.add_argument("--tiny", action="store_true", help="toy sizes, to check the script end to end")
    parser.add_argument("--no-compile", dest="compile", action="store_false", default=None,
                        help="no torch.compile in section 1 (default: compile, except with --tiny)")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {list(SECTIONS)}")
    parser.add_argument("--out", type=Path, default=HERE / "gpu.md")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"error: --device {args.device}, but torch {torch.__version__} sees no CUDA device; "
              f"--device cpu --tiny checks the script on a CPU", file=sys.stderr)
        return 2
    unknown = sorted(set(args.only.split(",")) - set(SECTIONS))
    if unknown:
        print(f"error: unknown section(s) {unknown}; valid: {list(SECTIONS)}", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.set_float32_matmul_precision("high")
    bench = Bench(device, TINY if args.tiny else FULL, compile_models=not args.tiny if args.compile is None else args.compile)
    report, errors, runs = environment(bench, argv), [], {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="muonlab-gpu-") as work:
        for name in args.only.split(","):
            section_started = time.perf_counter()
            print(f"[gpu.py] {name} ...", flush=True)
            try:
                function = SECTIONS[name]
                lines = function(bench, Path(work), runs) if name in ("loop", "fsdp") else function(bench)
            except Exception as e:  # one section's failure is a finding, not the end of the run
                lines = [f"## {name}: failed", "", "```", *traceback.format_exception(e)[-6:], "```"]
                errors.append(name)
                bench.free()
            seconds = time.perf_counter() - section_started
            report += [*lines, "", f"({name}: {seconds:.0f} s)", ""]
            print("\n".join(lines) + f"\n({name}: {seconds:.0f} s)\n", flush=True)
            with atomic_file(args.out) as tmp:
                tmp.write_text("\n".join(report + [f"Total so far: {time.perf_counter() - started:.0f} s.", ""]))
    total = time.perf_counter() - started
    report.append(f"Total: {total:.0f} s" + (f"; failed: {', '.join(errors)}." if errors else "."))
    with atomic_file(args.out) as tmp:
        tmp.write_text("\n".join(report) + "\n")
    print(f"[gpu.py] wrote {args.out} in {total:.0f} s" + (f"; failed sections: {errors}" if errors else ""), flush=True)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
