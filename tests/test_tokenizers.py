"""The tokenizer group on tiny real tokenizers in the papers' id layouts (tests/tokenizer_files.py): shards
hold exactly the tokenizer's own ids with its boundary tokens, transformers reads the same ids from the
same files, ids past 65,535 get 4-byte shards, and every mistake is one message."""

from __future__ import annotations

import json

import numpy as np
import pytest

import tokenizer_files
from configs import compose
from data import open_dataset
from data.tokenizer import TokenizerError, file_sha256, load_tokenizer
from omegaconf import OmegaConf

TEXT = "Hello there, my lord! Thou art welcome. é"
# tokenizer group -> (the fixture that writes its file, what the tokenizer puts before / after each document)
LAYOUTS = {
    "t5": (tokenizer_files.t5_model, [], ["</s>"]),
    "llama2": (tokenizer_files.llama2_model, ["<s>"], []),
    "llama3": (tokenizer_files.bpe_json, ["<|begin_of_text|>"], ["<|end_of_text|>"]),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return {name: make(tmp_path_factory.mktemp(name)) for name, (make, _, _) in LAYOUTS.items()}  # a directory each


def tokenizer_cfg(name: str, path) -> dict:
    return OmegaConf.to_container(compose([f"tokenizer={name}", f"tokenizer.path={path}"]).tokenizer, resolve=True)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_shards_hold_the_tokenizers_own_ids_and_its_boundary_tokens(name, files, tmp_path):
    cfg = compose([f"tokenizer={name}", f"tokenizer.path={files[name]}", f"paths.cache_dir={tmp_path}"])
    tokens = open_dataset(OmegaConf.to_container(cfg.data, resolve=True))
    tok = load_tokenizer(OmegaConf.to_container(cfg.tokenizer, resolve=True))
    before = [tok.bos_id] if LAYOUTS[name][1] else []
    after = [tok.eos_id] if LAYOUTS[name][2] else []
    text = tokenizer_files.SHAKESPEARE.read_text()
    expected = before + tok.encode_batch([text])[0] + after
    stream = np.concatenate([tokens.splits[s].window(0, len(tokens.splits[s])) for s in ("train", "val")])
    assert stream.tolist() == expected
    meta = tokens.meta
    assert (meta["tokenizer"], meta["dtype"], meta["eot_placement"]) == (name, "uint16", cfg.tokenizer.eot)
    assert meta["tokenizer_identity"]["sha256"] == [file_sha256(files[name])]
    gpt2_dir = open_dataset(OmegaConf.to_container(compose([f"paths.cache_dir={tmp_path}"]).data, resolve=True)).directory
    assert tokens.directory != gpt2_dir  # the tokenizer is part of the cache's name


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_boundary_tokens_are_the_ones_the_paper_tokenizer_names(name, files):
    tok = load_tokenizer(tokenizer_cfg(name, files[name]))
    _, before, after = LAYOUTS[name]
    spelled = {"t5": {"</s>": 1, "<pad>": 0}, "llama2": {"<s>": 1, "</s>": 2, "<unk>": 0},
               "llama3": {"<|begin_of_text|>": 0, "<|end_of_text|>": 1}}[name]
    ids = tok.boundary(tokenizer_cfg(name, files[name])["eot"])
    assert ids == ([spelled[t] for t in before], [spelled[t] for t in after])
    assert tok.pad_id == {"t5": 0, "llama2": 0, "llama3": None}[name]  # GaLore pads with 0; Suite B with unk = 0


def test_transformers_reads_the_same_ids_from_the_same_files(files, tmp_path):
    from transformers import LlamaTokenizer, PreTrainedTokenizerFast, T5Tokenizer

    for name, load in (("t5", lambda d: T5Tokenizer.from_pretrained(d, local_files_only=True, extra_ids=0)),
                       ("llama2", lambda d: LlamaTokenizer.from_pretrained(d, local_files_only=True)),
                       ("llama3", lambda d: PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json")))):
        ours = load_tokenizer(tokenizer_cfg(name, files[name])).encode_batch([TEXT, "Second document."])
        theirs = load(files[name].parent)
        assert [theirs(t, add_special_tokens=False).input_ids for t in (TEXT, "Second document.")] == ours, name


def test_piece_bytes_count_the_utf8_bytes_of_the_text(files):
    """bits per byte divide by these: exact for byte-level BPE and byte fallback; SentencePiece's word-start
    ▁ adds one byte at the start of a document, and an unknown character (T5 has no é) counts none."""
    text_bytes = len(TEXT.encode())
    for name, extra in (("llama3", 0), ("llama2", 1), ("t5", 1 - len("é".encode()))):
        tok = load_tokenizer(tokenizer_cfg(name, files[name]))
        assert tok.piece_bytes()[tok.encode_batch([TEXT])[0]].sum() == text_bytes + extra, name
    gpt2 = load_tokenizer()
    assert gpt2.piece_bytes()[gpt2.encode_batch([TEXT])[0]].sum() == text_bytes and gpt2.piece_bytes()[50256] == 0


def test_ids_past_65535_are_stored_in_four_bytes(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "hello": 1, "world": 2, "<eot>": 70000}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<eot>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("hello world " * 50)
    cfg = compose(["tokenizer=file", f"tokenizer.path={tmp_path / 'tokenizer.json'}", "tokenizer.eos_token='<eot>'",
                   f"data.source={corpus}", f"paths.cache_dir={tmp_path / 'cache'}"])
    tokens = open_dataset(OmegaConf.to_container(cfg.data, resolve=True))
    assert tokens.meta["dtype"] == "uint32"
    val = tokens.splits["val"]
    assert val.window(len(val) - 3, 3).tolist() == [1, 2, 70000]
    shard = tokens.directory / tokens.meta["splits"]["val"]["shards"][0]["file"]
    assert shard.stat().st_size == 64 + 4 * len(val)


def test_the_vocabulary_check_is_the_largest_id_a_corpus_holds(files):
    from trainer.plan import tokenizer_of, vocabulary_problems

    t5 = tokenizer_of(compose(["tokenizer=t5", f"tokenizer.path={files['t5']}"]))
    assert vocabulary_problems(t5, 512) == []  # ids 0..511; GaLore's 32000 with t5-base's 32,100 is legal the same way
    assert vocabulary_problems(t5, 500) == [
        "model.vocab_size=500 is too small for tokenizer=t5, whose corpora hold ids up to 511: use model.vocab_size=512 or "
        "more (512: padded to a multiple of 64), or a smaller tokenizer (tokenizer=t5 or llama2: 32000); `python "
        "scripts/count_params.py model=... model.vocab_size=500` still counts a model at 500"]
    assert "whose corpora hold ids up to 50256" in vocabulary_problems(tokenizer_of(compose([])), 32000)[0]


def test_each_mistake_is_one_message_naming_the_fix(tmp_path):
    with pytest.raises(TokenizerError, match=r"tokenizer=file needs its file: pass tokenizer.path=<a tokenizer.json"):
        load_tokenizer(OmegaConf.to_container(compose(["tokenizer=file"]).tokenizer, resolve=True))
    with pytest.raises(TokenizerError, match=f"tokenizer.path={tmp_path / 'nope.json'} does not exist"):
        load_tokenizer(tokenizer_cfg("file", tmp_path / "nope.json"))
    garbage = tmp_path / "tokenizer.json"
    garbage.write_text("{not json")
    with pytest.raises(TokenizerError, match=f"tokenizer.path={garbage} does not parse as a tokenizer.json"):
        load_tokenizer(tokenizer_cfg("file", garbage))
    (tmp_path / "bad.model").write_bytes(b"\x00garbage")
    with pytest.raises(TokenizerError, match="does not parse as a SentencePiece model"):
        load_tokenizer(tokenizer_cfg("file", tmp_path / "bad.model"))
    with pytest.raises(TokenizerError, match=r"tokenizer=t5 loads tokenizer.json from the hub repo google-t5/t5-base, which "
                                             r"is not reachable \(HF_HUB_OFFLINE.*pass tokenizer.path="):
        load_tokenizer(OmegaConf.to_container(compose(["tokenizer=t5", "tokenizer.path=null"]).tokenizer, resolve=True))


def test_a_placement_the_tokenizer_has_no_token_for_is_one_message(files):
    t5 = load_tokenizer(tokenizer_cfg("t5", files["t5"]))
    with pytest.raises(TokenizerError, match="data.eot=prepend needs tokenizer.bos_token, which tokenizer=t5 does not set"):
        t5.boundary("prepend")
    with pytest.raises(TokenizerError, match=r"data.eot='start' is not one of \['append', 'prepend', 'both'\]"):
        t5.boundary("start")


def test_a_missing_tokenizer_file_stops_train_py_with_one_line(tmp_path, cache_dir):
    from conftest import TINY, run_cli

    result = run_cli("train.py", *TINY, f"run_dir={tmp_path / 'run'}", f"paths.cache_dir={cache_dir}", "tokenizer=t5",
                     f"tokenizer.path={tmp_path / 'missing'}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"tokenizer.path={tmp_path / 'missing'} does not exist" in result.stderr


def test_experiment_quick_trains_on_a_llama3_layout_tokenizer(tmp_path):
    """The quick experiment on Shakespeare tokenized by a byte-level BPE tokenizer.json with LLaMA-3's boundary
    tokens (BOS and EOS around the one document): it trains, and bits per byte fall with the loss."""
    from conftest import run_cli
    from trainer.metrics import read_metrics

    result = run_cli("train.py", "experiment=quick", "tokenizer=llama3", "model.vocab_size=640", f"run_dir={tmp_path / 'run'}",
                     f"paths.cache_dir={tmp_path / 'cache'}")
    assert result.returncode == 0, result.stderr
    evals = [r for r in read_metrics(tmp_path / "run" / "metrics.csv") if "val_loss" in r]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] and evals[-1]["val_bpb"] < evals[0]["val_bpb"]
    meta = json.loads(next((tmp_path / "cache").glob("shakespeare-*/meta.json")).read_text())
    assert (meta["tokenizer"], meta["eot_placement"], meta["tokenizer_identity"]["bos_id"]) == ("llama3", "both", 0)
