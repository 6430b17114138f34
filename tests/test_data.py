import numpy as np
import pytest
import torch

from data import DataError, SequenceSampler, TrainBatches, open_dataset, prepare_dataset, step_indices, validation_windows
from data.shards import HEADER_BYTES, TokenStream, read_shard, shard_problem, write_shard
from data.tokenizer import gpt2_tokenizer
from configs import ASSETS

SHAKESPEARE = {"name": "shakespeare", "kind": "text", "source": str(ASSETS / "tinyshakespeare.txt"), "val_fraction": 0.1}


@pytest.fixture
def shakespeare(cache_dir):
    return {**SHAKESPEARE, "cache_dir": str(cache_dir)}


def test_shard_round_trip_and_header(tmp_path):
    tokens = np.array([0, 1, 50256, 65535], dtype=np.uint16)
    write_shard(tmp_path / "s.bin", tokens)
    assert (tmp_path / "s.bin").stat().st_size == HEADER_BYTES + 8
    assert read_shard(tmp_path / "s.bin").tolist() == tokens.tolist()
    assert shard_problem(tmp_path / "s.bin", expected_tokens=4) is None
    assert "holds 4 tokens but meta.json says 5" in shard_problem(tmp_path / "s.bin", expected_tokens=5)


def test_truncated_and_foreign_shards_are_detected(tmp_path):
    write_shard(tmp_path / "s.bin", np.arange(100, dtype=np.uint16))
    with open(tmp_path / "s.bin", "r+b") as f:
        f.truncate(HEADER_BYTES + 150)
    assert "its header says 100 tokens but it holds 75" in shard_problem(tmp_path / "s.bin")
    (tmp_path / "junk.bin").write_bytes(b"x" * 200)
    assert "not a muonlab token shard" in shard_problem(tmp_path / "junk.bin")
    with pytest.raises(DataError, match="missing"):
        read_shard(tmp_path / "absent.bin")


def test_token_stream_windows_cross_shard_boundaries():
    stream = TokenStream([np.arange(0, 5, dtype=np.uint16), np.arange(5, 7, dtype=np.uint16), np.arange(7, 12, dtype=np.uint16)])
    assert len(stream) == 12
    assert stream.window(3, 6).tolist() == [3, 4, 5, 6, 7, 8]
    assert stream.window(0, 12).tolist() == list(range(12))
    with pytest.raises(IndexError):
        stream.window(8, 5)


def test_shakespeare_is_tokenized_once_with_a_fixed_split(shakespeare):
    tokens = open_dataset(shakespeare)
    train, val = tokens.splits["train"], tokens.splits["val"]
    assert (len(train), len(val)) == (304_223, 33_803)
    text = open(SHAKESPEARE["source"], encoding="utf-8").read()
    expected = gpt2_tokenizer().encode_ordinary(text) + [50256]
    assert train.window(0, 1000).tolist() == expected[:1000]
    assert val.window(len(val) - 5, 5).tolist() == expected[-5:]
    meta = tokens.meta
    assert (meta["eot_id"], meta["eot_placement"], meta["dtype"]) == (50256, "append", "uint16")
    assert meta["tokenizer_sha256"].startswith("306cd27f")
    # a second open reuses the files
    mtime = (tokens.directory / "train_000000.bin").stat().st_mtime_ns
    assert open_dataset(shakespeare).directory == tokens.directory
    assert (tokens.directory / "train_000000.bin").stat().st_mtime_ns == mtime


def test_corrupt_cache_is_an_error_for_training_and_rewritten_by_prepare_dataset(shakespeare, tmp_path):
    cfg = {**shakespeare, "cache_dir": str(tmp_path)}
    directory = open_dataset(cfg).directory
    with open(directory / "val_000000.bin", "r+b") as f:
        f.truncate(HEADER_BYTES + 10)
    with pytest.raises(DataError, match=r"val_000000.bin is corrupt: its header says 33803 tokens but it holds 5\. "
                                        r"Rewrite it with `python scripts/prepare_data.py data=shakespeare`"):
        open_dataset(cfg)
    prepare_dataset(cfg)
    assert len(open_dataset(cfg).splits["val"]) == 33_803


