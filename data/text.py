"""A local text file as one document (the embedded Shakespeare corpus), tokenized once.

The whole file is encoded with the run's tokenizer (GPT-2 BPE by default; without special tokens, so
a literal "<|endoftext|>" in the text is not one) and gets its boundary tokens (data.eot). The last `val_fraction` of the tokens is the
validation split, the rest the train split: a fixed rule, so every run validates on the same tokens.
tinyshakespeare.txt: 338,026 tokens with the EOT -> 304,223 train + 33,803 validation.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

from data.prepare import base_meta, encode_batch, finish, tokenizer_fingerprint, write_split
from data.shards import FORMAT_VERSION, DataError, is_complete
from data.tokenizer import file_sha256


def text_dataset_dir(cache_dir: Path, name: str, source: Path, val_fraction: float, tokenizer: Mapping | None = None,
                     eot: str = "append") -> Path:
    """Where this source, split rule and tokenizer are cached: <cache_dir>/<name>-<fingerprint>."""
    fingerprint = {
        "format": FORMAT_VERSION,
        "source_sha256": file_sha256(source),
        **tokenizer_fingerprint(tokenizer),
        "val_fraction": val_fraction,
    }
    if eot != "append":  # only when set, so the default caches keep their names
        fingerprint["eot"] = eot
    digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:10]
    return Path(cache_dir) / f"{name}-{digest}"


def check_source(source: Path) -> Path:
    source = Path(source)
    if not source.is_file():
        raise DataError(f"data.source={source} does not exist (expected a UTF-8 text file)")
    return source


def prepare_text_file(source: Path, out_dir: Path, name: str, val_fraction: float, tokenizer: Mapping | None = None,
                      eot: str = "append") -> Path:
    """Tokenize `source` into out_dir (idempotent: a complete, valid result is reused; a partial or
    corrupt one is rewritten). Returns out_dir."""
    source = check_source(source)
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"data.val_fraction={val_fraction} must be in (0, 1)")
    out_dir = Path(out_dir)
    if is_complete(out_dir):
        return out_dir
    try:
        text = source.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"data.source={source} is not UTF-8 text ({e})") from None
    tokens = encode_batch([text], eot, tokenizer)
    n_val = max(1, round(len(tokens) * val_fraction))
    source_info = {"kind": "text", "path": str(source), "sha256": file_sha256(source), "documents": 1}
    meta = base_meta(name, eot, source_info, f"the last {val_fraction} of the tokens (one document: the whole file)", None,
                     tokenizer)
    for split, split_tokens in (("train", tokens[:-n_val]), ("val", tokens[-n_val:])):
        meta["splits"][split] = write_split(out_dir, split, [(split_tokens, 1)], shard_tokens=len(split_tokens))
    return finish(out_dir, meta)
