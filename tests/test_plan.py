import pytest
import torch
from omegaconf import OmegaConf

from trainer.errors import ConfigError
from trainer.plan import make_plan


def test_default_run_plan(make_cfg):
    from configs import compose

    plan = make_plan(compose([]), world_size=1)
    assert (plan.seq_len, plan.micro_batch, plan.tokens_per_step, plan.accumulation) == (128, 8, 1024, 1)
    assert plan.total_steps == 292 and plan.budget_tokens == 299_008


def test_accumulation_is_derived_from_the_global_batch(make_cfg):
    plan = make_plan(make_cfg("data.batch_tokens=512", "data.micro_batch=4", "data.seq_len=32"), world_size=2)
    assert plan.accumulation == 2  # 512 / (4 x 32 x 2)
    assert plan.seqs_per_step == 16


def test_eval_and_checkpoint_fire_on_crossing_multiples(make_cfg):
    plan = make_plan(make_cfg("eval.every_tokens=300", "checkpoint.every_tokens=1000"), world_size=1)
    evals = [plan.tokens_at(s) for s in range(1, plan.total_steps + 1) if plan.eval_due(s)]
    assert evals == [384, 640, 1024, 1280, 1536, 1920, 2176, 2432, 2560]
    ckpts = [plan.tokens_at(s) for s in range(1, plan.total_steps + 1) if plan.checkpoint_due(s)]
    assert ckpts == [1024, 2048, 2560]


@pytest.mark.parametrize("overrides,message", [
    (["model.n_head=3"], "model.n_embd=64 is not divisible by model.n_head=3 (valid n_head for this width: [1, 2, 4, 8, 16, 32, 64])"),
    (["data.batch_tokens=1000"], "data.batch_tokens=1000 is not divisible by data.micro_batch x data.seq_len x world size = 2 x 32 x 1 = 64 (valid nearby: 960, 1024)"),
    (["budget.tokens=100"], "budget.tokens=100 is smaller than one optimizer step of data.batch_tokens=128 tokens"),
    (["data.seq_len=256", "data.batch_tokens=512"], "data.seq_len=256 is longer than the model's context of 128 tokens"),
    (["schedule.warmup=2"], "schedule.warmup=2 must be a fraction of the budget in [0, 1)"),
    (["eval.tokens=10"], "eval.tokens=10 must hold at least one sequence of data.seq_len + 1 = 33 tokens"),
])
def test_bad_config_messages(make_cfg, overrides, message):
    with pytest.raises(ConfigError) as error:
        make_plan(make_cfg(*overrides), world_size=1)
    assert message in str(error.value)


def test_all_problems_are_reported_together(make_cfg):
    with pytest.raises(ConfigError) as error:
        make_plan(make_cfg("model.n_head=3", "budget.tokens=100"), world_size=1)
    assert "n_head=3" in str(error.value) and "budget.tokens=100" in str(error.value)


def test_world_size_enters_the_divisibility_check(make_cfg):
    with pytest.raises(ConfigError, match=r"2 x 32 x 4 = 256"):
        make_plan(make_cfg(), world_size=4)


def test_flops_per_token_count_the_attention_scores_as_nanogpt_does():
    from models import build_model
    from configs import compose
    from trainer.throughput import flops_per_token

    with torch.device("meta"):
        model = build_model(OmegaConf.to_container(compose(["model=gpt2_125m"]).model))
    # 6 N (85M hidden matrices + the tied 50257 x 768 head) + 12 L T d (nanoGPT's estimate_mfu: 12 * L * H * Q * T)
    assert flops_per_token(model, 1024) == 6 * (84_934_656 + 50_257 * 768) + 12 * 12 * 1024 * 768


@pytest.mark.parametrize("name,mixed,tflops", [
    ("NVIDIA H100 80GB HBM3", True, 989), ("NVIDIA H100 80GB HBM3", False, 494), ("NVIDIA H100 PCIe", True, 756),
    ("NVIDIA H200", True, 989), ("NVIDIA GH200 480GB", True, 989), ("NVIDIA A100-SXM4-80GB", True, 312),
    ("NVIDIA A100 80GB PCIe", False, 156), ("NVIDIA L40S", True, 362), ("NVIDIA L4", True, 121),
])
def test_the_datasheet_peak_is_found_by_device_name(name, mixed, tflops):
    from trainer.throughput import datasheet_peak_flops

    assert datasheet_peak_flops(name, mixed) == tflops * 1e12


def test_an_unknown_device_has_no_datasheet_peak_and_a_cpu_run_measures_it():
    from trainer.throughput import datasheet_peak_flops, peak_flops

    assert datasheet_peak_flops("Tesla T4", True) is None
    assert peak_flops(torch.device("cpu"), "32-true", configured=2e12) == (2e12, "config")
    flops, source = peak_flops(torch.device("cpu"), "32-true", configured=None)
    assert source == "measured" and flops > 1e8


@pytest.mark.parametrize("overrides,message", [
    (["budget.tokens=many"], "budget.tokens='many' is not an integer"),
    (["data.seq_len=3.5"], "data.seq_len=3.5 is not an integer"),
    (["eval.batch_tokens=lots"], "eval.batch_tokens='lots' is not an integer (or null)"),
    (["grad_clip=big"], "grad_clip='big' is not a number (or null)"),
    (["optim.lr=abc"], "optim.lr='abc' is not a number (optim.Muon's lr; its default: 0.001)"),
    (["optim=adamw", "optim.aux.betas=[0.9,a]"], "optim.aux.betas=[0.9, 'a'] is not a list of 2 numbers"),
    (["optim.matrix.nesterov=3"], "optim.matrix.nesterov=3 is not true or false"),
])
def test_values_that_are_not_numbers_are_named_where_they_are_set(make_cfg, overrides, message):
    with pytest.raises(ConfigError) as error:
        make_plan(make_cfg(*overrides), world_size=1)
    assert message in str(error.value)


def test_whole_floats_count_as_integers_and_a_file_is_no_run_dir(make_cfg, tmp_path):
    assert make_plan(make_cfg("budget.tokens=2560.0"), world_size=1).total_steps == 20
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="is a file: pass a directory"):
        make_plan(make_cfg(run_dir=tmp_path / "file"), world_size=1)
