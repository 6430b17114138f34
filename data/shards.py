"""Tokenized data on disk: uint16 token shards with a small header, plus a JSON sidecar.

A prepared dataset is a directory:

    meta.json                 sidecar: tokenizer sha256, EOT id and placement, dtype, token counts per
                              split and shard, source, split rule, seed (written last: it marks completion)
    train_000000.bin ...      shards: a 64-byte header (magic b"MUONTOK\\0", format version, bytes per
    val_000000.bin ...        token, token count), then the tokens as little-endian uint16 (uint32 for a
                              tokenizer with ids past 65,535)

Every file is written atomically (data/files.py: temporary file, fsync, rename), so a killed
preparation leaves either a complete shard or none. `open_token_set` checks each shard against its
header and the sidecar.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data.files import atomic_file

MAGIC = b"MUONTOK\0"
FORMAT_VERSION = 1
HEADER_BYTES = 64
_HEADER = struct.Struct("<8sIIQ")  # magic, version, bytes per token, token count
DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}  # bytes per token -> dtype
META_FILE = "meta.json"


class DataError(RuntimeError):
    """A missing, partial or corrupt data file; the message names the file and the fix."""


def write_shard(path: Path, tokens: np.ndarray, dtype: np.dtype = DTYPES[2]) -> None:
    tokens, dtype = np.asarray(tokens), np.dtype(dtype)
    if tokens.size and (tokens.min() < 0 or tokens.max() > np.iinfo(dtype).max):
        raise ValueError(f"token ids must fit in {dtype.name}")
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, dtype.itemsize, tokens.size).ljust(HEADER_BYTES, b"\0")
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(header)
        f.write(tokens.astype(dtype, copy=False).tobytes())


def shard_problem(path: Path, expected_tokens: int | None = None) -> str | None:
    """Why this shard is unusable (missing, foreign, truncated, wrong length), or None if it is fine."""
    path = Path(path)
    if not path.is_file():
        return f"{path} is missing"
    size = path.stat().st_size
    if size < HEADER_BYTES:
        return f"{path} is truncated ({size} bytes, shorter than its {HEADER_BYTES}-byte header)"
    with open(path, "rb") as f:
        magic, version, itemsize, n_tokens = _HEADER.unpack(f.read(_HEADER.size))
    if magic != MAGIC or version != FORMAT_VERSION or itemsize not in DTYPES:
        return f"{path} is not a muonlab token shard (bad header)"
    if size != HEADER_BYTES + n_tokens * itemsize:
        return f"{path} is corrupt: its header says {n_tokens} tokens but it holds {(size - HEADER_BYTES) // itemsize}"
    if expected_tokens is not None and n_tokens != expected_tokens:
        return f"{path} holds {n_tokens} tokens but {META_FILE} says {expected_tokens}"
    return None


def read_shard(path: Path) -> np.memmap:
    problem = shard_problem(path)
    if problem:
        raise DataError(problem)
    with open(path, "rb") as f:
        _, _, itemsize, n_tokens = _HEADER.unpack(f.read(_HEADER.size))
    return np.memmap(path, dtype=DTYPES[itemsize], mode="r", offset=HEADER_BYTES, shape=(n_tokens,))


def write_meta(directory: Path, meta: dict) -> None:
    with atomic_file(Path(directory) / META_FILE) as tmp:
        tmp.write_text(json.dumps(meta, indent=2))


def read_meta(directory: Path) -> dict | None:
    """The sidecar, or None when the dataset was never (completely) prepared."""
    path = Path(directory) / META_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is corrupt ({e})") from None


class TokenStream:
    """The shards of one split read as a single token sequence (memory-mapped, never loaded)."""

    def __init__(self, shards: list[np.ndarray]):
        self.shards = shards
        self.bounds = np.cumsum([0] + [len(s) for s in shards])

    def __len__(self) -> int:
        return int(self.bounds[-1])

    def window(self, start: int, length: int) -> np.ndarray:
        """tokens[start : start + length] as int64, reading across shard boundaries if needed."""
        end = start + length
        if start < 0 or end > len(self):
            raise IndexError(f"window [{start}, {end}) outside a stream of {len(self)} tokens")
        first = int(np.searchsorted(self.bounds, start, side="right")) - 1
        pieces, pos = [], start
        for i in range(first, len(self.shards)):
            if pos >= end:
                break
            lo = pos - self.bounds[i]
            hi = min(end, self.bounds[i + 1]) - self.bounds[i]
            pieces.append(self.shards[i][lo:hi])
            pos = self.bounds[i] + hi
        return np.concatenate(pieces).astype(np.int64)


@dataclass
class TokenSet:
    """A prepared dataset: its sidecar and one token stream per split."""

    directory: Path
    meta: dict
    splits: dict[str, TokenStream]


def token_set_problems(directory: Path, meta: dict) -> list[str]:
    problems = []
    for split, info in meta["splits"].items():
        for shard in info["shards"]:
            problem = shard_problem(Path(directory) / shard["file"], shard["tokens"])
            if problem:
                problems.append(problem)
    return problems


def is_complete(directory: Path) -> bool:
    """Whether directory holds a complete, valid prepared dataset (a missing, partial or corrupt one
    is not: preparation rewrites it)."""
    try:
        meta = read_meta(directory)
    except DataError:
        return False
    return meta is not None and not token_set_problems(directory, meta)


def open_token_set(directory: Path, fix_hint: str) -> TokenSet:
    """Open a prepared dataset, refusing missing or corrupt shards with a message ending in fix_hint."""
    directory = Path(directory)
    meta = read_meta(directory)
    if meta is None:
        raise DataError(f"no prepared dataset in {directory} ({META_FILE} missing). {fix_hint}")
    problems = token_set_problems(directory, meta)
    if problems:
        raise DataError("; ".join(problems) + f". {fix_hint}")
    splits = {
        split: TokenStream([read_shard(directory / s["file"]) for s in info["shards"]])
        for split, info in meta["splits"].items()
    }
    return TokenSet(directory, meta, splits)
