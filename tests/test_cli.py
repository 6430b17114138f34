"""Bad input through `python train.py`, as a user meets it: non-zero exit, one short message that says
what was wrong and what would be valid, no traceback."""

import pytest
import torch

from conftest import TINY, run_cli


def train(tmp_path, cache_dir, *overrides):
    return run_cli("train.py", *TINY, f"run_dir={tmp_path / 'run'}", f"paths.cache_dir={cache_dir}", *overrides)


def assert_clean_error(result, message):
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"error: {message}" in result.stderr or message in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_every_config_problem_is_listed_in_one_message(tmp_path, cache_dir):
    """make_plan reports all it finds at once (one start-up per mistake would be one rerun per mistake)."""
    result = train(tmp_path, cache_dir, "model.n_head=3", "data.seq_len=256", "data.batch_tokens=1000", "budget.tokens=100",
                   "model.vocab_size=32000")
    for message in ("model.n_embd=64 is not divisible by model.n_head=3",
                    "data.seq_len=256 is longer than the model's context of 128 tokens",
                    "data.batch_tokens=1000 is not divisible by data.micro_batch x data.seq_len x world size = 2 x 256 x 1 = 512 "
                    "(valid nearby: 512, 1024)",
                    "budget.tokens=100 is smaller than one optimizer step of data.batch_tokens=1000 tokens",
                    "model.vocab_size=32000 is too small for tokenizer=gpt2, whose corpora hold ids up to 50256: use "
                    "model.vocab_size=50257 or more (50304: padded to a multiple of 64)"):
        assert f"  - {message}" in result.stderr
    assert_clean_error(result, "invalid configuration:")


def test_a_missing_text_file_exits_with_a_message(tmp_path, cache_dir):
    assert_clean_error(train(tmp_path, cache_dir, "data.source=/nonexistent/corpus.txt"),
                       "data.source=/nonexistent/corpus.txt does not exist")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the messages for a machine without CUDA")
@pytest.mark.parametrize("overrides,message", [
    (["trainer=ddp", "trainer.devices=2"], "use trainer.accelerator=cpu trainer.precision=32-true to run trainer.strategy=ddp over CPU processes"),
    (["optim.lr=abc"], "optim.lr='abc' is not a number (optim.Muon's lr; its default: 0.001)"),
])  # the other device and number checks: tests/test_parallel.py, tests/test_plan.py
def test_a_start_up_mistake_exits_with_one_message(tmp_path, cache_dir, overrides, message):
    assert_clean_error(train(tmp_path, cache_dir, *overrides), message)


def test_a_run_dir_that_is_a_file_is_refused_before_hydra_makes_it(tmp_path, cache_dir):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a run dir")
    result = run_cli("train.py", *TINY, f"run_dir={a_file}", f"paths.cache_dir={cache_dir}")
    assert_clean_error(result, f"run_dir={a_file} is a file: pass a directory")
    result = run_cli("train.py", *TINY, f"run_dir={a_file / 'run'}", f"paths.cache_dir={cache_dir}")
    assert_clean_error(result, f"run_dir={a_file / 'run'} lies under {a_file}, which is a file")


def test_corrupt_data_file(tmp_path, cache_dir):
    from data import dataset_dir, open_dataset
    from configs import compose

    cfg = compose([f"paths.cache_dir={tmp_path / 'cache'}"])
    shard = open_dataset(cfg.data).directory / "train_000000.bin"
    shard.write_bytes(shard.read_bytes()[:5000])
    result = train(tmp_path, tmp_path / "cache")
    assert_clean_error(result, f"{shard} is corrupt: its header says 304223 tokens but it holds 2468")
    assert "python scripts/prepare_data.py data=shakespeare" in result.stderr
    assert dataset_dir(cfg.data) == shard.parent


def test_corrupt_checkpoint(tmp_path, cache_dir):
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"not a checkpoint")
    assert_clean_error(train(tmp_path, cache_dir), f"checkpoint {checkpoint} is corrupt or unreadable")


def test_unknown_key_is_refused_by_hydra(tmp_path, cache_dir):
    result = train(tmp_path, cache_dir, "optim.lrr=0.1")
    assert result.returncode == 1 and "Could not override 'optim.lrr'" in result.stderr


def test_a_large_model_on_the_default_run_is_warned_about_before_anything_runs(tmp_path, cache_dir):
    """model=llama_1b with the CPU default run's lr, gamma, data and budget: a warning naming each and the
    experiment that pins the paper setting (here stopped by a bad budget, so nothing trains)."""
    result = run_cli("train.py", "model=llama_1b", "optim=muon_nsr", "budget.tokens=1", f"run_dir={tmp_path / 'run'}",
                     f"paths.cache_dir={cache_dir}")
    assert_clean_error(result, "budget.tokens=1 is smaller than one optimizer step")
    out = result.stdout
    assert "warning: model=llama_1b (1414.1M parameters) runs with the settings of the CPU default run" in out
    assert "optim=muon_nsr: optim.lr=0.012 (the default run's best), optim.matrix.gamma=10" in out
    assert "data=shakespeare: data.seq_len=128, data.batch_tokens=1,024, budget.tokens=1" in out
    # muon2_llama_1b_c4 has this model but no tuning for muon_nsr (it would refuse it): the NSR paper's settings instead
    assert ("no paper setting with this model tunes optim=muon_nsr (experiment=muon2_llama_1b_c4: other optimizers); those that "
            "tune it, at their own sizes: ") in out and "experiment=vam_llama_1.2b_c4" in out
    assert "warning: model=llama_1b (1414.1M parameters) on trainer=cpu: fp32 on the CPU" in out


def test_the_default_run_and_small_models_get_no_warning():
    from configs import compose
    from trainer.setting import setting_warnings

    assert setting_warnings(compose([])) == []
    assert setting_warnings(compose(["experiment=cpu_repro", "optim=muon2"])) == []
    assert setting_warnings(compose(["experiment=mars_m_gpt2_small_owt", "optim=muon"])) == []  # a paper setting as pinned


def test_a_streamed_corpus_without_a_token_cap_is_warned_about():
    from configs import compose
    from trainer.setting import setting_warnings

    warnings = setting_warnings(compose(["data=c4", "model=gpt2_tiny", "budget.tokens=1310720"]))
    assert warnings == ["data=c4 with data.max_tokens=null prepares its whole train split (all of C4 is ~156B tokens, "
                        "~46 h to tokenize, longer than the SLURM presets' 24 h); this budget needs data.max_tokens=1310976"]
