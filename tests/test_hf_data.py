"""OpenWebText, C4 and FineWeb-Edu through `datasets`, on fixtures written at test time in the hubs' own formats."""

import gzip
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import run_cli
from data import DataError, TrainBatches, dataset_dir, open_dataset, prepare_dataset
from data.prepare import encode_batch
from data.shards import HEADER_BYTES
from data.tokenizer import EOT_ID, gpt2_tokenizer
from configs import ASSETS, compose
from trainer.metrics import read_metrics
from trainer.run import run


def shakespeare_documents() -> list[str]:
    """The corpus cut into documents at blank lines (speeches), ~7,200 of them."""
    text = (ASSETS / "tinyshakespeare.txt").read_text(encoding="utf-8")
    return [d.strip() for d in text.split("\n\n") if d.strip()]


def write_c4(root, docs_per_file=700):
    """C4's layout: en/c4-train.XXXXX-of-01024.json.gz, en/c4-validation.XXXXX-of-00008.json.gz."""
    docs = shakespeare_documents()
    (root / "en").mkdir(parents=True)
    files = {"train": [], "val": []}
    for i in range(3):
        name = f"c4-train.{i:05d}-of-01024.json.gz" if i < 2 else "c4-validation.00000-of-00008.json.gz"
        chunk = docs[i * docs_per_file : (i + 1) * docs_per_file]
        with gzip.open(root / "en" / name, "wt", encoding="utf-8") as f:
            for j, text in enumerate(chunk):
                f.write(json.dumps({"text": text, "timestamp": "2019-04-25T12:57:54Z", "url": f"https://example.org/{i}/{j}"}) + "\n")
        files["train" if i < 2 else "val"].append(chunk)
    return {split: [d for chunk in chunks for d in chunk] for split, chunks in files.items()}


def write_openwebtext(root, n_files=2):
    docs = shakespeare_documents()[:2000]
    root.mkdir(parents=True)
    per = len(docs) // n_files
    for i in range(n_files):
        pq.write_table(pa.table({"text": docs[i * per : (i + 1) * per]}), root / f"train-{i:05d}-of-{n_files:05d}.parquet")
    return docs[: per * n_files]


def write_fineweb_edu(root, n_files=2, docs_per_file=60):
    """FineWeb-Edu's layout: sample/100BT/000_00000.parquet, 001_00000.parquet, ... with a text column."""
    docs = shakespeare_documents()[: n_files * docs_per_file]
    (root / "sample" / "100BT").mkdir(parents=True)
    for i in range(n_files):
        chunk = docs[i * docs_per_file : (i + 1) * docs_per_file]
        pq.write_table(pa.table({"text": chunk, "id": [f"<urn:uuid:{i}-{j}>" for j in range(len(chunk))], "score": [3.1] * len(chunk)}),
                       root / "sample" / "100BT" / f"{i:03d}_00000.parquet")
    return docs


def encoded(documents) -> list[int]:
    enc = gpt2_tokenizer()
    return [t for d in documents for t in enc.encode_ordinary(d) + [EOT_ID]]


@pytest.fixture
def c4(tmp_path):
    docs = write_c4(tmp_path / "c4")
    cfg = compose(["data=c4", f"data.data_files={tmp_path / 'c4'}", f"paths.cache_dir={tmp_path / 'cache'}",
                   "data.shard_tokens=50000", "data.num_proc=1"]).data
    return cfg, docs


def test_c4_prepare_writes_shards_and_sidecar(c4):
    cfg, docs = c4
    tokens = open_dataset(cfg)  # prepared on first use
    meta = tokens.meta
    assert meta["splits"]["train"]["documents"] == 1400 and meta["splits"]["val"]["documents"] == 700
    assert len(meta["splits"]["train"]["shards"]) > 1  # 50,000-token shards
    assert all(s["tokens"] == 50_000 for s in meta["splits"]["train"]["shards"][:-1])
    assert (meta["eot_id"], meta["eot_placement"], meta["dtype"], meta["tokenizer"]) == (50256, "append", "uint16", "gpt2")
    assert meta["validation_rule"] == "the dataset's own validation split"
    assert [f["path"].split("/")[-1] for f in meta["source"]["files"]["val"]] == ["c4-validation.00000-of-00008.json.gz"]
    for split in ("train", "val"):  # token for token what tiktoken gives, documents in file order
        stream = tokens.splits[split]
        assert stream.window(0, len(stream)).tolist() == encoded(docs[split])


def test_prepare_is_idempotent_and_rewrites_a_truncated_shard(c4):
    cfg, _ = c4
    directory = prepare_dataset(cfg)
    n_train = len(open_dataset(cfg).splits["train"])
    shard = directory / "train_000000.bin"
    mtime = shard.stat().st_mtime_ns
    assert prepare_dataset(cfg) == directory and shard.stat().st_mtime_ns == mtime  # complete: reused
    with open(shard, "r+b") as f:
        f.truncate(HEADER_BYTES + 1000)
    with pytest.raises(DataError, match=r"train_000000.bin is corrupt: its header says 50000 tokens but it holds 500\. Rewrite it"):
        open_dataset(cfg)
    prepare_dataset(cfg)
    assert len(open_dataset(cfg).splits["train"]) == n_train


