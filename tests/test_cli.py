"""Bad input through `python train.py`, as a user meets it: non-zero exit, one short message that says
what was wrong and what would be valid, no traceback."""

import pytest

from conftest import TINY, run_cli


def train(tmp_path, cache_dir, *overrides):
    return run_cli("train.py", *TINY, f"run_dir={tmp_path / 'run'}", f"paths.cache_dir={cache_dir}", *overrides)


def assert_clean_error(result, message):
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"error: {message}" in result.stderr or message in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


@pytest.mark.parametrize("overrides,message", [
    (["model.n_head=3"], "model.n_embd=64 is not divisible by model.n_head=3"),
    (["data.batch_tokens=1000"], "data.batch_tokens=1000 is not divisible by data.micro_batch x data.seq_len x world size = 2 x 32 x 1 = 64"),
    (["budget.tokens=100"], "budget.tokens=100 is smaller than one optimizer step of data.batch_tokens=128 tokens"),
    (["data.seq_len=256", "data.batch_tokens=512"], "data.seq_len=256 is longer than the model's context of 128 tokens"),
    (["data.source=/nonexistent/corpus.txt"], "data.source=/nonexistent/corpus.txt does not exist"),
])
def test_bad_config_exits_with_a_message(tmp_path, cache_dir, overrides, message):
    assert_clean_error(train(tmp_path, cache_dir, *overrides), message)


def test_corrupt_data_file(tmp_path, cache_dir):
    from data import dataset_dir, open_dataset
    from trainer.config import compose

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