def test_missing_source_is_a_clear_error(shakespeare):
    with pytest.raises(DataError, match=r"data.source=/nonexistent/corpus.txt does not exist"):
        open_dataset({**shakespeare, "source": "/nonexistent/corpus.txt"})


def test_non_text_source_is_a_clear_error(shakespeare, tmp_path):
    (tmp_path / "binary.txt").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(DataError, match=r"binary.txt is not UTF-8 text"):
        open_dataset({**shakespeare, "source": str(tmp_path / "binary.txt"), "cache_dir": str(tmp_path)})


def test_sampler_is_a_pure_function_of_seed_and_index():
    a, b = SequenceSampler(10_001, 10, seed=3), SequenceSampler(10_001, 10, seed=3)
    idx = np.array([5, 999, 1000, 4321, 7])
    assert a.starts(idx).tolist() == b.starts(idx[::-1])[::-1].tolist()  # order of queries is irrelevant
    assert a.starts(idx).tolist() != SequenceSampler(10_001, 10, seed=4).starts(idx).tolist()


def test_sampler_visits_every_window_once_per_epoch():
    sampler = SequenceSampler(n_tokens=1_005, seq_len=10, seed=0)
    assert sampler.per_epoch == 100
    for epoch in range(3):
        starts = sampler.starts(np.arange(epoch * 100, (epoch + 1) * 100))
        offset = starts.min()
        assert 0 <= offset <= sampler.slack == 4
        assert sorted((starts - offset).tolist()) == list(range(0, 1000, 10))  # all windows, none twice
        assert starts.max() + 10 + 1 <= 1_005  # every window (inputs + shifted targets) fits


def test_step_indices_are_world_size_invariant():
    for step in range(4):
        one = step_indices(step, 8)
        two = np.concatenate([step_indices(step, 8, rank=r, world_size=2) for r in range(2)])
        four = np.concatenate([step_indices(step, 8, rank=r, world_size=4) for r in range(4)])
        assert one.tolist() == two.tolist() == four.tolist() == list(range(8 * step, 8 * step + 8))


def _take(batches, n):
    it = iter(batches)
    return [next(it) for _ in range(n)]


def test_train_batches_resume_from_a_step(shakespeare):
    stream = open_dataset(shakespeare).splits["train"]
    full = _take(TrainBatches(stream, 16, seqs_per_step=8, micro_batch=4, seed=1), 10)  # 5 steps x 2 micro-batches
    resumed = TrainBatches(stream, 16, seqs_per_step=8, micro_batch=4, seed=1)
    resumed.start_step = 3
    for (x, y), (rx, ry) in zip(full[6:], _take(resumed, 4)):
        assert torch.equal(x, rx) and torch.equal(y, ry)
    x, y = full[0]
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one


def test_train_batches_same_sequences_on_one_and_two_ranks(shakespeare):
    stream = open_dataset(shakespeare).splits["train"]
    one = _take(TrainBatches(stream, 16, seqs_per_step=8, micro_batch=4, seed=1), 6)
    ranks = [_take(TrainBatches(stream, 16, seqs_per_step=8, micro_batch=2, seed=1, rank=r, world_size=2), 6) for r in range(2)]
    for step in range(3):
        single = {tuple(row.tolist()) for x, _ in one[2 * step : 2 * step + 2] for row in x}
        split = {tuple(row.tolist()) for r in range(2) for x, _ in ranks[r][2 * step : 2 * step + 2] for row in x}
        assert single == split and len(single) == 8


def test_dataloader_workers_keep_the_order(shakespeare):
    stream = open_dataset(shakespeare).splits["train"]
    batches = TrainBatches(stream, 16, seqs_per_step=8, micro_batch=2, seed=1)
    serial = _take(batches, 8)
    parallel = _take(torch.utils.data.DataLoader(batches, batch_size=None, num_workers=2), 8)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(serial, parallel))


def test_validation_windows_are_the_first_tokens_of_the_split(shakespeare):
    val = open_dataset(shakespeare).splits["val"]
    windows = validation_windows(val, seq_len=32, max_tokens=1000)
    assert windows.shape == (31, 33)  # (1000 - 1) // 32 windows of 33 tokens
    assert windows[0].tolist() == val.window(0, 33).tolist()
    assert windows[1, 0] == windows[0, 32]  # consecutive windows share one boundary token