def test_parallel_tokenization_gives_the_same_shards(c4, tmp_path):
    cfg, _ = c4
    serial = open_dataset(cfg)
    parallel_cfg = compose(["data=c4", f"data.data_files={tmp_path / 'c4'}", f"paths.cache_dir={tmp_path / 'cache2'}",
                            "data.shard_tokens=50000", "data.num_proc=2"]).data
    parallel = open_dataset(parallel_cfg)
    for split in ("train", "val"):
        a, b = serial.splits[split], parallel.splits[split]
        assert np.array_equal(a.window(0, len(a)), b.window(0, len(b)))


def test_token_cap_prepares_part_of_the_train_split(tmp_path):
    write_c4(tmp_path / "c4")
    cfg = compose(["data=c4", f"data.data_files={tmp_path / 'c4'}", f"paths.cache_dir={tmp_path / 'cache'}",
                   "data.max_tokens=12345", "data.num_proc=1"]).data
    tokens = open_dataset(cfg)
    assert len(tokens.splits["train"]) == 12_345 and tokens.meta["config"]["max_tokens"] == 12_345


def test_eot_prepend(tmp_path):
    docs = write_c4(tmp_path / "c4")
    cfg = compose(["data=c4", f"data.data_files={tmp_path / 'c4'}", f"paths.cache_dir={tmp_path / 'cache'}",
                   "data.eot=prepend", "data.num_proc=1"]).data
    val = open_dataset(cfg).splits["val"]
    enc = gpt2_tokenizer()
    first = [EOT_ID] + enc.encode_ordinary(docs["val"][0])
    assert val.window(0, len(first)).tolist() == first


def test_openwebtext_holds_out_nanogpts_fraction_of_documents(tmp_path):
    import datasets

    docs = write_openwebtext(tmp_path / "owt")
    cfg = compose(["data=openwebtext", f"data.data_files={tmp_path / 'owt'}", f"paths.cache_dir={tmp_path / 'cache'}",
                   "data.val_fraction=0.05", "data.num_proc=1"]).data
    tokens = open_dataset(cfg)
    expected = datasets.Dataset.from_dict({"text": docs}).train_test_split(test_size=0.05, seed=2357, shuffle=True)
    assert tokens.meta["splits"]["val"]["documents"] == len(expected["test"]) == 100
    val = tokens.splits["val"]
    assert val.window(0, len(val)).tolist() == encoded(expected["test"]["text"])
    assert tokens.meta["validation_rule"] == "train_test_split(test_size=0.05, seed=2357, shuffle=True) of the documents"
    assert tokens.meta["seed"] == 2357


def test_openwebtext_default_rule_is_nanogpts():
    cfg = compose(["data=openwebtext"]).data
    assert (cfg.val_fraction, cfg.val_seed, cfg.hf_path) == (0.0005, 2357, "Skylion007/openwebtext")


def test_sampler_resume_and_world_size_invariance_on_shards(c4):
    cfg, _ = c4
    stream = open_dataset(cfg).splits["train"]
    assert len(stream.shards) > 1
    one = TrainBatches(stream, 64, seqs_per_step=8, micro_batch=8, seed=5)
    resumed = TrainBatches(stream, 64, seqs_per_step=8, micro_batch=8, seed=5)
    resumed.start_step = 7
    assert torch.equal(one.step_batches(7)[0][0], next(iter(resumed))[0])
    ranks = [TrainBatches(stream, 64, seqs_per_step=8, micro_batch=4, seed=5, rank=r, world_size=2) for r in range(2)]
    for step in range(3):
        single = {tuple(row.tolist()) for row in one.step_batches(step)[0][0]}
        split = {tuple(row.tolist()) for r in ranks for row in r.step_batches(step)[0][0]}
        assert single == split


def test_hub_load_without_network_fails_fast_with_the_local_command(tmp_path, monkeypatch):
    cfg = compose(["data=c4", f"paths.cache_dir={tmp_path}"]).data
    with pytest.raises(DataError, match=r"cannot load allenai/c4 from the Hugging Face hub \(HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set\)\. "
                                        r"Prepare it from local files in the hub's layout instead: python scripts/prepare_data.py data=c4 "
                                        r"data.data_files=<path, glob or directory> \(C4's layout: en/c4-train"):
        prepare_dataset(cfg)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")  # an unresolvable host, as on a machine without network
    with pytest.raises(DataError, match=r"cannot load allenai/c4 from the Hugging Face hub \(https://hub.invalid unreachable"):
        prepare_dataset(cfg)


