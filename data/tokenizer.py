"""GPT-2 BPE through tiktoken, built offline from the ranks file shipped in data/assets.

`gpt2.tiktoken` is byte-identical to tiktoken's `r50k_base.tiktoken` (the GPT-2 encoding; it comes
from the openai-whisper sdist, MIT). Building the Encoding from it needs no network, unlike
`tiktoken.get_encoding("gpt2")`, which downloads `vocab.bpe` and `encoder.json`.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import tiktoken
from tiktoken.load import load_tiktoken_bpe
from tiktoken_ext.openai_public import r50k_pat_str

RANKS_FILE = Path(__file__).parent / "assets" / "gpt2.tiktoken"
RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"  # tiktoken's r50k_base hash
EOT = "<|endoftext|>"
EOT_ID = 50256
N_VOCAB = 50257


class TokenizerError(RuntimeError):
    pass


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@functools.cache
def gpt2_tokenizer() -> tiktoken.Encoding:
    """The GPT-2 encoding: n_vocab 50257, <|endoftext|> = 50256, "hello world" -> [31373, 995]."""
    if not RANKS_FILE.is_file():
        raise TokenizerError(f"the GPT-2 ranks file {RANKS_FILE} is missing; restore it from git (data/assets)")
    try:
        ranks = load_tiktoken_bpe(str(RANKS_FILE), expected_hash=RANKS_SHA256)
    except ValueError as e:  # tiktoken raises ValueError on a hash mismatch
        raise TokenizerError(f"{RANKS_FILE} does not have the GPT-2 sha256 {RANKS_SHA256}: {e}") from None
    return tiktoken.Encoding(
        name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks, special_tokens={EOT: EOT_ID}, explicit_n_vocab=N_VOCAB
    )
