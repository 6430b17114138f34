import socket

import pytest

import data.tokenizer as tokenizer
from data.tokenizer import EOT_ID, RANKS_SHA256, TokenizerError, file_sha256, gpt2_tokenizer


def test_gpt2_ids():
    enc = gpt2_tokenizer()
    assert enc.encode("hello world") == [31373, 995]
    assert enc.encode("Hello world") == [15496, 995]
    assert enc.n_vocab == 50257 and enc.eot_token == EOT_ID == 50256
    assert enc.encode("<|endoftext|>", allowed_special="all") == [50256]
    assert enc.encode_ordinary("<|endoftext|>") != [50256]  # documents' text is never a special token


def test_round_trip_of_unicode_and_whitespace():
    text = "Thou art\tmore lovely —   and more temperate ✨\n\nnaïve café 東京"
    enc = gpt2_tokenizer()
    assert enc.decode(enc.encode_ordinary(text)) == text


def test_shipped_ranks_file_has_the_gpt2_hash():
    assert file_sha256(tokenizer.RANKS_FILE) == RANKS_SHA256


def test_builds_without_network(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the tokenizer tried to open a network connection")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    gpt2_tokenizer.cache_clear()
    assert gpt2_tokenizer().encode("hello world") == [31373, 995]


def test_tampered_ranks_file_is_refused(tmp_path, monkeypatch):
    bad = tmp_path / "gpt2.tiktoken"
    bad.write_bytes(tokenizer.RANKS_FILE.read_bytes().replace(b"IQ==", b"IR==", 1))
    monkeypatch.setattr(tokenizer, "RANKS_FILE", bad)
    gpt2_tokenizer.cache_clear()
    try:
        with pytest.raises(TokenizerError, match="does not have the GPT-2 sha256"):
            gpt2_tokenizer()
    finally:
        gpt2_tokenizer.cache_clear()
