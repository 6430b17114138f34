"""Every option of every config group composes and builds what it describes."""

from pathlib import Path

import hydra
import pytest
import torch
from omegaconf import OmegaConf

from conftest import ROOT, run_cli
from models import build_model
from optim.schedules import Schedule
from configs import compose
from trainer.loggers import build_loggers
from trainer.optimizers import build_optimizer

GROUPS = ["model", "data", "optim", "schedule", "trainer", "logger", "callbacks", "paths", "experiment"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (ROOT / "configs" / group).glob("*.yaml"))


def test_every_group_has_options():
    assert all(options(g) for g in GROUPS)
    assert {"gpt2_125m", "gpt2_350m", "gpt2_774m", "gpt2_1.5b", "llama_60m", "llama_130m", "llama_350m", "llama_1b"} <= set(options("model"))
    assert {"adamw", "muon", "muon_torch"} <= set(options("optim"))
    assert {"cosine", "wsd", "linear", "constant"} == set(options("schedule"))
    assert {"cpu", "gpu"} <= set(options("trainer"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_option_composes_and_builds(group, option, tmp_path):
    cfg = compose([f"{group}={option}", f"run_dir={tmp_path}"])
    if group == "experiment":
        return  # experiments compose (above); each is trained by its own test where it is cheap
    node = cfg[group]
    if group == "model":
        with torch.device("meta"):
            assert sum(p.numel() for p in build_model(OmegaConf.to_container(node)).parameters()) > 0
    elif group == "optim":
        tiny = build_model(OmegaConf.to_container(compose(["model=gpt2_tiny"]).model))
        optimizer = build_optimizer(tiny, node)
        per_head = {"matrix_head_rows", "matrix_head_cols"} if node.split_heads else set()
        assert {g["name"] for g in optimizer.param_groups} == {"matrix", "embedding", "vector"} | per_head
    elif group == "schedule":
        assert 0 <= Schedule(**node).factor(cfg.budget.tokens, cfg.budget.tokens) <= 1
    elif group == "trainer":
        assert node.accelerator in ("cpu", "gpu") and node.precision in ("32-true", "bf16-mixed")
    elif group == "logger":
        loggers = build_loggers(cfg, tmp_path)
        assert len(loggers) == (0 if option == "csv" else 1)
    elif group == "callbacks":
        built = {name: type(hydra.utils.instantiate(c)).__name__ for name, c in node.items()}
        assert built == {"default": {"progress": "TokenProgressBar"}, "none": {},
                         "diagnostics": {"progress": "TokenProgressBar", "diagnostics": "SpectralDiagnostics"}}[option]
    elif group == "data":
        assert node.seq_len >= 1 and node.batch_tokens % node.seq_len == 0
        assert Path(node.source).is_file() if node.kind == "text" else node.hf_path
    elif group == "paths":
        assert Path(node.root) == ROOT


def test_both_mirrors_at_once(tmp_path):
    cfg = compose(["logger=[wandb,tensorboard]", f"run_dir={tmp_path}"])
    assert sorted(type(l).__name__ for l in build_loggers(cfg, tmp_path)) == ["TensorBoardLogger", "WandbLogger"]


def test_short_knobs_exist_with_these_names():
    cfg = compose(["budget.tokens=123", "seed=7", "data.seq_len=64", "data.batch_tokens=512", "optim.lr=0.02", "trainer=gpu"])
    assert (cfg.budget.tokens, cfg.seed, cfg.data.seq_len, cfg.data.batch_tokens) == (123, 7, 64, 512)
    assert cfg.optim.matrix.lr == cfg.optim.aux.lr == 0.02  # one lr drives both parts
    assert cfg.data.seed == 7  # the data order follows the seed unless data.seed is set
    assert cfg.trainer.accelerator == "gpu"


def test_unknown_group_option_lists_the_choices():
    result = run_cli("train.py", "optim=sgd")
    assert result.returncode == 1
    assert "Could not find 'optim/sgd'" in result.stderr
    listed = result.stderr.split("Available options in 'optim':")[1].split("Config search path")[0].split()
    assert listed == sorted(p.stem for p in (ROOT / "configs" / "optim").glob("*.yaml"))  # the README shows this list


def test_help_lists_the_groups():
    result = run_cli("train.py", "--help")
    assert result.returncode == 0
    for group in ("model:", "optim:", "schedule:", "trainer:", "gpt2_125m", "llama_1b", "muon_torch"):
        assert group in result.stdout
