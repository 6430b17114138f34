"""benchmarks/gpu.py, the script prepared for the first GPU: every section end to end at toy sizes on the CPU,
so that it cannot rot before a GPU is at hand."""

import re

import pytest
import torch

from conftest import run_cli

SECTIONS = ["## 1. Training steps, bf16 autocast, Muon", "## 2. Optimizer step / forward+backward",
            "## 3. Our Muon against torch.optim.Muon, bf16 Newton–Schulz", "## 4. The training loop: bf16-mixed against fp32",
            "## 5. FSDP2 on one rank", "## 6. Peak memory"]


@pytest.mark.slow
def test_the_gpu_benchmark_runs_every_section_on_a_cpu_at_toy_sizes(tmp_path):
    out = tmp_path / "gpu.md"
    result = run_cli("benchmarks/gpu.py", "--device", "cpu", "--tiny", "--out", str(out), timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = out.read_text()
    assert [line for line in report.splitlines() if line.startswith("## ")] == SECTIONS  # none "failed"
    assert re.search(r"\| gpt2_tiny \| 3\.3M \| 1 x 16 \| [\d.]+ \| [\d.]+ \| [\d,]+ \| [\d.]+% \|", report)
    assert re.search(r"\| llama_tiny \| (\d+\.\d ms = [\d.]+% \| ?){4}$", report, re.MULTILINE)  # muon, muon2, muon_nsr, mars_m
    assert re.search(r"\| ours \| [\d.]+ \| [\d.]+x \|\n\| torch\.optim\.Muon \| [\d.]+ \| 1\.00x \|", report)
    difference = float(re.search(r"\| largest train-loss difference \| ([\d.]+)", report).group(1))
    assert difference < 0.01  # 4 steps of bf16-mixed against fp32
    assert "| fsdp, 1 rank | 4 steps, final val loss" in report
    assert report.count("activation checkpointing o") == 2 and "out of memory" not in report
    assert re.search(r"Total: \d+ s\.\n$", report)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message for a machine without CUDA")
def test_asking_for_a_gpu_where_there_is_none_says_how_to_check_the_script(tmp_path):
    result = run_cli("benchmarks/gpu.py", "--out", str(tmp_path / "gpu.md"))
    assert result.returncode == 2 and "sees no CUDA device; --device cpu --tiny checks the script on a CPU" in result.stderr
    assert not (tmp_path / "gpu.md").exists()
