"""Tiny real tokenizers trained from the shipped Shakespeare, in the id layouts of the papers' tokenizers
(tests only; nothing here is downloaded):

    t5_model(dir)       SentencePiece unigram, pad 0, </s> 1, <unk> 2, no BOS       (t5-base's layout)
    llama2_model(dir)   SentencePiece BPE with byte fallback, <unk> 0, <s> 1, </s> 2 (LLaMA-2's layout)
    bpe_json(dir)       a `tokenizers` byte-level BPE saved as tokenizer.json, with LLaMA-3's boundary tokens
"""

from __future__ import annotations

import io
from pathlib import Path

SHAKESPEARE = Path(__file__).resolve().parents[1] / "data" / "assets" / "tinyshakespeare.txt"


def lines(limit: int = 20000) -> list[str]:
    return [line for line in SHAKESPEARE.read_text().splitlines() if line.strip()][:limit]


def _spm(path: Path, **layout) -> Path:
    import sentencepiece as spm

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines()), model_writer=buffer, vocab_size=512,
                                   minloglevel=2, **layout)
    path.write_bytes(buffer.getvalue())
    return path


def t5_model(directory: Path) -> Path:
    return _spm(Path(directory) / "spiece.model", model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                input_sentence_size=4000, shuffle_input_sentence=False)


def llama2_model(directory: Path) -> Path:
    return _spm(Path(directory) / "tokenizer.model", model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2,
                pad_id=-1)


def bpe_json(directory: Path, vocab_size: int = 600) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(lines(), trainer)
    path = Path(directory) / "tokenizer.json"
    tok.save(str(path))
    return path