def test_local_files_that_do_not_match_the_layout_are_named(tmp_path):
    (tmp_path / "c4").mkdir()
    (tmp_path / "c4" / "part-0.json.gz").write_bytes(gzip.compress(b'{"text": "x"}\n'))
    cfg = compose(["data=c4", f"data.data_files={tmp_path / 'c4'}", f"paths.cache_dir={tmp_path}"]).data
    with pytest.raises(DataError, match=r"no files match \{'train': 'c4-train.\*.json\*', 'val': 'c4-validation.\*.json\*'\} \(found part-0.json.gz\); C4's layout"):
        dataset_dir(cfg)


def test_prepare_data_script_and_training_on_local_c4(tmp_path, cache_dir):
    write_c4(tmp_path / "c4")
    args = ["data=c4", f"data.data_files={tmp_path / 'c4'}", f"paths.cache_dir={tmp_path / 'cache'}"]
    result = run_cli("scripts/prepare_data.py", *args)
    assert result.returncode == 0, result.stderr
    assert "c4: train " in result.stdout and "tokens in" in result.stdout
    cfg = compose([*args, "model=gpt2_tiny", "data.seq_len=64", "data.batch_tokens=256", "data.micro_batch=4",
                   "budget.tokens=2560", "eval.every_tokens=1280", "eval.tokens=4096", "callbacks=none", f"run_dir={tmp_path / 'run'}"])
    result = run(cfg)
    rows = read_metrics(tmp_path / "run" / "metrics.csv")
    assert [r["tokens"] for r in rows if "val_loss" in r] == [1280, 2560]
    assert rows[-1]["val_loss"] == result.val_loss < rows[0]["train_loss"]


def fineweb_cfg(tmp_path, *overrides):
    return compose(["data=fineweb_edu", f"data.data_files={tmp_path / 'fw'}", f"paths.cache_dir={tmp_path / 'cache'}",
                    "data.val_head_tokens=300", "data.shard_tokens=1000", "data.num_proc=1", *overrides]).data


def test_fineweb_edu_validates_on_the_head_of_the_train_stream(tmp_path):
    docs = write_fineweb_edu(tmp_path / "fw")
    tokens = open_dataset(fineweb_cfg(tmp_path))
    stream = encode_batch(docs, "append").tolist()  # every document in file order, as llm.c reads them
    val, train = (tokens.splits[s].window(0, len(tokens.splits[s])).tolist() for s in ("val", "train"))
    assert len(val) == 300 and len(val) + len(train) == len(stream) > 1000  # train spans several 1,000-token shards
    assert val + train == stream  # the document crossing the boundary is split between the two
    meta = tokens.meta
    assert val[-1] != EOT_ID and meta["splits"]["val"]["documents"] + meta["splits"]["train"]["documents"] == len(docs)
    assert meta["validation_rule"] == "the first 300 tokens of the train stream (llm.c's FineWeb split)"
    assert meta["config"]["val_head_tokens"] == 300 and meta["seed"] is None
    assert [f["path"].split("/")[-1] for f in meta["source"]["files"]["train"]] == ["000_00000.parquet", "001_00000.parquet"]

    capped = open_dataset(fineweb_cfg(tmp_path, "data.max_tokens=500"))
    assert capped.directory != tokens.directory  # the cap is in the fingerprint
    assert len(capped.splits["val"]) == 300 and capped.splits["train"].window(0, len(capped.splits["train"])).tolist() == train[:500]


def test_fineweb_edu_head_longer_than_the_stream_is_an_error(tmp_path):
    write_fineweb_edu(tmp_path / "fw", n_files=1, docs_per_file=3)
    with pytest.raises(DataError, match=r"fineweb_edu: the train stream holds only [\d,]+ tokens, all of them taken by "
                                        r"data.val_head_tokens=100000; lower data.val_head_tokens"):
        prepare_dataset(fineweb_cfg(tmp_path, "data.val_head_tokens=100000"))
    with pytest.raises(DataError, match=r"data.val_head_tokens=300 makes the validation split \(the first 300 tokens of the train "
                                        r"stream\): set data.val_fraction=null and data.val_max_tokens=null"):
        prepare_dataset(fineweb_cfg(tmp_path, "data.val_fraction=0.1"))


def test_fineweb_edu_config_is_llm_cs_split_of_sample_100bt():
    cfg = compose(["data=fineweb_edu"]).data
    assert (cfg.hf_path, cfg.hf_name, cfg.val_head_tokens, cfg.val_fraction, cfg.eot) == (
        "HuggingFaceFW/fineweb-edu", "sample-100BT", 100_000_000, None, "append")
    assert (cfg.seq_len, cfg.batch_tokens, cfg.micro_batch) == (1024, 491520, 8)
    assert compose(["data=c4"]).data.val_head_tokens is None and compose(["data=openwebtext"]).data.val_head_tokens is None
